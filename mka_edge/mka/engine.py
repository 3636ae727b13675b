"""Calibration loss of a candidate stack: KL(original || candidate) on calibration tokens.

The engine caches the hidden state entering every current layer, so a candidate that changes
the stack from position p on is scored by running only layers p.. (the "reuse the hidden
states entering the fused layer" rule), not the whole model.  The output head and its
log-softmax, the widest step (49,152 or 128,256 columns per token), run one calibration sequence
at a time, so their temporaries stay a sequence's worth however many sequences score.

The reference is kept a hidden state wide, not a vocabulary wide (``LinearHeadReference``): with
a linear output head z = W h + b, KL(p || q) = sum p log p - (h . W^T p + b . p) + logsumexp(z_q),
so a position needs its negative entropy, W^T p (hidden-size) and b . p, exactly.  Full
log-probabilities were samples x seq_len x vocab x 4 bytes: 1.6 GB for SmolLM2's default 32 x 256
calibration (most of ``merge -k 3``'s 1.9 GB peak), 16.8 GB for Llama-3-8B's 64 x 512; this form
is 19 MB and 0.5 GB.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from .layers import _resolve, base_model, get_layers, layer_inputs, temporary_stack


def kl_from_logits(ref_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-position KL(ref || model) in nats."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1)


VOCAB_CHUNK = 16384  # output-head rows widened to float32 at a time (268 MB at 8B's 4096 wide)


def head_logits(head: nn.Linear, h: torch.Tensor) -> torch.Tensor:
    """float32 logits of ``head`` on ``h`` ([T, H]), the head's rows widened a chunk at a time: the
    identity in ``LinearHeadReference`` holds for logits computed as these are (a 16-bit head's
    own 16-bit logits would round each by up to 0.4%, more than the KL being measured)."""
    w, b = head.weight, head.bias
    x = h.float()
    if w.dtype == torch.float32:
        return nn.functional.linear(x, w, b)
    parts = []
    for a in range(0, w.shape[0], VOCAB_CHUNK):
        parts.append(
            nn.functional.linear(
                x, w[a : a + VOCAB_CHUNK].float(), None if b is None else b[a : a + VOCAB_CHUNK].float()
            )
        )
    return torch.cat(parts, -1)


def linear_head(model, head) -> bool:
    """Whether ``head`` is one linear map whose weights can be read directly: a plain ``nn.Linear``
    (not wrapped), not placed by accelerate (an offloaded weight is on the meta device until its
    hook loads it, which reading ``head.weight`` bypasses).  The logits must be exactly
    ``head(last_hidden_state)``: true of every architecture in models/architectures.py today; one
    that scales or softcaps its logits in the CausalLM forward (Gemma 2's
    final_logit_softcapping, Cohere's logit_scale) would need a flag in its ArchSpec first."""
    return type(head) is nn.Linear and head.weight.device.type != "meta" and not getattr(model, "hf_device_map", None)


def reference_terms(head: nn.Linear, lp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sum p log p, W^T p and b . p of log-probabilities ``lp`` ([T, V]) under ``head``.  ``p`` is
    renormalized: float32's log-softmax leaves its exp summing to 1 +- 2e-5, harmless where each
    token's log-ratio is weighted by p, but the identity weighs the ~20-nat logsumexp by 1 and
    h . W^T p by the sum of p, so that slack alone would bias the KL by ~4e-4 nats."""
    p = lp.exp()
    p = p / p.sum(-1, keepdim=True)
    w, b = head.weight, head.bias
    u = torch.zeros(lp.shape[0], w.shape[1], dtype=torch.float32, device=lp.device)
    for a in range(0, w.shape[0], VOCAB_CHUNK):
        u += p[:, a : a + VOCAB_CHUNK] @ w[a : a + VOCAB_CHUNK].float()
    pb = p @ b.float() if b is not None else torch.zeros(lp.shape[0], device=lp.device)
    # xlogy: a token below exp(-103) has p = 0 in float32, and 0 * log 0 must count 0, not NaN
    return torch.xlogy(p, p).sum(-1), u, pb


def kl_by_identity(
    head: nn.Linear, h: torch.Tensor, negent: torch.Tensor, u: torch.Tensor, pb: torch.Tensor, logits=None
) -> torch.Tensor:
    """Per-position KL(reference || model) from the model's final hidden states ``h`` ([T, H]) and
    the reference's ``reference_terms`` (``logits``: the model's float32 logits, when already made)."""
    z = head_logits(head, h) if logits is None else logits
    return (negent - (h.float() * u).sum(-1) - pb + torch.logsumexp(z, -1)).clamp_min(0.0)


class LinearHeadReference:
    """The reference's distribution at each position, a hidden state wide (module docstring):
    ``negent`` = sum p log p, ``u`` = W^T p and ``pb`` = b . p, per position."""

    def __init__(self, head: nn.Linear, finals: list[torch.Tensor]):
        self.head = head
        terms = [reference_terms(head, torch.log_softmax(head_logits(head, h), -1)) for h in finals]
        self.negent, self.u, self.pb = (torch.stack(t) for t in zip(*terms))

    def kl(self, row: int, cols: slice, h: torch.Tensor) -> torch.Tensor:
        """Per-position KL(reference || model) of the model's final hidden states ``h`` ([T, H]) at
        sequence ``row``, positions ``cols``."""
        return kl_by_identity(self.head, h, self.negent[row, cols], self.u[row, cols], self.pb[row, cols])


class FullReference:
    """Full log-probabilities (a head that is not one linear map: its logits are not W h + b)."""

    def __init__(self, head, finals: list[torch.Tensor]):
        self.head = head
        self.ref = torch.stack([torch.log_softmax(head(h).float(), -1) for h in finals])

    def kl(self, row: int, cols: slice, h: torch.Tensor) -> torch.Tensor:
        return kl_from_logits(self.ref[row, cols], self.head(h))


class CalibrationLoss:
    def __init__(self, model, arch, input_ids: torch.Tensor, device: torch.device, batch_size: int, timer) -> None:
        self.model, self.arch, self.device, self.timer = model, arch, device, timer
        self.head = _resolve(model, arch.output_head)
        self.batches = [input_ids[i : i + batch_size].to(device) for i in range(0, len(input_ids), batch_size)]
        form = LinearHeadReference if linear_head(model, self.head) else FullReference
        with torch.no_grad(), timer.phase("forward", device):
            self.refs = [form(self.head, list(self._final(b, None))) for b in self.batches]
        self.inputs: list[list[torch.Tensor]] = []
        self.refresh()

    def _final(self, ids: torch.Tensor | None, hidden: torch.Tensor | None, tail=None) -> torch.Tensor:
        """Normed last hidden states of the model (or of its stack with ``tail`` as the blocks, fed
        ``hidden``)."""
        kw = {"input_ids": ids} if ids is not None else {"inputs_embeds": hidden}
        with temporary_stack(self.model, self.arch, tail) if tail is not None else nullcontext():
            return base_model(self.model, self.arch)(**kw, use_cache=False).last_hidden_state

    def refresh(self) -> None:
        """Recompute the hidden states entering each current layer (after the stack changed)."""
        with self.timer.phase("forward", self.device):
            self.inputs = [layer_inputs(self.model, self.arch, b) for b in self.batches]

    def refresh_from(self, pos: int) -> None:
        """After the stack changed from ``pos`` on only (layer ``pos`` removed or replaced), recompute
        the hidden states from there: the ones entering layers before ``pos`` are unchanged."""
        layers = list(get_layers(self.model, self.arch))
        with torch.no_grad(), self.timer.phase("forward", self.device):
            for i, inputs in enumerate(self.inputs):
                if pos < len(layers):
                    with temporary_stack(self.model, self.arch, layers[pos:]):
                        captured = layer_inputs(self.model, self.arch, None, hidden=inputs[pos])
                else:
                    captured = [inputs[pos]]
                self.inputs[i] = inputs[:pos] + captured

    def kl_sum(
        self, pos: int, tail: list[nn.Module], rows: slice = slice(None), prefix: int | None = None
    ) -> tuple[float, int]:
        """(summed KL, positions) when the blocks from ``pos`` on are replaced by ``tail``, on the
        calibration sequences ``rows`` of every batch, and on their first ``prefix`` positions only
        when given (the model is causal, so a prefix is exactly the start of the full run)."""
        total, count = 0.0, 0
        cols = slice(None) if prefix is None else slice(0, prefix)
        with torch.no_grad(), self.timer.phase("forward", self.device):
            for inputs, ref in zip(self.inputs, self.refs):
                hidden = inputs[pos][rows, cols]
                if hidden.shape[0] == 0:
                    continue
                picked = range(len(inputs[pos]))[rows]
                for row, h in zip(picked, self._final(None, hidden, tail)):
                    kl = ref.kl(row, cols, h)
                    total += float(kl.sum())
                    count += kl.numel()
        return total, count

    def loss_from(self, pos: int, tail: list[nn.Module]) -> float:
        """Mean KL when the blocks from ``pos`` on are replaced by ``tail``."""
        total, count = self.kl_sum(pos, tail)
        return total / count

    def current_loss(self) -> float:
        layers = list(get_layers(self.model, self.arch))
        return self.loss_from(0, layers)
