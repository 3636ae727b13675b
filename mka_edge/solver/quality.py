"""Predicted quality loss of a (K merged layers, quant type) pair.

Rule: KL(K, q) = KL_merge(K) + KL_quant(q), both in nats against the unmerged reference.
KL_merge(K) is the held-out KL along the cached merge trajectory; KL_quant(q) is measured on the
unmerged model quantized by llama.cpp (quant_probe).  Checked on SmolLM2 (docs/results.md, GGUF
speed table): merged-then-quantized KL is within 0.02 nats of the sum for Q8_0 and Q4_K_M at
K = 6 and 12, and 0.13 nats under it for Q4_0 at K = 12 (5%), so the rule slightly
underestimates the loss of the coarsest types on heavily merged models.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

from ..cache import atomic_write_text, cache_root, entry_lock, stable_hash
from ..merging import heldout_along, heldout_reference, step_quality
from ..mka.attention import unit_bytes
from ..mka.trajectory import trajectory
from ..produce import produce

CURVE_VERSION = 3  # 2: batched k-means (similarity, so mka trajectories, changed); 3: attn_removed, bytes_saved


def reference_bytes_saved(ctx, step: dict) -> int:
    """Reference bytes (F16 weights + f16 KV cache at settings.ref_context) a step's stack saves
    against the original: sleb-attn records it; for the other methods it is the bytes of the
    original layers that are gone (K layers of the same size in a homogeneous stack, fusions too)."""
    if "bytes_saved" in step:
        return int(step["bytes_saved"])
    kept = {i for c in step["composition"] for i in c}
    sizes = [unit_bytes(b, ctx.arch, ctx.model.config, ctx.settings.ref_context) for b in ctx.originals]
    return sum(a + r for i, (a, r) in enumerate(sizes) if i not in kept)


def merge_curve(
    ctx,
    method: str,
    k_max: int,
    alpha: str = "calibrated",
    chunks: int = 2,
    progress: bool = True,
    log=None,
    useful_below: float | None = None,
) -> dict:
    """{'kl': [KL at K=0..], 'ppl': [...], 'kept': [[original layers kept at K], ...], 'attn_removed':
    [[original layers kept without attention at K], ...], 'bytes_saved': [reference bytes at K], ...,
    'complete': bool}.  For sleb-attn K counts removal units (an attention sub-block or a layer), so
    'bytes_saved', not K, says how much smaller the model is; the other methods' 'attn_removed' are
    empty and their 'bytes_saved' the bytes of the K layers gone.  Reference bytes: F16 weights
    (2 a parameter) plus the f16 KV cache at ``ctx.settings.ref_context`` tokens (``ref_context``).

    ``useful_below``: only a merge whose held-out KL is below this can change the plan (see
    ``needed_merge_kl``).  The trajectory then stops after the first K at or above it and the curve
    ends there ('complete': False): held-out KL along a greedy trajectory grows with K (every
    curve in docs/results.md does), so the K beyond cannot beat it either.  0 or less: no K can,
    and nothing is computed.  ``auto`` always runs to k_max (its per-K pick needs every method)."""
    key = stable_hash(
        {
            "model": ctx.lm.fingerprint,
            "settings": ctx.settings.key(),
            "method": method,
            "alpha": alpha,
            "k_max": k_max,
            "chunks": chunks,
            "ref_context": ctx.settings.ref_context,
            "v": CURVE_VERSION,
        }
    )
    path = cache_root() / "curves" / f"{method}-{key[:20]}.json"
    stop = None if method == "auto" else useful_below
    hit = _cached_curve(path, stop)
    if hit is not None:
        return hit
    if stop is not None and stop <= 0:
        return _curve_base(ctx, method, alpha, chunks) | {"complete": False, "cached": False}
    with entry_lock(path, f"the merge-quality curve of {method}"):
        hit = _cached_curve(path, stop)  # written while this process waited?
        if hit is not None:
            return hit
        return _compute_curve(ctx, path, method, k_max, alpha, chunks, stop, progress, log)


def _cached_curve(path: Path, stop: float | None) -> dict | None:
    """The cached curve when it answers the question: complete, or ending at a K whose held-out KL
    already reaches ``stop``; else None."""
    if not path.is_file():
        return None
    curve = json.loads(path.read_text())
    if curve.get("complete", True) or (stop is not None and curve["kl"][-1] >= stop):
        return curve | {"cached": True}
    return None


def _curve_base(ctx, method: str, alpha: str, chunks: int) -> dict:
    """The curve at K = 0 (the unmerged model), which every curve starts from."""
    return {
        "method": method,
        "alpha": alpha,
        "chunks": chunks,
        "kl": [0.0],
        "ppl": [None],
        "kept": [list(range(ctx.n_original))],
        "attn_removed": [[]],
        "bytes_saved": [0],
        "ref_context": ctx.settings.ref_context,
        "step_methods": [None],
    }


def _compute_curve(
    ctx,
    path: Path,
    method: str,
    k_max: int,
    alpha: str,
    chunks: int,
    stop: float | None,
    progress: bool,
    log: Callable[[str], None] | None,
) -> dict:
    """Run the trajectory and score each step on held-out text; written to ``path``.  Called with
    the entry's lock held (``merge_curve``), so two processes never score the same steps."""
    base = _curve_base(ctx, method, alpha, chunks)
    if log:
        log(
            f"merge-quality curve for {method} up to K={k_max} is not cached yet: computing it"
            + ("" if stop is None else f" (only while a merge's held-out KL stays below {stop:.3f} nats)")
        )
    if stop is None:
        traj = trajectory(ctx, method, k_max, alpha, progress=progress)
        steps = traj["steps"][:k_max]
        quality = heldout_along(ctx, steps, chunks, progress)
    else:
        ref = heldout_reference(ctx, chunks)
        by_k: dict[int, dict] = {}

        def enough(step: dict) -> bool:
            by_k[step["k"]] = step_quality(ctx, ref, step)
            return by_k[step["k"]]["kl"] >= stop

        steps = trajectory(ctx, method, k_max, alpha, progress=progress, enough=enough)["steps"]
        quality = [by_k[st["k"]] for st in steps]
    curve = base | {
        "kl": [0.0] + [q["kl"] for q in quality],
        "ppl": [None] + [q["ppl"] for q in quality],
        "kept": base["kept"] + [sorted({min(c) for c in st["composition"]}) for st in steps],
        "attn_removed": base["attn_removed"] + [sorted(st.get("attn_removed", ())) for st in steps],
        "bytes_saved": base["bytes_saved"] + [reference_bytes_saved(ctx, st) for st in steps],
        "step_methods": [None] + [st.get("method", method) for st in steps],
        "complete": len(steps) >= k_max,
    }
    atomic_write_text(path, json.dumps(curve))
    return curve | {"cached": False}


