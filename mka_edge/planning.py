"""`mka-edge plan`: settings -> facts -> solve -> Plan, each stage a function of its own.

1. ``resolve_settings``: profile + recipe + command line, one precedence rule (the command line,
   else the recipe, else the profile), into one ``PlanSettings``.
2. ``cheap_facts``: the model's shape and each quant type's bytes (no weights loaded): enough to
   refuse an impossible budget in seconds.
3. ``measure``: the measured facts (the only stage that loads the model, probes quant types and
   builds the merge curve; all cached).
4. ``solve(facts, settings) -> Plan``: pure; the same facts give the same plan.

``build`` executes a Plan (a fresh one, or one saved by ``plan --out``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import __version__
from .cache import atomic_write_text, stable_hash
from .errors import UserError
from .heal.distill import effective_heal
from .mka.context import build_context
from .mka.method_table import ALL_METHODS
from .mka.methods import check_alpha
from .profiles import Profile, load_profile, resolved
from .records import Budget, Choice, Plan, QuantCost
from .solver import speed
from .solver.feasibility import ModelShape, check_any_fits, check_shape, read_shape, smallest_kept
from .solver.memory import DEFAULT_OVERHEAD_MB, Shape
from .solver.quality import healed_curve, merge_curve, needed_merge_kl
from .solver.search import Candidate, choose, pareto
from .solver.search import candidates as enumerate_candidates
from .targets import Target

PROBE_MAX_PARAMS = 3e9  # above this, quantizing every type to measure it costs more than the build
DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class PlanSettings:
    """Everything a plan depends on besides the model's facts, resolved once."""

    profile: Profile
    model: str | None
    budget: Budget
    method: str = "sleb-fast"
    alpha: str = "calibrated"
    k_max: int | None = None
    quants: tuple[str, ...] = ()
    quality_prior: bool = False
    heal: object | None = None  # heal.distill.HealConfig, or None
    heal_points: int = 4
    merge_opts: dict = field(default_factory=dict)

    @property
    def target(self) -> Target:
        return self.profile.target


def profile_fingerprint(prof: Profile) -> str:
    """Identity of a profile's content (not its file path): a saved plan is for this device."""
    return stable_hash({k: v for k, v in prof.as_dict().items() if k != "path"})[:16]


def resolve_settings(
    profile: str | Profile,
    model: str | None = None,
    *,
    budget_mb: float | None = None,
    context: int | None = None,
    max_quality_loss: float | None = None,
    method: str = "sleb-fast",
    alpha: str = "calibrated",
    k_max: int | None = None,
    quants: list[str] | None = None,
    quality_prior: bool = False,
    heal=None,
    heal_points: int = 4,
    merge_opts: dict | None = None,
) -> PlanSettings:
    """The one precedence rule: a value given here (the command line, or the recipe's defaults the
    CLI already applied) wins, else the profile's.  Every check needs no model."""

    if method not in ALL_METHODS:
        raise UserError(f"unknown merge method '{method}'; known: {', '.join(ALL_METHODS)}")
    alpha = check_alpha(alpha)
    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    budget = Budget(
        memory_mb=float(resolved(budget_mb, prof, "budget_mb")),
        context=int(resolved(context, prof, "context_length")),
        kv_cache_type=prof.kv_cache_type,
        min_tokens_per_s=prof.min_tokens_per_s,
        max_quality_loss=float(resolved(max_quality_loss, prof, "max_quality_loss")),
    )
    if budget.memory_mb <= 0 or budget.context < 1:
        raise UserError("--budget-mb and --context must be positive")
    if heal_points < 0:
        raise UserError(f"--heal-curve-points must be 0 or more (got {heal_points})")
    return PlanSettings(
        prof,
        model,
        budget,
        method,
        alpha,
        k_max,
        tuple(prof.target.check_quants(quants)),
        quality_prior,
        effective_heal(heal, prof),
        heal_points,
        dict(merge_opts or {}),
    )


@dataclass(frozen=True)
class CheapFacts:
    """What the model's config and the quantizer's dry run tell, before any weights load."""

    shape: ModelShape
    sizes: dict[str, QuantCost]
    exact: bool
    measure: bool  # quant costs are measured on this model (else llama.cpp's published prior)
    k_max: int


