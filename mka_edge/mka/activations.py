"""Every layer's hidden states from one forward pass per batch, kept only at sampled positions.

Memory stays bounded: for each layer we keep ``positions`` vectors (plus the last token of each
sequence for the angular baseline), never the full activations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layers import base_model, get_layers


@dataclass
class Activations:
    states: torch.Tensor  # [L+1, N, d]: states[0] enters block 0, states[l+1] leaves block l
    # (N in the order of the positions passed to ``collect``)
    last_token: torch.Tensor  # [L+1, B, d]: same, at the last position of each sequence

    @property
    def num_layers(self) -> int:
        return self.states.shape[0] - 1


def sample_positions(batch: int, seq_len: int, n: int, seed: int) -> torch.Tensor:
    """``n`` distinct (sequence, position) flat indices in seeded random order, never position 0.

    Position 0 carries outsized activations ("attention sink") that would dominate distances.
    The order is random so consecutive slices are independent subsamples.
    """
    usable = torch.arange(batch * seq_len).view(batch, seq_len)[:, 1:].reshape(-1)
    n = min(n, usable.numel())
    g = torch.Generator().manual_seed(seed)
    return usable[torch.randperm(usable.numel(), generator=g)[:n]]


@torch.no_grad()
def collect(
    model,
    arch,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    batch_size: int,
    device: torch.device,
    timer,
    dtype: torch.dtype = torch.float32,
) -> Activations:
    """Hidden states at ``positions`` (flat sequence*T+t indices), written straight into one
    preallocated [L+1, N, d] tensor in the caller's order: no per-batch pieces to concatenate,
    stack or reorder (those copies tripled the peak: 3 x 292 MB for SmolLM2's similarity).
    ``dtype``: of the kept states; the similarity keeps float16 (its diffusion maps work on
    distances, in float64, and 8 x 512 positions of every layer are its largest buffer)."""
    layers = get_layers(model, arch)
    L = len(layers)
    B, T = input_ids.shape
    width = int(model.config.hidden_size)
    states = torch.empty(L + 1, len(positions), width, device=device, dtype=dtype)
    last = torch.empty(L + 1, B, width, device=device)
    state: dict = {"src": None, "dst": None, "rows": None}

    def keep(idx: int, hs: torch.Tensor) -> None:
        hs = hs.to(device)  # a model spread over GPUs by accelerate (--max-memory) runs each block on its own
        flat = hs.reshape(-1, hs.shape[-1])
        states[idx, state["dst"]] = flat[state["src"]].to(dtype)
        last[idx, state["rows"]] = hs[:, -1, :].float()

    def pre(i):
        def f(_m, args, kwargs):
            if i == 0:
                keep(0, args[0] if args else kwargs["hidden_states"])

        return f

    def post(i):
        def f(_m, _a, output):
            keep(i + 1, output[0] if isinstance(output, tuple) else output)

        return f

    base = base_model(model, arch)
    handles = [layers[0].register_forward_pre_hook(pre(0), with_kwargs=True)]
    handles += [layer.register_forward_hook(post(i)) for i, layer in enumerate(layers)]
    try:
        for start in range(0, B, batch_size):
            chunk = input_ids[start : start + batch_size].to(device)
            lo, hi = start * T, (start + chunk.shape[0]) * T
            mask = (positions >= lo) & (positions < hi)
            state["src"] = (positions[mask] - lo).to(device)
            state["dst"] = torch.nonzero(mask)[:, 0].to(device)
            state["rows"] = slice(start, start + chunk.shape[0])
            with timer.phase("forward", device):
                base(input_ids=chunk, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return Activations(states=states, last_token=last)
