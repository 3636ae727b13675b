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


def prior_costs(ms, quants: list[str]) -> dict:
    """Quant costs from llama.cpp's published Llama-3-8B table, sized for this model
    (``ms``: feasibility.ModelShape)."""
    from .solver.quant_prior import PUBLISHED, prior_entry

    unknown = [q for q in quants if q not in PUBLISHED]
    if unknown:
        raise UserError(f"no published prior for {', '.join(unknown)}; use types from {', '.join(PUBLISHED)}")
    return {q: prior_entry(q, ms.block_params, ms.other_params) for q in quants}

PROBE_MAX_PARAMS = 3e9   # above this, quantizing every type to measure it costs more than the build
GGUF_QUANTS = ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K"]
# fp16 is left out by default: the CPU provider runs it upcast, with more memory than fp32 and no
# more speed (docs/results.md); it is for GPU/NPU devices; ask for it with --quants.
ONNX_QUANTS = ["fp32", "int8", "int4-mixed", "int4"]
# ONNX types mapped to the llama.cpp type with the nearest scheme, for the published prior.
ONNX_PRIOR_AS = {"fp32": "F16", "fp16": "F16", "int8": "Q8_0", "int4-mixed": "Q4_K_M", "int4": "Q4_0"}


def onnx_prior_costs(ms, quants: list[str]) -> dict:
    """ONNX quant costs without measuring: bytes from each type's nominal bytes per weight, KL from
    llama.cpp's published table for the nearest llama.cpp scheme (a prior, labelled so)."""
    from .solver.feasibility import onnx_type_sizes
    from .solver.quant_prior import PUBLISHED

    return {q: entry | {"kl": PUBLISHED[ONNX_PRIOR_AS[q]][1], "source": f"prior: llama.cpp {ONNX_PRIOR_AS[q]} figure"}
            for q, entry in onnx_type_sizes(ms, quants).items()}


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
    from .solver.feasibility import check_any_fits, check_shape, gguf_type_sizes, onnx_type_sizes, read_shape, smallest_kept
    from .solver.memory import DEFAULT_OVERHEAD_MB, Shape
    from .solver.quality import merge_curve, needed_merge_kl
    from .solver.quant_probe import probe
    from .solver.search import choose, pareto
    from .solver.search import candidates as enumerate_candidates

    from .mka.method_table import ALL_METHODS
    from .mka.methods import check_alpha

    if method not in ALL_METHODS:
        raise UserError(f"unknown merge method '{method}'; known: {', '.join(ALL_METHODS)}")
    alpha = check_alpha(alpha)
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
    # Everything that needs only the model's shape is checked before the model is loaded.
    ms = read_shape(model, trust_remote_code=bool((merge_opts or {}).get("trust_remote_code")))
    check_shape(ms, context=context, k_max=k_max)
    n = ms.n_layers
    k_max = min(k_max if k_max is not None else min(8, n // 3), n - 1)
    measure = sum(ms.block_params) + ms.other_params <= PROBE_MAX_PARAMS and not quality_prior
    if onnx:
        sizes, exact = onnx_type_sizes(ms, quants), False
    elif measure:
        sizes, exact = gguf_type_sizes(ms, quants), True
    else:
        sizes, exact = prior_costs(ms, quants), True
    check_any_fits(ms, sizes, k_max=k_max, context=context, kv_type=prof.kv_cache_type, budget_mb=budget,
                   overhead_mb=DEFAULT_OVERHEAD_MB, exact=exact)

    ctx = build_context(model=model, **(merge_opts or {}))
    eff, eff_source = speed.efficiency(prof.format)
    if measure:
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
        costs = onnx_prior_costs(ms, quants)
        quant_source = f"prior: {PRIOR_SOURCE}, each ONNX type read as the nearest llama.cpp scheme; it does not transfer to every model"
    else:
        costs = sizes
        quant_source = f"prior: {PRIOR_SOURCE}; measured on Llama-3-8B, it does not transfer to every model"
    eff, eff_source = speed.efficiency(prof.format)
    shape = Shape.from_config(ctx.model.config)

    def enumerate_at(curve_kl, kept):
        return enumerate_candidates(shape, curve_kl, kept, costs, context=context, kv_type=prof.kv_cache_type,
                                    budget_mb=budget, bandwidth_gbps=prof.bandwidth_gbps, efficiency=eff,
                                    min_tps=prof.min_tokens_per_s, max_kl=max_kl, overhead_mb=DEFAULT_OVERHEAD_MB)

    # The curve only as far as it can change the choice (quality.needed_merge_kl).
    ref_layers = next(iter(costs.values()))["per_layer"]
    edge = enumerate_at([0.0] * (k_max + 1), [smallest_kept(ref_layers, k) for k in range(k_max + 1)])
    useful_below = needed_merge_kl([c for c in edge if c.k == 0 and c.fits_memory and c.fits_speed],
                                   [c for c in edge if c.k == k_max and c.fits_memory and c.fits_speed])
    if heal is not None and heal.steps > 0 and useful_below is not None and useful_below > 0:
        useful_below = None          # healing lowers the merge KL: only the "no merge can win" case holds
    curve = merge_curve(ctx, method, k_max, alpha, progress=progress, log=log, useful_below=useful_below)
    healed = None
    if heal is not None and heal.steps > 0 and len(curve["kl"]) > 1:
        from .solver.quality import healed_curve

        healed = healed_curve(ctx, curve, method, alpha, heal, points=heal_points, progress=progress, log=log)
        curve = dict(curve, kl=healed["kl"])
    cands = enumerate_at(curve["kl"], curve["kept"])
    ranked, reason = choose(cands, budget, prof.min_tokens_per_s, context)
    best = ranked[0]
    if not curve.get("complete", True):
        reach = len(curve["kl"]) - 1
        reason += ("; no merge was scored: the best quant type that fits at all already fits unmerged, and "
                   "merging only adds loss" if reach == 0 else
                   f"; the merge curve stopped at K={reach}, whose held-out KL ({curve['kl'][reach]:.3f} nats) already "
                   f"rules out beating the best unmerged plan")
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
        "curve": {"kl": curve["kl"], "method": method, "complete": curve.get("complete", True),
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
