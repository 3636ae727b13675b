"""Quality measurement, defined once and used everywhere (merge log, eval, solver, validation).

Quality loss = mean KL(reference || model) in nats over every position of fixed 512-token
held-out chunks; reported with the perplexity change in percent and top-1 agreement. Multiple
choice (MMLU, plain letter and cloze) is reported beside its chance line with a 95% interval,
because accuracy alone hides broken language modelling.
"""

from __future__ import annotations

import gzip
import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from importlib import resources

import torch
from tqdm.auto import tqdm

from .mka.engine import head_logits, kl_by_identity, kl_from_logits, linear_head, reference_terms


@dataclass
class LMQuality:
    kl: float  # mean KL(reference || model), nats
    ppl: float  # model perplexity on held-out text
    ref_ppl: float
    ppl_change_pct: float
    top1: float  # fraction of positions where argmax agrees with the reference
    tokens: int

    def as_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


class Reference:
    """A reference model's held-out log-probabilities, computed once, at construction.

    Eagerly, because callers go on to change the very model object (merge candidates swap its
    block stack): a lazy cache would silently take a merged stack as the reference.

    Kept a hidden state wide where the output head is one linear map: the reference's final hidden
    states, its top token and log-prob of the next token, and ``mka.engine``'s identity terms (per
    position sum p log p, W^T p, b . p), so four 512-token chunks of a 128k vocabulary hold ~70 MB,
    not 1 GB.  A model scored with the same head (a merge: only the block stack changes) takes the
    identity; one whose head differs (a healed student trains its own) gets the reference's
    log-probabilities back from the stored hidden states and the reference's head, a
    POSITIONS_PER_STEP block at a time.  The full log-probabilities are kept only where the head
    is not one plain linear map.
    """

    @torch.no_grad()
    def __init__(self, model, chunks: torch.Tensor, device: torch.device) -> None:
        self.chunks, self.device = chunks, device
        self.head = model.get_output_embeddings()
        self.by_identity = linear_head(model, self.head) and hasattr(model, "get_decoder")
        self._head_state = (self.head.weight.data_ptr(), self.head.weight._version) if self.by_identity else None
        self._terms, self._logp, self._hidden = [], [], []
        for i in range(len(chunks)):
            ids = chunks[i : i + 1].to(device)
            if not self.by_identity:
                self._logp.append(torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), -1)[0])
                continue
            h = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state[0]
            nxt = torch.cat([ids[0, 1:], ids[0, :1]])
            parts = []
            for a in range(0, h.shape[0], POSITIONS_PER_STEP):
                lp = torch.log_softmax(head_logits(self.head, h[a : a + POSITIONS_PER_STEP]), -1)
                parts.append(
                    (
                        *reference_terms(self.head, lp),
                        lp.argmax(-1),
                        lp.gather(1, nxt[a : a + POSITIONS_PER_STEP, None])[:, 0],
                    )
                )
            self._terms.append(tuple(torch.cat(t) for t in zip(*parts)))
            self._hidden.append(h.clone())

    def same_head(self, head) -> bool:
        """Whether ``head`` is the reference's own head, unchanged (the identity's terms hold)."""
        return head is self.head and (head.weight.data_ptr(), head.weight._version) == self._head_state

    def logp_block(self, i: int, block: slice) -> torch.Tensor:
        """The reference's log-probabilities at chunk ``i``'s positions ``block``, from its hidden states."""
        return torch.log_softmax(head_logits(self.head, self._hidden[i][block]), -1)

    def logp(self, i: int) -> torch.Tensor:
        return self._logp[i]

    def terms(self, i: int) -> tuple[torch.Tensor, ...]:
        """Chunk ``i``'s per-position sum p log p, W^T p, b . p, top token, log-prob of the next token."""
        return self._terms[i]


POSITIONS_PER_STEP = 128  # rows of the vocabulary-wide temporaries held at once (memory, not results)


