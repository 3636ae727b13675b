"""`mka-edge plan`: profile + model -> the (K, quant type) plan that fits, with the reason.

Nothing is exported: the merge-quality curve comes from the cached trajectory (computed, with
progress, if missing) and the quant costs from quantizing the unmerged model once per type.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from . import __version__
from .cache import atomic_write_text
from .errors import UserError
from .profiles import load_profile
from .solver.quant_prior import SOURCE as PRIOR_SOURCE


def prior_costs(ctx, quants: list[str]) -> dict:
    """Quant costs from llama.cpp's published Llama-3-8B table, sized for this model."""
    from .solver.quant_prior import PUBLISHED, prior_entry

    unknown = [q for q in quants if q not in PUBLISHED]
    if unknown:
        raise UserError(f"no published prior for {', '.join(unknown)}; use types from {', '.join(PUBLISHED)}")
    layers = ctx.originals
    block = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    total = sum(p.numel() for p in ctx.model.parameters())
    return {q: prior_entry(q, block, total - sum(block)) for q in quants}

PROBE_MAX_PARAMS = 3e9   # above this, quantizing every type to measure it costs more than the build
GGUF_QUANTS = ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K"]
# fp16 is left out by default: the CPU provider runs it upcast, with more memory than fp32 and no
# more speed (docs/results.md); it is for GPU/NPU devices; ask for it with --quants.
ONNX_QUANTS = ["fp32", "int8", "int4-mixed", "int4"]
# ONNX types mapped to the llama.cpp type with the nearest scheme, for the published prior.
ONNX_PRIOR_AS = {"fp32": "F16", "fp16": "F16", "int8": "Q8_0", "int4-mixed": "Q4_K_M", "int4": "Q4_0"}


def onnx_prior_costs(ctx, quants: list[str]) -> dict:
    """ONNX quant costs without measuring: bytes from each type's nominal bytes per weight, KL from
    llama.cpp's published table for the nearest llama.cpp scheme (a prior, labelled so)."""
    from exporters.onnx import onnx_quant

    from .solver.quant_prior import PUBLISHED

    block = [sum(p.numel() for p in layer.parameters()) for layer in ctx.originals]
    other = sum(p.numel() for p in ctx.model.parameters()) - sum(block)
    out = {}
    for q in quants:
        bpw = onnx_quant(q).bytes_per_weight
        out[q] = {"per_layer": [p * bpw for p in block], "repack_per_layer": [0.0] * len(block), "other": other * bpw,
                  "kl": PUBLISHED[ONNX_PRIOR_AS[q]][1], "resident_ratio": 1.0, "format": "onnx", "tensor_types": {},
                  "source": f"prior: llama.cpp {ONNX_PRIOR_AS[q]} figure"}
    return out


def make_plan(profile: str, model: str | None = None, **kw) -> dict:
    return plan_with_context(profile, model, **kw)[0]


