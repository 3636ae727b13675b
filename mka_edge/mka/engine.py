"""Calibration loss of a candidate stack: KL(original || candidate) on calibration tokens.

The engine caches the hidden state entering every current layer, so a candidate that changes
the stack from position p on is scored by running only layers p.. (the "reuse the hidden
states entering the fused layer" rule), not the whole model.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import get_layers, layer_inputs, logits_from


def kl_from_logits(ref_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-position KL(ref || model) in nats."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1)


class CalibrationLoss:
    def __init__(self, model, arch, input_ids: torch.Tensor, device: torch.device, batch_size: int, timer) -> None:
        self.model, self.arch, self.device, self.timer = model, arch, device, timer
        self.batches = [input_ids[i : i + batch_size].to(device) for i in range(0, len(input_ids), batch_size)]
        with torch.no_grad(), timer.phase("forward", device):
            self.ref_logp = [
                torch.log_softmax(model(input_ids=b, use_cache=False).logits.float(), -1) for b in self.batches
            ]
        self.inputs: list[list[torch.Tensor]] = []
        self.refresh()

    def refresh(self) -> None:
        """Recompute the hidden states entering each current layer (after the stack changed)."""
        with self.timer.phase("forward", self.device):
            self.inputs = [layer_inputs(self.model, self.arch, b) for b in self.batches]

    def loss_from(self, pos: int, tail: list[nn.Module]) -> float:
        """Mean KL when the blocks from ``pos`` on are replaced by ``tail``."""
        total, count = 0.0, 0
        with torch.no_grad(), self.timer.phase("forward", self.device):
            for inputs, ref in zip(self.inputs, self.ref_logp):
                kl = kl_from_logits(ref, logits_from(self.model, self.arch, tail, inputs[pos]))
                total += float(kl.sum())
                count += kl.numel()
        return total / count

    def current_loss(self) -> float:
        layers = list(get_layers(self.model, self.arch))
        return self.loss_from(0, layers)
