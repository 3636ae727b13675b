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

from ..cache import atomic_write_text, cache_root, stable_hash

CURVE_VERSION = 1


def merge_curve(ctx, method: str, k_max: int, alpha: str = "calibrated", chunks: int = 2,
                progress: bool = True, log=None) -> dict:
    """{'kl': [KL at K=0..k_max], 'ppl': [...], 'kept': [[original layers kept at K], ...], 'steps': ...}."""
    from ..merging import heldout_along
    from ..mka.trajectory import trajectory

    key = stable_hash({"model": ctx.lm.fingerprint, "settings": ctx.settings.key(), "method": method,
                       "alpha": alpha, "k_max": k_max, "chunks": chunks, "v": CURVE_VERSION})
    path = cache_root() / "curves" / f"{method}-{key[:20]}.json"
    if path.is_file():
        return json.loads(path.read_text()) | {"cached": True}
    if log:
        log(f"merge-quality curve for {method} up to K={k_max} is not cached yet: computing it")
    traj = trajectory(ctx, method, k_max, alpha, progress=progress)
    steps = traj["steps"][:k_max]
    quality = heldout_along(ctx, steps, chunks, progress)
    curve = {"method": method, "alpha": alpha, "chunks": chunks,
             "kl": [0.0] + [q["kl"] for q in quality],
             "ppl": [None] + [q["ppl"] for q in quality],
             "kept": [list(range(ctx.n_original))] + [sorted({min(c) for c in st["composition"]}) for st in steps],
             "step_methods": [None] + [st.get("method", method) for st in steps]}
    atomic_write_text(path, json.dumps(curve))
    return curve | {"cached": False}


def predict_kl(curve: dict, probe: dict, k: int, quant: str) -> float:
    return float(curve["kl"][k] + probe[quant]["kl"])


def healed_curve(ctx, curve: dict, method: str, alpha: str, heal_cfg, progress: bool = True, log=None) -> dict:
    """Held-out KL after healing, at every K of ``curve``: each merged model of the trajectory is
    written, healed with ``heal_cfg`` and measured on the curve's held-out chunks.  Costs K heals;
    cached by model, merge settings and heal settings."""
    import tempfile
    from dataclasses import asdict, replace
    from pathlib import Path

    from ..heal.distill import heal
    from ..merging import merge

    k_max = len(curve["kl"]) - 1
    cfg = replace(heal_cfg, heldout_chunks=curve.get("chunks", 2))
    key = stable_hash({"model": ctx.lm.fingerprint, "settings": ctx.settings.key(), "method": method, "alpha": alpha,
                       "k_max": k_max, "heal": asdict(cfg), "v": CURVE_VERSION})
    path = cache_root() / "curves" / f"healed-{method}-{key[:20]}.json"
    if path.is_file():
        return json.loads(path.read_text()) | {"cached": True}
    if log:
        log(f"healed quality curve ({cfg.steps} steps at each K up to {k_max}) is not cached yet: computing it")
    kl, ppl = [0.0], [None]
    with tempfile.TemporaryDirectory(prefix="mka-edge-heal-curve-") as tmp:
        for k in range(1, k_max + 1):
            merged = Path(tmp) / f"k{k}"
            merge(ctx, k, method, alpha, merged, heldout=0, progress=False)
            rec = heal(str(merged), Path(tmp) / f"k{k}-healed", cfg, progress=progress, log=lambda m: None)
            kl.append(rec["heldout_after"]["kl"])
            ppl.append(rec["heldout_after"]["ppl"])
    out = {"kl": kl, "ppl": ppl, "steps": cfg.steps, "train": cfg.train, "unhealed_kl": curve["kl"]}
    atomic_write_text(path, json.dumps(out))
    return out | {"cached": False}
