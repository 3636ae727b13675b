"""What a heal distils towards: the teacher, in one of two forms behind one small interface
(``loss`` for a training step, ``measure`` for held-out quality).

``LiveTeacher``: the reference model in memory, run on every step's windows (exact KL over the
whole vocabulary).  The full-parameter, changed-layers and LoRA heals use it; a build hands its
already loaded source in, so no second copy loads.

``CachedTeacher``: the teacher's top-k log-probabilities (k = 256) over every training window and
the held-out chunks, computed in one pass and cached in the same compact form as validation's
reference (``validate/reference.py``; the held-out entry is the file validation reads when their
chunk counts agree), after
which the teacher need not be in memory.  A QLoRA heal uses it: an 8B model's heal then holds its
4-bit student and a few hundred MB of targets instead of a 16 GB teacher beside it, which is what
lets it fit a 24 GB GPU (``heal/footprint.py``).  The loss is KL over the top k plus one tail
bucket, the form every validation figure uses: a lower bound on the full KL, tight where the
teacher's mass sits in its top k (the mean tail mass is recorded in the heal log).
"""

from __future__ import annotations

import numpy as np
import torch

from ..mka.engine import kl_from_logits
from ..quality import Reference, compare
from ..validate.metrics import accuracy
from ..validate.reference import TOP_K, compact_reference, topk_reference


def full_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher || student) per position over the whole vocabulary (the engine's per-position KL)."""
    return kl_from_logits(torch.log_softmax(teacher_logits.float(), -1), student_logits).mean()


def topk_kl(top_logp: torch.Tensor, top_idx: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher || student) per position over the teacher's top k tokens and one bucket for
    the rest (``validate/metrics.accuracy`` computes the same in numpy for an artifact)."""
    s = torch.log_softmax(student_logits.float(), -1)
    s_top = s.gather(-1, top_idx)
    p_top = top_logp.float().exp()
    p_tail = (1.0 - p_top.sum(-1)).clamp_min(1e-12)
    # the student's tail mass as a logsumexp over the tokens outside the top k, not 1 - sum(top):
    # that difference cancels to noise (and a zero gradient at the clamp) as the student sharpens
    log_q_tail = s.scatter(-1, top_idx, float("-inf")).logsumexp(-1)
    kl = (p_top * (top_logp.float() - s_top)).sum(-1) + p_tail * (p_tail.log() - log_q_tail)
    return kl.mean()


class LiveTeacher:
    """The reference model in memory: its logits per step, its held-out log-probs kept whole."""

    form = "live"

    def __init__(self, ref, heldout: torch.Tensor, device: torch.device):
        for p in ref.model.parameters():
            p.requires_grad_(False)
        self.model, self.device, self.fingerprint = ref.model, device, ref.fingerprint
        self.key = f"live:{next(ref.model.parameters()).dtype}"
        self.heldout = Reference(ref.model, heldout, device)

    def loss(self, rows: slice, ids: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher = self.model(input_ids=ids, use_cache=False).logits
        return full_kl(teacher, student_logits)

    def measure(self, model) -> dict:
        return compare(model, self.heldout).as_dict()

    def summary(self) -> dict:
        return {"form": self.form}


class CachedTeacher:
    """The teacher's top-k log-probs over ``windows`` and ``n_heldout`` held-out chunks, from the
    cache (one teacher pass when absent).  ``ref`` may be dropped once this is built."""

    form = "top-k cache"

    def __init__(self, ref, windows: torch.Tensor, n_heldout: int, progress: bool = True, top_k: int = TOP_K):
        self.top_k, self.fingerprint = top_k, ref.fingerprint
        self.key = f"top-{top_k}:{next(ref.model.parameters()).dtype}"
        self.train_path = topk_reference(ref, windows, progress, top_k) if len(windows) else None
        self.heldout_path, self.heldout_summary = compact_reference(ref, n_heldout, progress=progress, top_k=top_k)
        if self.train_path is not None:
            data = np.load(self.train_path)
            if not np.array_equal(data["ids"], windows.int().numpy()):  # a hash collision, or a stale file
                raise RuntimeError(f"{self.train_path} holds other windows than this heal's")
            self.top_idx = torch.from_numpy(data["top_idx"])  # int32: 8 B an entry with its log-prob
            self.top_logp = torch.from_numpy(data["top_logp"])
            self.tail = float((1.0 - self.top_logp.double().exp().sum(-1)).mean())

    def loss(self, rows: slice, ids: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
        dev = student_logits.device
        return topk_kl(self.top_logp[rows].to(dev), self.top_idx[rows].to(dev).long(), student_logits)

    @torch.no_grad()
    def measure(self, model) -> dict:
        device = next(p.device for p in model.parameters() if p.device.type != "meta")

        def logits_of(ids: list[int]) -> np.ndarray:
            return model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0].float().cpu().numpy()

        res = accuracy(logits_of, str(self.heldout_path))
        keep = ("kl", "ppl", "ref_ppl", "ppl_change_pct", "top1", "tokens")
        return {k: (round(res[k], 6) if isinstance(res[k], float) else res[k]) for k in keep}

    def summary(self) -> dict:
        return {
            "form": self.form,
            "kl": f"top-{self.top_k} + tail (a lower bound on the full KL; heldout_before and _after share it)",
            "top_k": self.top_k,
            "train_tail_mass": round(getattr(self, "tail", 0.0), 6),
            "heldout_tail_mass": round(self.heldout_summary["mean_tail_mass"], 6),
            "cache": [str(p) for p in (self.train_path, self.heldout_path) if p is not None],
        }