def cheap_facts(s: PlanSettings) -> CheapFacts:
    """Shape, context and type sizes; refuses an impossible budget before any model work."""
    ms = read_shape(s.model, trust_remote_code=bool(s.merge_opts.get("trust_remote_code")))
    check_shape(ms, context=s.budget.context, k_max=s.k_max)
    n = ms.n_layers
    k_max = min(s.k_max if s.k_max is not None else min(8, n // 3), n - 1)
    measure = sum(ms.block_params) + ms.other_params <= PROBE_MAX_PARAMS and not s.quality_prior
    sizes = s.target.type_sizes(ms, list(s.quants), measure)
    exact = s.target.sizes_are_exact
    check_any_fits(
        ms,
        sizes,
        k_max=k_max,
        context=s.budget.context,
        kv_type=s.budget.kv_cache_type,
        budget_mb=s.budget.memory_mb,
        overhead_mb=DEFAULT_OVERHEAD_MB,
        exact=exact,
    )
    return CheapFacts(ms, sizes, exact, measure, k_max)


@dataclass(frozen=True)
class Facts:
    """The measured facts a plan is solved from (all cached)."""

    cheap: CheapFacts
    fingerprint: str
    shape: Shape
    costs: dict[str, QuantCost]
    quant_source: str
    efficiency: float
    efficiency_source: str
    curve: dict
    healed: dict | None


def _enumerate(s: PlanSettings, facts_shape: Shape, costs, eff: float, curve_kl, kept) -> list[Candidate]:
    b = s.budget
    return enumerate_candidates(
        facts_shape,
        curve_kl,
        kept,
        costs,
        context=b.context,
        kv_type=b.kv_cache_type,
        budget_mb=b.memory_mb,
        bandwidth_gbps=s.profile.bandwidth_gbps,
        efficiency=eff,
        min_tps=b.min_tokens_per_s,
        max_kl=b.max_quality_loss,
        overhead_mb=DEFAULT_OVERHEAD_MB,
    )


def measure(s: PlanSettings, cheap: CheapFacts, ctx, *, progress: bool = True, log=print) -> Facts:
    """Quant costs, speed efficiency and the merge curve on the loaded model (``ctx``), the curve
    only as far as it can change the choice (quality.needed_merge_kl)."""
    t = s.target
    eff, eff_source = speed.efficiency(t.name)
    costs, quant_source = t.quant_costs(
        ctx.lm,
        cheap.shape,
        cheap.sizes,
        list(s.quants),
        measure=cheap.measure,
        progress=progress,
        calibrate_speed=eff_source.startswith("default"),
        log=log,
    )
    eff, eff_source = speed.efficiency(t.name)  # again: the probe calibrates it on a first run
    shape = Shape.from_config(ctx.model.config)
    k_max = cheap.k_max
    ref_layers = next(iter(costs.values())).per_layer
    edge = _enumerate(
        s, shape, costs, eff, [0.0] * (k_max + 1), [smallest_kept(ref_layers, k) for k in range(k_max + 1)]
    )
    useful_below = needed_merge_kl(
        [c for c in edge if c.k == 0 and c.fits_memory and c.fits_speed],
        [c for c in edge if c.k == k_max and c.fits_memory and c.fits_speed],
    )
    heal = s.heal
    if heal is not None and useful_below is not None and useful_below > 0:
        useful_below = None  # healing lowers the merge KL: only the "no merge can win" case holds
    curve = merge_curve(ctx, s.method, k_max, s.alpha, progress=progress, log=log, useful_below=useful_below)
    healed = None
    if heal is not None and len(curve["kl"]) > 1:
        healed = healed_curve(ctx, curve, s.method, s.alpha, heal, points=s.heal_points, progress=progress, log=log)
        curve = dict(curve, kl=healed["kl"])
    return Facts(cheap, ctx.lm.fingerprint, shape, costs, quant_source, eff, eff_source, curve, healed)


def solve(facts: Facts, s: PlanSettings) -> Plan:
    """The plan: every (K, type) pair predicted, the feasible ones ranked, the reason.  No I/O."""
    curve, healed, heal = facts.curve, facts.healed, s.heal
    cands = _enumerate(s, facts.shape, facts.costs, facts.efficiency, curve["kl"], curve["kept"])
    ranked, reason = choose(cands, s.budget.memory_mb, s.budget.min_tokens_per_s, s.budget.context)
    best = ranked[0]
    if not curve.get("complete", True):
        reach = len(curve["kl"]) - 1
        reason += (
            "; no merge was scored: the best quant type that fits at all already fits unmerged, and "
            "merging only adds loss"
            if reach == 0
            else f"; the merge curve stopped at K={reach}, whose held-out KL ({curve['kl'][reach]:.3f} nats) already "
            f"rules out beating the best unmerged plan"
        )
    t = s.target
    budget = Budget(**{**asdict(s.budget), "kv_cache_type": t.kv_cache_label(s.budget.kv_cache_type)})
    return Plan(
        mka_edge=__version__,
        profile={**s.profile.as_dict(), "fingerprint": profile_fingerprint(s.profile)},
        model={
            "spec": s.model or DEFAULT_MODEL,
            "fingerprint": facts.fingerprint,
            "layers": facts.cheap.shape.n_layers,
        },
        format=t.name,
        budget=budget,
        choice=Choice(s.method, s.alpha, best.k, best.quant, best.layers, curve["kept"][best.k], best.as_dict()),
        reason=reason,
        alternatives=[c.as_dict() for c in ranked[1:6]],
        pareto=[c.as_dict() for c in pareto(cands)],
        models={
            "quality": (
                "KL(K, q) = held-out KL of the merge at K after healing "
                f"({heal.steps} steps, {heal.train}; healed at K = {', '.join(map(str, healed['healed_at']))}, "
                "the K between by the interpolated healed/unhealed ratio) + KL of quant q on the unmerged model"
                if healed
                else "KL(K, q) = held-out KL of the merge at K + KL of quant q on the unmerged model"
            ),
            "quant_cost": facts.quant_source,
            "memory": t.memory_model,
            "speed": f"efficiency {facts.efficiency:.3f} ({facts.efficiency_source}) x device bandwidth / bytes per token; "
            "a device prediction, not a measurement",
        },
        curve={
            "kl": curve["kl"],
            "method": s.method,
            "complete": curve.get("complete", True),
            **(
                {
                    "unhealed_kl": healed["unhealed_kl"],
                    "heal_steps": healed["steps"],
                    "heal_train": healed["train"],
                    "healed_at": healed["healed_at"],
                }
                if healed
                else {}
            ),
        },
        heal=asdict(heal) if healed else None,
        quant_costs={q: c.plan_json() for q, c in facts.costs.items()},
        candidates=[c.as_dict() for c in cands],
        ranked=[{"k": c.k, "quant": c.quant, "kl": c.kl} for c in ranked],
        settings={
            "model": s.model,
            "method": s.method,
            "alpha": s.alpha,
            "k_max": s.k_max,
            "quants": list(s.quants),
            "quality_prior": s.quality_prior,
            "heal": asdict(heal) if heal is not None else None,
            "heal_points": s.heal_points,
            "merge_opts": s.merge_opts,
        },
    )


def plan_with_context(
    profile: str, model: str | None = None, *, progress: bool = True, log=print, **kw
) -> tuple[Plan, object]:
    """Settings -> cheap facts -> (model loaded) measured facts -> Plan; the loaded merge context
    comes back too (build goes on to merge with it)."""
    s = resolve_settings(profile, model, **kw)
    return plan_from_settings(s, progress=progress, log=log)


def plan_from_settings(s: PlanSettings, *, progress: bool = True, log=print) -> tuple[Plan, object]:
    cheap = cheap_facts(s)
    ctx = build_context(model=s.model, **s.merge_opts)
    return solve(measure(s, cheap, ctx, progress=progress, log=log), s), ctx


def make_plan(profile: str, model: str | None = None, **kw) -> Plan:
    return plan_with_context(profile, model, **kw)[0]


def load_plan(path: Path) -> Plan:
    """A plan saved by `plan --out` (or a build's plan.json); one line if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--plan {path} does not exist; write one with `mka-edge plan --out`")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"--plan {path} is not readable JSON ({exc}); write one with `mka-edge plan --out`") from None
    if not isinstance(data, dict):
        raise UserError(f"--plan {path} is not an mka-edge plan; write one with `mka-edge plan --out`")
    return Plan.from_json(data, where=f"--plan {path}")


def plan_table(plan: Plan) -> str:
    """The Pareto table and the choice, for people."""
    b = plan.budget
    lines = [
        f"profile {plan.profile['name']}: budget {b.memory_mb:.0f} MB, context {b.context}, "
        f">= {b.min_tokens_per_s:g} tok/s, quality loss <= {b.max_quality_loss:g} nats",
        "",
        f"{'K':>3} {'layers':>6} {'quant':<10} {'memory MB':>10} {'tok/s (device, pred.)':>22} {'KL (pred.)':>10}  fits",
    ]
    for c in plan.pareto:
        fits = "yes" if c["fits_memory"] and c["fits_speed"] else ("memory" if not c["fits_memory"] else "speed")
        mark = "  <- chosen" if (c["k"], c["quant"]) == (plan.choice.k, plan.choice.quant) else ""
        lines.append(
            f"{c['k']:>3} {c['layers']:>6} {c['quant']:<10} {c['memory_mb']:>10.1f} {c['tps']:>22.1f} {c['kl']:>10.3f}  "
            f"{fits if fits != 'yes' else 'yes'}{mark}"
        )
    ch = plan.choice
    lines += [
        "",
        f"choice: merge K={ch.k} ({ch.method}) -> {ch.layers_after} layers, {ch.quant}",
        f"why: {plan.reason}",
    ]
    return "\n".join(lines)


def write_plan(plan: Plan, out: Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "plan.json", json.dumps(plan.to_json(), indent=2))
    return out / "plan.json"
