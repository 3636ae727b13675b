"""Calibration loss of a candidate stack: KL(original || candidate) on calibration tokens.

The engine caches the hidden state entering every current layer, so a candidate that changes
the stack from position p on is scored by running only layers p.. (the "reuse the hidden
states entering the fused layer" rule), not the whole model.  The output head and its
log-softmax, the widest step (49,152 or 128,256 columns per token), run one calibration sequence
at a time, so their temporaries stay a sequence's worth however many sequences score.
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


class CalibrationLoss:
    def __init__(self, model, arch, input_ids: torch.Tensor, device: torch.device, batch_size: int, timer) -> None:
        self.model, self.arch, self.device, self.timer = model, arch, device, timer
        self.head = _resolve(model, arch.output_head)
        self.batches = [input_ids[i : i + batch_size].to(device) for i in range(0, len(input_ids), batch_size)]
        with torch.no_grad(), timer.phase("forward", device):
            self.ref_logp = [
                torch.stack([torch.log_softmax(self.head(h).float(), -1) for h in self._final(b, None)])
                for b in self.batches
            ]
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
            for inputs, ref in zip(self.inputs, self.ref_logp):
                hidden, r = inputs[pos][rows, cols], ref[rows, cols]
                if hidden.shape[0] == 0:
                    continue
                for h, rr in zip(self._final(None, hidden, tail), r):
                    kl = kl_from_logits(rr, self.head(h))
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
