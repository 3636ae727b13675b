"""Batched k-means against the one-problem-at-a-time loop it replaced (issue 14, GPU speed).

The input has the shape of what one ``MergeContext.similarity`` call clusters: ``layers`` x
``repeats`` problems of ``points`` coordinates in ``dims`` dimensions (synthetic, see
``layered_embeddings``), ``k`` clusters, 4 restarts each.  The old loop (copied below as it
was) runs each problem and restart alone with a host sync every Lloyd step; ``kmeans_batched``
runs them all as one tensor computation.  Timed rounds alternate old and new (the machine may
be shared) and the best of each is reported.

Also reported: how much the adjacent-layer NMI (what the merge methods rank pairs by, averaged
over repeats as similarity() does) moves from old to new with the same per-problem seeds, next
to how much it moves within the old code from one seed to the next: the new random streams
should change it by no more than a reseed does.

    python bench/kmeans_batched.py --out bench/results/kmeans_batched.json
    python bench/kmeans_batched.py --device cuda --runs 3   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mka_edge.mka.similarity import kmeans_batched, nmi_matrix


@torch.no_grad()
def kmeans_old(x: torch.Tensor, k: int, seed: int, n_init: int = 4, iters: int = 50) -> torch.Tensor:
    """The single-problem k-means before issue 14, verbatim: the baseline."""
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


def layered_embeddings(layers: int, repeats: int, points: int, dims: int, seed: int) -> torch.Tensor:
    """[repeats, layers, points, dims]: stand-ins for diffusion coordinates, a mixture of 8
    Gaussians that drifts by a random walk over layers, so neighbours share structure without
    being equal (adjacent NMIs about 0.9, as on SmolLM2's 0.75-1.0).  Not real diffusion maps:
    240 eigendecompositions of 512 x 512 would take most of a minute on a small CPU."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(8, dims, generator=g, dtype=torch.float64) * 3
    member = torch.randint(0, 8, (repeats, points), generator=g)
    out = [centers[member] + torch.randn(repeats, points, dims, generator=g, dtype=torch.float64)]
    for _ in range(layers - 1):
        out.append(out[-1] + 0.6 * torch.randn(repeats, points, dims, generator=g, dtype=torch.float64))
    return torch.stack(out, 1)


def adjacent(labels: torch.Tensor, k: int) -> torch.Tensor:
    """Mean over repeats of the adjacent-layer NMI, from labels [repeats, layers, points]."""
    s = torch.stack([nmi_matrix(lab, k) for lab in labels]).mean(0)
    return s.diagonal(1)


def alternate_best(fns: list, runs: int) -> list[float]:
    """Best wall time of each function over ``runs`` rounds, the functions taking turns."""
    best = [float("inf")] * len(fns)
    for _ in range(runs):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--points", type=int, default=512)
    ap.add_argument("--dims", type=int, default=8, help="diffusion coordinates (k-means dimensions)")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", type=int, default=2, help="timed rounds; the best of each is reported")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=Path("bench/results/kmeans_batched.json"))
    args = ap.parse_args()
    dev = torch.device(args.device)
    reps, layers, k = args.repeats, args.layers, args.k
    emb = layered_embeddings(layers, reps, args.points, args.dims, args.seed).to(dev)
    flat = emb.flatten(0, 1)  # [reps * layers, points, dims], repeat-major as in similarity()

    def seeds(seed: int) -> list[int]:  # the per-problem seeds of MergeContext.similarity
        return [seed * 1009 + r * 31 + i for r in range(reps) for i in range(layers)]

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def old(seed: int = args.seed) -> torch.Tensor:
        out = torch.stack([kmeans_old(e, k, s) for e, s in zip(flat, seeds(seed), strict=True)])
        sync()
        return out.view(reps, layers, -1).cpu()

    def new(seed: int = args.seed, info: dict | None = None) -> torch.Tensor:
        out = kmeans_batched(flat, k, seeds(seed), info=info)
        sync()
        return out.view(reps, layers, -1).cpu()

    new()  # warm-up (kernels, allocator)
    t_old, t_new = alternate_best([old, new], args.runs)
    info: dict = {}
    a_old, a_new = adjacent(old(), k), adjacent(new(info=info), k)
    a_reseed = adjacent(old(args.seed + 1), k)
    change, reseed = (a_old - a_new).abs(), (a_old - a_reseed).abs()
    top = {name: a.argsort(descending=True)[:5].tolist() for name, a in [("old", a_old), ("new", a_new)]}
    result = {
        "shape": {"layers": layers, "repeats": reps, "points": args.points, "dims": args.dims, "k": k},
        "device": str(dev),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "runs": args.runs,
        "old_s": round(t_old, 4),
        "new_s": round(t_new, 4),
        "speedup": round(t_old / t_new, 2),
        "lloyd_iterations_batched": info["iterations"],
        "adjacent_nmi_mean": round(float(a_old.mean()), 4),
        "adjacent_nmi_old_vs_new_mean_abs": round(float(change.mean()), 5),
        "adjacent_nmi_old_vs_new_max_abs": round(float(change.max()), 5),
        "adjacent_nmi_old_reseed_mean_abs": round(float(reseed.mean()), 5),
        "adjacent_nmi_old_reseed_max_abs": round(float(reseed.max()), 5),
        "top5_adjacent": top,
    }
    print(f"k-means, {layers} layers x {reps} repeats x {args.points} points x {args.dims} dims, k={k}, {dev}")
    print(f"{'':26}{'seconds':>9}")
    print(f"{'old (per-problem loop)':26}{t_old:>9.3f}")
    print(f"{'new (kmeans_batched)':26}{t_new:>9.3f}")
    print(f"{'speedup':26}{t_old / t_new:>8.1f}x")
    print(f"adjacent-layer NMI, mean {a_old.mean():.3f}:{'mean |diff|':>14}{'max |diff|':>12}")
    print(f"{'  old vs new (same seeds)':40}{change.mean():>14.4f}{change.max():>12.4f}")
    print(f"{'  old vs old, next seed':40}{reseed.mean():>14.4f}{reseed.max():>12.4f}")
    print(f"top-5 adjacent pairs: old {top['old']}, new {top['new']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
