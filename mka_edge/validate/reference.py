"""The reference side of accuracy checks: a model's held-out log-probabilities in a compact form,
cached by content hash so validating many artifacts against one reference computes it once.

Compact form: per position the top-k log-probabilities with their token ids, plus the log-prob
of the actual next token.  KL is then computed over the top-k tokens and one "tail" bucket for
the rest, which is a lower bound on the full KL that is tight when the reference's mass sits in
its top k (k = 256 here; the tail's share is stored so reports can show how much was bucketed).
Full fp16 logits would be 200 MB for four 512-token chunks of a 49k vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..cache import cache_root, entry_lock, stable_hash, temp_sibling_prefix
from ..calibration import heldout_chunks
from ..quality import POSITIONS_PER_STEP, _letter_prompt, mmlu_questions, wilson

TOP_K = 256


def reference_key(fingerprint: str, ids: torch.Tensor, top_k: int = TOP_K) -> str:
    return stable_hash({"model": fingerprint, "ids": stable_hash(ids.tolist()), "top_k": top_k, "v": 1})


@torch.no_grad()
def topk_reference(lm, ids: torch.Tensor, progress: bool = True, top_k: int = TOP_K) -> Path:
    """Path of the cached .npz of ``lm``'s top-k log-probabilities over the rows of ``ids``
    (computed if missing).  The held-out reference below is one use; a QLoRA heal's teacher
    targets over its training windows are another (heal/teacher.py)."""
    key = reference_key(lm.fingerprint, ids, top_k)
    path = cache_root() / "references" / f"{key[:24]}.npz"
    if not path.is_file():
        with entry_lock(path, "the reference log-probabilities"):  # the plan's probes and validation share it
            if not path.is_file():  # written while this process waited?
                _write_reference(lm, ids, path, progress, top_k)
    return path


@torch.no_grad()
def compact_reference(
    lm, n_chunks: int = 4, heldout: str | None = None, progress: bool = True, top_k: int = TOP_K
) -> tuple[Path, dict]:
    """Path of the cached .npz for ``lm`` on the held-out chunks (computed if missing) and a summary."""
    ids = heldout_chunks(lm.tokenizer, n_chunks, path=heldout)
    path = topk_reference(lm, ids, progress, top_k)
    data = np.load(path)
    tail = 1.0 - np.exp(data["top_logp"].astype(np.float64)).sum(-1)
    return path, {
        "chunks": int(ids.shape[0]),
        "chunk_len": int(ids.shape[1]),
        "top_k": top_k,
        "mean_tail_mass": float(tail.mean()),
        "cache": str(path),
    }


@torch.no_grad()
def _write_reference(lm, ids: torch.Tensor, path: Path, progress: bool, top_k: int) -> None:
    """Run the model over ``ids`` and write the compact reference to ``path`` (atomically)."""
    device = lm.input_device
    top_idx, top_lp, tgt = [], [], []
    for row in tqdm(ids, desc="reference log-probs", disable=not progress, leave=False):
        logits = lm.model(input_ids=row[None].to(device), use_cache=False).logits[0]
        nxt = torch.cat([row[1:], row[:1]]).to(device)  # the last position's entry is dropped below
        parts = []  # per POSITIONS_PER_STEP positions: float64 rows a vocabulary wide are the peak
        for a in range(0, logits.shape[0], POSITIONS_PER_STEP):
            lp = torch.log_softmax(logits[a : a + POSITIONS_PER_STEP].double(), -1)
            v, i = lp.topk(top_k, dim=-1)
            parts.append((i, v, lp.gather(1, nxt[a : a + POSITIONS_PER_STEP, None])[:, 0]))
        top_idx.append(torch.cat([p[0] for p in parts]).int().cpu().numpy())
        top_lp.append(torch.cat([p[1] for p in parts]).float().cpu().numpy())
        tgt.append(torch.cat([p[2] for p in parts])[:-1].float().cpu().numpy())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{temp_sibling_prefix(path)}tmp.npz")  # this process's: never another's half file
    np.savez(
        tmp, ids=ids.int().numpy(), top_idx=np.stack(top_idx), top_logp=np.stack(top_lp), target_logp=np.stack(tgt)
    )
    tmp.replace(path)


def mmlu_jobs(tokenizer, per_subject: int) -> tuple[list[dict], list[int]]:
    """MMLU letter prompts as token ids (the artifact is fed the reference tokenizer's ids)."""
    qs = mmlu_questions(per_subject) if per_subject > 0 else []
    letters = [tokenizer(f" {l}", add_special_tokens=False)["input_ids"][-1] for l in "ABCD"]
    jobs = [
        {"ids": tokenizer(_letter_prompt(q), add_special_tokens=False)["input_ids"], "answer": q["answer"]} for q in qs
    ]
    return jobs, letters


MMLU_BATCH = 8  # questions per forward pass: each pass streams every weight once (4 GB at 1B in float32)


@torch.no_grad()
def last_position_logits(model, device, rows: list[list[int]], desc: str | None = None) -> list[torch.Tensor]:
    """The logits at the last position of each of ``rows``, several rows a forward pass.

    Why batched, and why only there: one question is a short prompt (50-150 tokens), so a pass per
    question is bound by reading the weights, not by arithmetic, and the output head over every
    position of a 150k vocabulary is a sixth of a 1.5B model's work for logits nobody reads.  Rows
    are sorted by length and right-padded (causal attention never looks right, so a row's own
    positions compute as they would alone), and ``logits_to_keep`` asks the head for the rows'
    last positions only."""
    out: list[torch.Tensor | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    starts = range(0, len(order), MMLU_BATCH)
    for a in tqdm(starts, desc=desc, disable=desc is None, leave=False, unit="pass"):
        part = order[a : a + MMLU_BATCH]
        width = max(len(rows[i]) for i in part)
        batch = torch.tensor([rows[i] + [rows[i][-1]] * (width - len(rows[i])) for i in part], device=device)
        ends = sorted({len(rows[i]) - 1 for i in part})
        keep = torch.tensor(ends)  # on the CPU: an index there serves a model on any device
        logits = model(input_ids=batch, use_cache=False, logits_to_keep=keep).logits
        for j, i in enumerate(part):
            out[i] = logits[j, ends.index(len(rows[i]) - 1)].float().cpu()
    return out  # type: ignore[return-value]


@torch.no_grad()
def reference_mmlu(lm, jobs: list[dict], letters: list[int], progress: bool = True) -> dict:
    if not jobs:
        return {}
    key = stable_hash({"model": lm.fingerprint, "jobs": stable_hash(jobs), "letters": letters})
    path = cache_root() / "references" / f"mmlu-{key[:24]}.npy"
    if not path.is_file():
        with entry_lock(path, "the reference MMLU answers"):
            if not path.is_file():  # written while this process waited?
                desc = f"reference MMLU ({len(jobs)} questions)" if progress else None
                lasts = last_position_logits(lm.model, lm.input_device, [q["ids"] for q in jobs], desc)
                correct = sum(int(int(last[letters].argmax()) == q["answer"]) for last, q in zip(lasts, jobs))
                tmp = path.with_name(f"{temp_sibling_prefix(path)}tmp.npy")
                np.save(tmp, np.array(correct))
                tmp.replace(path)
    correct = int(np.load(path))
    lo, hi = wilson(correct, len(jobs))
    return {"accuracy": correct / len(jobs), "ci95": [lo, hi], "n": len(jobs), "chance": 0.25}