def plan_with_context(profile: str, model: str | None = None, *, budget_mb: float | None = None, context: int | None = None,
              max_quality_loss: float | None = None, method: str = "sleb", alpha: str = "calibrated",
              k_max: int | None = None, quants: list[str] | None = None, progress: bool = True,
              merge_opts: dict | None = None, quality_prior: bool = False, heal=None, heal_points: int = 4,
              log=print) -> tuple[dict, object]:
    """The plan and the loaded merge context (build goes on to merge with it).  With ``heal``, the
    quality curve is the healed one, healed at ``heal_points`` values of K (0: every K)."""
    from .mka.context import build_context
    from .solver import speed
    from .solver.memory import DEFAULT_OVERHEAD_MB, Shape
    from .solver.quality import merge_curve
    from .solver.quant_probe import probe
    from .solver.search import choose, pareto
    from .solver.search import candidates as enumerate_candidates

    prof = load_profile(profile)
    onnx = prof.format == "onnx"
    budget = float(budget_mb if budget_mb is not None else prof.budget_mb)
    context = int(context or prof.context_length)
    max_kl = float(max_quality_loss if max_quality_loss is not None else prof.max_quality_loss)
    if budget <= 0 or context < 1:
        raise UserError("--budget-mb and --context must be positive")
    if onnx:
        from exporters.onnx import onnx_quant

        quants = [onnx_quant(q).name for q in (quants or ONNX_QUANTS)]
    else:
        from exporters.quant_types import quant_type

        quants = quants or GGUF_QUANTS
        for q in quants:
            if quant_type(q).needs_imatrix:
                raise UserError(f"{q} needs an importance matrix; plans use types that do not (drop it from --quants)")
    ctx = build_context(model=model, **(merge_opts or {}))
    n = ctx.n_original
    k_max = min(k_max if k_max is not None else min(8, n // 3), n - 1)
    curve = merge_curve(ctx, method, k_max, alpha, progress=progress, log=log)
    healed = None
    if heal is not None and heal.steps > 0:
        from .solver.quality import healed_curve

        healed = healed_curve(ctx, curve, method, alpha, heal, points=heal_points, progress=progress, log=log)
        curve = dict(curve, kl=healed["kl"])
    eff, eff_source = speed.efficiency(prof.format)
    n_params = sum(p.numel() for p in ctx.model.parameters())
    if n_params <= PROBE_MAX_PARAMS and not quality_prior:
        if onnx:
            from .solver.onnx_probe import probe_onnx

            log("measuring each ONNX quant type on this model in onnxruntime (cached after the first plan)")
            costs = probe_onnx(ctx.lm, quants, progress=progress, calibrate_speed=eff_source.startswith("default"))
            quant_source = "measured on this model (onnxruntime-genai builder + onnxruntime quantizer, held-out KL in onnxruntime)"
        else:
            log("measuring each quant type on this model with llama.cpp (cached after the first plan)")
            costs = probe(ctx.lm, quants, progress=progress, calibrate_speed=eff_source.startswith("default"))
            quant_source = "measured on this model (llama.cpp quantizer, held-out KL)"
    elif onnx:
        costs = onnx_prior_costs(ctx, quants)
        quant_source = f"prior: {PRIOR_SOURCE}, each ONNX type read as the nearest llama.cpp scheme; it does not transfer to every model"
    else:
        costs = prior_costs(ctx, quants)
        quant_source = f"prior: {PRIOR_SOURCE}; measured on Llama-3-8B, it does not transfer to every model"
    eff, eff_source = speed.efficiency(prof.format)
    shape = Shape.from_config(ctx.model.config)
    cands = enumerate_candidates(shape, curve["kl"], curve["kept"], costs, context=context, kv_type=prof.kv_cache_type,
                                 budget_mb=budget, bandwidth_gbps=prof.bandwidth_gbps, efficiency=eff,
                                 min_tps=prof.min_tokens_per_s, max_kl=max_kl, overhead_mb=DEFAULT_OVERHEAD_MB)
    ranked, reason = choose(cands, budget, prof.min_tokens_per_s, context)
    best = ranked[0]
    plan = {
        "mka_edge": __version__,
        "profile": prof.as_dict(),
        "model": {"spec": model or "smollm2-135m", "fingerprint": ctx.lm.fingerprint, "layers": n},
        "format": prof.format,
        "budget": {"memory_mb": budget, "context": context,
                   "kv_cache_type": "model I/O type (f32; f16 for fp16)" if onnx else prof.kv_cache_type,
                   "min_tokens_per_s": prof.min_tokens_per_s, "max_quality_loss": max_kl},
        "choice": {"method": method, "alpha": alpha, "k": best.k, "quant": best.quant, "layers_after": best.layers,
                   "kept_layers": curve["kept"][best.k], "predicted": best.as_dict()},
        "reason": reason,
        "alternatives": [c.as_dict() for c in ranked[1:6]],
        "pareto": [c.as_dict() for c in pareto(cands)],
        "models": {
            "quality": ("KL(K, q) = held-out KL of the merge at K after healing "
                        f"({heal.steps} steps, {heal.train}; healed at K = {', '.join(map(str, healed['healed_at']))}, "
                        "the K between by the interpolated healed/unhealed ratio) + KL of quant q on the unmerged model"
                        if healed else
                        "KL(K, q) = held-out KL of the merge at K + KL of quant q on the unmerged model"),
            "quant_cost": quant_source,
            "memory": ("weights x resident ratio (measured per type) + KV buffer of the whole context + prefill logits "
                       "(512-token prompt) + overhead, onnxruntime-genai CPU provider" if onnx else
                       "weights (tensor types llama.cpp writes) + KV + compute buffer + overhead, llama.cpp CPU backend"),
            "speed": f"efficiency {eff:.3f} ({eff_source}) x device bandwidth / bytes per token; a device prediction, not a measurement",
        },
        "curve": {"kl": curve["kl"], "method": method,
                  **({"unhealed_kl": healed["unhealed_kl"], "heal_steps": healed["steps"], "heal_train": healed["train"],
                     "healed_at": healed["healed_at"]}
                     if healed else {})},
        "heal": asdict(heal) if healed else None,
        "quant_costs": {q: {"kl": c["kl"], "bytes": sum(c["per_layer"]) + c["other"], "tensor_types": c["tensor_types"],
                            **({"resident_ratio": c["resident_ratio"]} if "resident_ratio" in c else {})}
                        for q, c in costs.items()},
        "candidates": [c.as_dict() for c in cands],
        "ranked": [{"k": c.k, "quant": c.quant, "kl": c.kl} for c in ranked],
    }
    return plan, ctx


def plan_table(plan: dict) -> str:
    """The Pareto table and the choice, for people."""
    b = plan["budget"]
    lines = [f"profile {plan['profile']['name']}: budget {b['memory_mb']:.0f} MB, context {b['context']}, "
             f">= {b['min_tokens_per_s']:g} tok/s, quality loss <= {b['max_quality_loss']:g} nats",
             "", f"{'K':>3} {'layers':>6} {'quant':<10} {'memory MB':>10} {'tok/s (device, pred.)':>22} {'KL (pred.)':>10}  fits"]
    for c in plan["pareto"]:
        fits = "yes" if c["fits_memory"] and c["fits_speed"] else ("memory" if not c["fits_memory"] else "speed")
        mark = "  <- chosen" if (c["k"], c["quant"]) == (plan["choice"]["k"], plan["choice"]["quant"]) else ""
        lines.append(f"{c['k']:>3} {c['layers']:>6} {c['quant']:<10} {c['memory_mb']:>10.1f} {c['tps']:>22.1f} {c['kl']:>10.3f}  "
                     f"{fits if fits != 'yes' else 'yes'}{mark}")
    ch = plan["choice"]
    lines += ["", f"choice: merge K={ch['k']} ({ch['method']}) -> {ch['layers_after']} layers, {ch['quant']}",
              f"why: {plan['reason']}"]
    return "\n".join(lines)


def write_plan(plan: dict, out: Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "plan.json", json.dumps(plan, indent=2))
    return out / "plan.json"