def needed_merge_kl(unmerged: list, at_k_max: list) -> float | None:
    """The held-out merge KL below which a merged plan could still beat the best unmerged one.

    Rule: a merged plan (K, q) is predicted at KL_merge(K) + KL(q) and must fit at K; it beats the
    best feasible unmerged plan (predicted u) only if KL_merge(K) < u - KL(q).  Memory and speed
    only improve with K, so the types that can fit at all are those feasible at k_max, and the
    bound is u - min KL(q) over them.  ``unmerged`` / ``at_k_max``: the feasible candidates at
    K = 0 and at k_max (search.Candidate; K = 0 ones carry only the quant's KL).  None: no unmerged
    plan is feasible, so the whole curve is needed."""
    if not unmerged:
        return None
    u = min(c.kl for c in unmerged)
    return u - min((c.kl for c in at_k_max), default=u)


def predict_kl(curve: dict, probe: dict, k: int, quant: str) -> float:
    return float(curve["kl"][k] + probe[quant]["kl"])


def heal_points(k_max: int, points: int) -> list[int]:
    """The K values a healed curve heals: ``points`` evenly spaced up to k_max (k_max always
    among them); every K when points is 0 or not below k_max."""
    if points <= 0 or points >= k_max:
        return list(range(1, k_max + 1))
    return sorted({max(1, round(k_max * i / points)) for i in range(1, points + 1)})


