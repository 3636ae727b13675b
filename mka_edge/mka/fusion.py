"""Layer fusion as linear combinations of the original blocks.

Every layer of a merged model is sum_i c_i * theta_i over the original blocks (fusing two
layers with alpha mixes their coefficient vectors; removal drops a layer). Keeping plans in this
form makes a trajectory tiny to cache and exact to replay on the original weights.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from ..models.offload import is_dispatched, realize_offloaded

Composition = list[dict[int, float]]  # one {original layer index: coefficient} per new layer


def identity(n_layers: int) -> Composition:
    return [{i: 1.0} for i in range(n_layers)]


def fuse(comp: Composition, pos: int, alpha: float) -> Composition:
    """Fuse layers ``pos`` and ``pos+1``: theta = alpha * theta_pos + (1 - alpha) * theta_{pos+1}."""
    a, b = comp[pos], comp[pos + 1]
    mixed: dict[int, float] = {}
    for src, w in ((a, alpha), (b, 1.0 - alpha)):
        for i, c in src.items():
            if w * c != 0.0:
                mixed[i] = mixed.get(i, 0.0) + w * c
    return comp[:pos] + [dict(sorted(mixed.items()))] + comp[pos + 2 :]


def remove(comp: Composition, pos: int) -> Composition:
    return comp[:pos] + comp[pos + 1 :]


def keep_only(n_layers: int, removed: Sequence[int]) -> Composition:
    gone = set(removed)
    return [{i: 1.0} for i in range(n_layers) if i not in gone]


def _check_block(layer: nn.Module, names: Sequence[str]) -> None:
    have = {n for n, _ in layer.named_parameters()}
    missing, extra = set(names) - have, have - set(names)
    if missing or extra:
        raise RuntimeError(
            f"architecture table disagrees with the model block: missing {sorted(missing)}, unlisted {sorted(extra)}"
        )


@torch.no_grad()
def realize_layer(originals: Sequence[nn.Module], coeffs: dict[int, float], names: Sequence[str]) -> nn.Module:
    """The block for one composition entry; a lone coefficient of 1 reuses the original module."""
    items = list(coeffs.items())
    if len(items) == 1 and items[0][1] == 1.0:
        return originals[items[0][0]]
    base = originals[items[0][0]]
    _check_block(base, names)
    if is_dispatched(base):  # placed by accelerate (--max-memory): weights may be offloaded (meta here)
        return realize_offloaded(originals, items, names)
    new = copy.deepcopy(base)
    params = dict(new.named_parameters())
    for name in names:
        acc = torch.zeros_like(params[name], dtype=torch.float32)
        for idx, c in items:
            acc += c * dict(originals[idx].named_parameters())[name].float()
        params[name].copy_(acc.to(params[name].dtype))
    return new


def realize(originals: Sequence[nn.Module], comp: Composition, names: Sequence[str]) -> list[nn.Module]:
    return [realize_layer(originals, c, names) for c in comp]


def describe(comp: Composition) -> list[dict]:
    """Readable form for logs: which original layers went into each new layer, with which weights."""
    return [
        {"layer": j, "sources": [int(i) for i in c], "weights": [round(float(w), 6) for w in c.values()]}
        for j, c in enumerate(comp)
    ]
