"""Runtime-independent measurement code shared by the validation workers (GGUF and ONNX).

Only numpy and the standard library are imported here: the workers run in child processes whose
peak RSS must be the runtime's and the model's, not PyTorch's."""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable

import numpy as np


def status_mb(field: str) -> float:
    """VmRSS / VmHWM of this process image.  Not ru_maxrss: Linux carries that across exec, so a
    child of a big parent (PyTorch with a model loaded) would report the parent's peak."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if field == "VmHWM" else float("nan")


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def accuracy(
    logits_of: Callable[[list[int]], np.ndarray],
    reference: str,
    mmlu: list[dict] | None = None,
    letter_ids: list[int] | None = None,
) -> dict:
    """KL to the reference (top-k + tail form), perplexity, top-1 agreement, MMLU letter accuracy.

    ``logits_of(ids)`` runs the artifact on a fresh sequence and returns logits for every position."""
    t0 = time.perf_counter()
    ref = np.load(reference)
    ids, top_idx, top_lp, tgt_lp = ref["ids"], ref["top_idx"], ref["top_logp"].astype(np.float64), ref["target_logp"]
    n_chunks, length = ids.shape
    kl = agree = nll = ref_nll = 0.0
    n_pos = n_tok = 0
    for c in range(n_chunks):
        lq = log_softmax(np.asarray(logits_of(ids[c].tolist()))[:length])
        p_top = np.exp(top_lp[c])
        q_top = np.exp(np.take_along_axis(lq, top_idx[c], axis=1))
        p_tail = np.clip(1.0 - p_top.sum(-1), 1e-12, None)
        q_tail = np.clip(1.0 - q_top.sum(-1), 1e-12, None)
        kl += float(
            (p_top * (top_lp[c] - np.log(np.clip(q_top, 1e-300, None)))).sum()
            + (p_tail * (np.log(p_tail) - np.log(q_tail))).sum()
        )
        agree += float((lq.argmax(-1) == top_idx[c][:, 0]).sum())
        n_pos += length
        nll += float(-lq[np.arange(length - 1), ids[c][1:]].sum())
        ref_nll += float(-tgt_lp[c].astype(np.float64).sum())
        n_tok += length - 1
    res = {
        "kl": kl / n_pos,
        "top1": agree / n_pos,
        "ppl": float(np.exp(nll / n_tok)),
        "ref_ppl": float(np.exp(ref_nll / n_tok)),
        "tokens": n_pos,
    }
    res["ppl_change_pct"] = 100 * (res["ppl"] / res["ref_ppl"] - 1)
    res["seconds"] = {"kl": time.perf_counter() - t0}
    if mmlu:
        add_mmlu_letters(res, lambda ids: np.asarray(logits_of(ids))[len(ids) - 1], mmlu, letter_ids or [])
    return res


def add_mmlu_letters(
    res: dict, last_logits_of: Callable[[list[int]], np.ndarray], mmlu: list[dict], letter_ids: list[int]
) -> None:
    """MMLU letter accuracy into ``res`` (``mmlu_correct``, ``mmlu_n``, ``seconds['mmlu']``):
    ``last_logits_of(ids)`` gives the logits at the prompt's last position only (a runtime that can
    skip the head at every other position should: on a 150k vocabulary that is a sixth of a 1.5B
    model's work)."""
    t0 = time.perf_counter()
    correct = 0
    for q in mmlu:
        last = np.asarray(last_logits_of(q["ids"]))
        correct += int(int(np.argmax(last[letter_ids])) == q["answer"])
    res["mmlu_correct"], res["mmlu_n"] = correct, len(mmlu)
    res.setdefault("seconds", {})["mmlu"] = time.perf_counter() - t0


def summarize_runs(runs: list[dict], out: dict) -> dict:
    for key in ("prompt_tps", "gen_tps", "ttft_s"):
        vals = [r[key] for r in runs]
        out[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
    out["runs"] = runs
    return out
