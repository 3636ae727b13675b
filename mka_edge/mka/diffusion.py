"""Diffusion-map embedding of one layer's sampled hidden states (MKA step 2)."""

from __future__ import annotations

import torch


@torch.no_grad()
def diffusion_map(x: torch.Tensor, dims: int = 8, t: int = 1) -> torch.Tensor:
    """Embed the rows of ``x`` [N, d] into ``dims`` diffusion coordinates.

    Gaussian affinity W = exp(-|xi - xj|^2 / sigma^2) with sigma the median pairwise distance
    (a data-driven bandwidth, unlike the public code's fixed exp(-(D/8)^0.5)). The random-walk
    operator D^-1 W is diagonalised through its symmetric twin D^-1/2 W D^-1/2 (stable ``eigh``);
    the trivial first eigenvector is skipped and the rest are scaled by lambda^t.
    Runs in float64 on whatever device ``x`` is on.
    """
    x = x.double()
    dist = torch.cdist(x, x)
    n = dist.shape[0]
    off = dist[~torch.eye(n, dtype=torch.bool, device=x.device)]
    sigma = off.median().clamp_min(1e-12)
    w = torch.exp(-((dist / sigma) ** 2))
    deg = w.sum(1)
    inv_sqrt = deg.rsqrt()
    sym = inv_sqrt[:, None] * w * inv_sqrt[None, :]
    evals, evecs = torch.linalg.eigh(sym)  # ascending
    evals, evecs = evals.flip(0), evecs.flip(1)
    psi = inv_sqrt[:, None] * evecs  # right eigenvectors of D^-1 W
    k = min(dims, n - 1)
    return psi[:, 1 : k + 1] * evals[1 : k + 1].clamp_min(0) ** t