def interpolate_healed(unhealed: list[float], measured: dict[int, float]) -> list[float]:
    """Healed KL at every K from heals at a few: the healed/unhealed ratio is interpolated
    linearly in K between healed points and held flat beyond them.  Why a ratio: on SmolLM2 a
    fixed heal removes a steady share of the merge's KL (0.63-0.70 across K = 3..12 for sleb at
    20 steps, docs/results.md), so the ratio varies slowly while the KL itself grows fast."""
    ks = sorted(measured)
    ratio = {k: measured[k] / unhealed[k] if unhealed[k] > 0 else 1.0 for k in ks}
    out = [0.0]
    for k in range(1, len(unhealed)):
        if k in measured:
            out.append(measured[k])
            continue
        lo = max((x for x in ks if x < k), default=None)
        hi = min((x for x in ks if x > k), default=None)
        if lo is None or hi is None:
            r = ratio[hi if lo is None else lo]
        else:
            r = ratio[lo] + (ratio[hi] - ratio[lo]) * (k - lo) / (hi - lo)
        out.append(unhealed[k] * r)
    return out


def healed_curve(
    ctx, curve: dict, method: str, alpha: str, heal_cfg, points: int = 4, progress: bool = True, log=None
) -> dict:
    """Held-out KL after healing at every K of ``curve``: the merged models at ``points`` values
    of K (heal_points) are written, healed with ``heal_cfg`` and measured on the curve's held-out
    chunks; the K between are interpolated (interpolate_healed).  Costs ``points`` heals (K heals
    with points=0); cached by model, merge settings, heal settings and points."""
    k_max = len(curve["kl"]) - 1
    cfg = replace(heal_cfg, heldout_chunks=curve.get("chunks", 2))
    ks = heal_points(k_max, points)
    key = stable_hash(
        {
            "model": ctx.lm.fingerprint,
            "settings": ctx.settings.key(),
            "method": method,
            "alpha": alpha,
            "k_max": k_max,
            "heal": asdict(cfg),
            "points": ks,
            "v": CURVE_VERSION,
        }
    )
    path = cache_root() / "curves" / f"healed-{method}-{key[:20]}.json"
    if path.is_file():
        return json.loads(path.read_text()) | {"cached": True}
    with entry_lock(path, f"the healed quality curve of {method}"):
        if path.is_file():  # written while this process waited?
            return json.loads(path.read_text()) | {"cached": True}
        return _compute_healed(ctx, curve, path, method, alpha, cfg, ks, progress, log)


def _compute_healed(
    ctx,
    curve: dict,
    path: Path,
    method: str,
    alpha: str,
    cfg,
    ks: list[int],
    progress: bool,
    log: Callable[[str], None] | None,
) -> dict:
    """Heal the merged models at ``ks`` and interpolate; called with the entry's lock held
    (``healed_curve``): a heal is the most expensive thing a plan does."""
    k_max = len(curve["kl"]) - 1
    if log:
        log(
            f"healed quality curve ({cfg.steps} steps at K = {', '.join(map(str, ks))}; the K between interpolated) "
            "is not cached yet: computing it"
        )
    measured, ppl = {}, {}
    with tempfile.TemporaryDirectory(prefix="mka-edge-heal-curve-") as tmp:
        for k in ks:
            rec = produce(ctx, k, method, alpha, Path(tmp) / f"k{k}", cfg, progress=progress, log=lambda m: None).heal
            after, before = rec["heldout_after"]["kl"], rec["heldout_before"]["kl"]
            if rec.get("teacher", {}).get("form", "live") == "live":
                measured[k] = after
            else:  # a QLoRA heal's KL is the top-k bound: its before/after ratio onto the curve's full KL
                measured[k] = curve["kl"][k] * (after / before if before > 0 else 1.0)
            ppl[k] = rec["heldout_after"]["ppl"]
    out = {
        "kl": interpolate_healed(curve["kl"], measured),
        "ppl": [None] + [ppl.get(k) for k in range(1, k_max + 1)],
        "healed_at": ks,
        "steps": cfg.steps,
        "train": cfg.train,
        "unhealed_kl": curve["kl"],
    }
    atomic_write_text(path, json.dumps(out))
    return out | {"cached": False}
