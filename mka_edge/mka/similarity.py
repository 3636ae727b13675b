"""Layer similarity as a normalized mutual information of discretized diffusion embeddings.

Why discretize: continuous k-NN entropy estimates (the public code) can be zero or negative,
which breaks I / sqrt(H H). Seeded k-means labels over the same samples give a well-defined NMI
with S_ll = 1, symmetry, and values near 0 for independent embeddings.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, seed: int, n_init: int = 4, iters: int = 50) -> torch.Tensor:
    """Labels from seeded k-means++ (best of ``n_init`` by inertia), on ``x``'s device."""
    x = x.double()
    n = x.shape[0]
    k = min(k, n)
    g = torch.Generator(device="cpu").manual_seed(seed)
    best, best_inertia = None, float("inf")
    for _ in range(n_init):
        first = int(torch.randint(n, (1,), generator=g))
        centers = [x[first]]
        d2 = ((x - centers[0]) ** 2).sum(1)
        for _c in range(1, k):
            probs = (d2 / d2.sum().clamp_min(1e-30)).cpu()
            if not torch.isfinite(probs).all() or probs.sum() <= 0:
                probs = torch.full((n,), 1.0 / n, dtype=torch.float64)
            idx = int(torch.multinomial(probs, 1, generator=g))
            centers.append(x[idx])
            d2 = torch.minimum(d2, ((x - x[idx]) ** 2).sum(1))
        c = torch.stack(centers)
        for _it in range(iters):
            labels = torch.cdist(x, c).argmin(1)
            new_c = torch.zeros_like(c).index_add_(0, labels, x)
            counts = torch.bincount(labels, minlength=k).to(x.dtype)
            empty = counts == 0
            new_c = torch.where(empty[:, None], c, new_c / counts.clamp_min(1)[:, None])
            if torch.allclose(new_c, c):
                break
            c = new_c
        labels = torch.cdist(x, c).argmin(1)
        inertia = float(((x - c[labels]) ** 2).sum())
        if inertia < best_inertia:
            best, best_inertia = labels, inertia
    return best


@torch.no_grad()
def nmi_matrix(labels: torch.Tensor, k: int) -> torch.Tensor:
    """Pairwise NMI = I(a; b) / sqrt(H(a) H(b)) for label rows ``labels`` [L, N]."""
    L, n = labels.shape
    onehot = torch.nn.functional.one_hot(labels, k).double()  # [L, N, k]
    joint = torch.einsum("anx,bny->abxy", onehot, onehot) / n  # [L, L, k, k]
    pa = joint.sum(3)  # [L, L, k]
    pb = joint.sum(2)
    outer = pa[..., :, None] * pb[..., None, :]
    nz = joint > 0
    mi = torch.where(
        nz, joint * (torch.log(joint.clamp_min(1e-300)) - torch.log(outer.clamp_min(1e-300))), torch.zeros_like(joint)
    ).sum((2, 3))
    p = onehot.mean(1)  # [L, k]
    h = -(torch.where(p > 0, p * torch.log(p.clamp_min(1e-300)), torch.zeros_like(p))).sum(1)
    denom = torch.sqrt(h[:, None] * h[None, :])
    s = torch.where(denom > 0, mi / denom.clamp_min(1e-300), torch.zeros_like(mi))
    s = s.clamp(0.0, 1.0)
    s = (s + s.T) / 2
    s.fill_diagonal_(1.0)
    return s