@torch.no_grad()
def compare(model, reference: Reference, progress: bool = False) -> LMQuality:
    """Held-out quality of ``model`` against ``reference``. The log-softmax and KL run over
    POSITIONS_PER_STEP positions at a time: their temporaries are each a full vocabulary wide
    (128,256 floats a position for Llama 3), and a 512-token chunk at once held ~1.3 GB of them."""
    kl_sum = agree = n_pos = 0.0
    nll = ref_nll = 0.0
    n_tok = 0
    head = model.get_output_embeddings() if reference.by_identity else None
    same = reference.by_identity and reference.same_head(head)
    it = range(len(reference.chunks))
    for i in tqdm(it, desc="held-out quality", disable=not progress, leave=False):
        ids = reference.chunks[i : i + 1].to(reference.device)
        if reference.by_identity:
            h_all = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state[0]
            negent, u, pb, ref_top, ref_next = reference.terms(i)
        else:
            logits_all = model(input_ids=ids, use_cache=False).logits[0]
            ref_all = reference.logp(i)
        target_all = ids[0, 1:]
        for a in range(0, ids.shape[1], POSITIONS_PER_STEP):
            block = slice(a, a + POSITIONS_PER_STEP)
            target = target_all[block]  # next tokens of these positions (one fewer at the end)
            if reference.by_identity:
                h = h_all[block]
                logits = head_logits(head, h)
                if same:
                    kl = kl_by_identity(head, h, negent[block], u[block], pb[block], logits)
                else:
                    kl = kl_from_logits(reference.logp_block(i, block), logits)
                kl_sum += float(kl.sum())
                agree += float((logits.argmax(-1) == ref_top[block]).sum())
                ref_nll += float(-ref_next[block][: len(target)].sum())
            else:
                logits, ref = logits_all[block].float(), ref_all[block]
                kl_sum += float(kl_from_logits(ref, logits).sum())
                agree += float((logits.argmax(-1) == ref.argmax(-1)).sum())
                ref_nll += float(-ref[: len(target)].gather(1, target[:, None]).sum())
            n_pos += logits.shape[0]
            logp = torch.log_softmax(logits[: len(target)], -1)
            nll += float(-logp.gather(1, target[:, None]).sum())
            n_tok += target.numel()
    ppl, ref_ppl = math.exp(nll / n_tok), math.exp(ref_nll / n_tok)
    return LMQuality(
        kl=kl_sum / n_pos,
        ppl=ppl,
        ref_ppl=ref_ppl,
        ppl_change_pct=100 * (ppl / ref_ppl - 1),
        top1=agree / n_pos,
        tokens=int(n_pos),
    )


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))


def mmlu_questions(per_subject: int) -> list[dict]:
    """A subject-stratified slice of the vendored MMLU test subset (evaluation only)."""
    path = resources.files("mka_edge.data") / "mmlu_subset.jsonl.gz"
    rows = [json.loads(line) for line in gzip.open(str(path), "rt", encoding="utf-8")]
    taken: dict[str, int] = defaultdict(int)
    out = []
    for r in rows:
        if taken[r["subject"]] < per_subject:
            taken[r["subject"]] += 1
            out.append(r)
    return out


def _letter_prompt(q: dict) -> str:
    opts = "\n".join(f"{l}. {c}" for l, c in zip("ABCD", q["choices"]))
    return f"The following is a multiple choice question about {q['subject']}.\n\n{q['question']}\n{opts}\nAnswer:"


@torch.no_grad()
def mmlu(model, tokenizer, device: torch.device, per_subject: int = 2, progress: bool = False) -> dict:
    """Zero-shot MMLU two ways: log-likelihood of the letters A-D, and of the answer texts (cloze,
    mean log-probability per answer token, so longer answers are not penalised)."""
    qs = mmlu_questions(per_subject)
    letter_ids = [tokenizer(f" {l}", add_special_tokens=False)["input_ids"][-1] for l in "ABCD"]
    plain = cloze = 0
    for q in tqdm(qs, desc="MMLU", disable=not progress, leave=False):
        ids = tokenizer(_letter_prompt(q), add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
        last = model(input_ids=ids, use_cache=False).logits[0, -1]
        plain += int(int(last[letter_ids].argmax()) == q["answer"])
        ctx = tokenizer(f"Question: {q['question']}\nAnswer:", add_special_tokens=False)["input_ids"]
        conts = [
            tokenizer(f" {c}", add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id] for c in q["choices"]
        ]
        seqs = [ctx + c for c in conts]
        width = max(map(len, seqs))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # right padding needs no mask: causal attention never looks at the pads to the right
        batch = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
        logp = torch.log_softmax(model(input_ids=batch, use_cache=False).logits.float(), -1)
        scores = []
        for j, c in enumerate(conts):
            pos = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(c), device=device)
            scores.append(float(logp[j, pos, torch.tensor(c, device=device)].mean()))
        cloze += int(max(range(4), key=scores.__getitem__) == q["answer"])
    n = len(qs)
    res = {}
    for name, correct in (("mmlu", plain), ("mmlu_cloze", cloze)):
        lo, hi = wilson(correct, n)
        res[name] = {"accuracy": round(correct / n, 4), "ci95": [round(lo, 4), round(hi, 4)], "n": n, "chance": 0.25}
    return res
