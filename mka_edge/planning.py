"""`mka-edge plan`: settings -> facts -> solve -> Plan, each stage a function of its own.

1. ``resolve_settings``: profile + recipe + command line, one precedence rule (the command line,
   else the recipe, else the profile), into one ``PlanSettings``.
2. ``cheap_facts``: the model's shape and each quant type's bytes (no weights loaded): enough to
   refuse an impossible budget in seconds.
3. ``measure``: the measured facts (the only stage that loads the model, probes quant types and
   builds the merge curve; all cached).
4. ``solver.solve.solve(facts, settings) -> Plan``: pure; the same facts give the same plan.

``build`` executes a Plan (a fresh one, or one saved by ``plan --out``).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

from .cache import atomic_write_text, stable_hash
from .errors import UserError
from .heal.distill import effective_heal
from .host_need import check_load
from .kv_cache import BASELINE_CACHE, CacheMode
from .mka.context import build_context
from .mka.method_table import ALL_METHODS, ATTENTION_METHOD
from .mka.methods import check_alpha
from .profiles import Profile, load_profile, resolved
from .records import CACHE_KL_FLOOR, Budget, CacheCost, EditSet, Efficiency, Plan, QuantCost, Ranked
from .settings import ModelSettings
from .solver import speed
from .solver.bar import refuse_if_bar_missed
from .solver.feasibility import check_any_fits, check_shape, read_shape, smallest_kept
from .solver.memory import DEFAULT_OVERHEAD_MB, MIB, Shape, cache_bytes
from .solver.mixed_plans import MIXED
from .solver.quality import healed_curve, merge_curve, needed_merge_kl
from .solver.scope import speed_share_floor, unsettled
from .solver.search import Candidate, edit_sets
from .solver.solve import CheapFacts, Facts, enumerate_plans, solve, with_mixed
from .target_protocols import CostModel

PROBE_MAX_PARAMS = 3e9  # above this, quantizing every type to measure it costs more than the build
ATTENTION_STEPS_PER_LAYER = 2  # an attention unit is about half a layer's reference bytes
ATTENTION_BASES = ("sleb-fast", "sleb")  # whole-layer methods beside which the sleb-attn curve is offered


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
    load: ModelSettings = field(default_factory=ModelSettings)  # how the model and calibration load
    kv_type: str = "auto"  # auto: the plan chooses the cache mode; a type pins K and V
    flash_attn: str = "auto"  # auto: allowed where the profile allows it; on: required; off: forbidden
    attention_removal: bool = True  # the sleb-attn curve (llama.cpp targets, architectures with deci)
    imatrix: bool = True  # importance-matrix quantization where the probe measured that it helps
    measure_all: bool = False  # measure every type and cache mode, even those that cannot change the choice
    # a build (not `plan`) refuses, as soon as it is known, a plan predicted to miss the quality
    # bar (solver/bar.py); --build-anyway turns it off.  Not a plan setting: not in plan.json.
    refuse_below_bar: bool = False
    mixed: bool = False  # mixed plans: every tensor its own type (solver/mixed_plans.py)
    mixed_types: tuple[str, ...] = ()  # the ggml types a mixed plan's tensors may take

    @property
    def target(self) -> CostModel:
        """The target as the planner may use it: its cost and memory model."""
        return self.profile.target

    def profile_json(self) -> dict:
        """The profile as plan.json records it, with the identity of its content."""
        return {**self.profile.as_dict(), "fingerprint": profile_fingerprint(self.profile)}

    def settings_json(self) -> dict:
        """plan.json's ``settings``: what ``build --plan`` re-plans with (``merge_opts``: the model
        settings, ``ModelSettings.load_options``)."""
        return {
            "model": self.model,
            "method": self.method,
            "alpha": self.alpha,
            "k_max": self.k_max,
            "quants": list(self.quants),
            "quality_prior": self.quality_prior,
            "heal": asdict(self.heal) if self.heal is not None else None,
            "heal_points": self.heal_points,
            "merge_opts": self.load.load_options(),
            "kv_type": self.kv_type,
            "flash_attn": self.flash_attn,
            "attention_removal": self.attention_removal,
            "imatrix": self.imatrix,
            "measure_all": self.measure_all,
            **({"mixed": True, "mixed_types": list(self.mixed_types)} if self.mixed else {}),
        }

    def forbidden(self) -> str:
        """The levers ruled out, for the "nothing fits" line."""
        out = []
        if self.flash_attn == "off" or not self.profile.flash_attention:
            out.append("flash attention forbidden" + ("" if self.flash_attn == "off" else " by the profile"))
        if self.kv_type != "auto":
            out.append(f"KV cache pinned to {self.kv_type}")
        if not self.attention_removal:
            out.append("attention removal off")
        if not self.imatrix:
            out.append("importance-matrix quants off")
        return ", ".join(out)


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
    merge_opts: ModelSettings | dict | None = None,
    kv_type: str | None = None,
    flash_attn: str | None = None,
    attention_removal: bool = True,
    imatrix: bool = True,
    measure_all: bool = False,
    refuse_below_bar: bool = False,
    mixed: bool = False,
    mixed_types: tuple[str, ...] | list[str] | None = None,
) -> PlanSettings:
    """The one precedence rule: a value given here (the command line, or the recipe's defaults the
    CLI already applied) wins, else the profile's.  Every check needs no model."""

    if method not in ALL_METHODS:
        raise UserError(f"unknown merge method '{method}'; known: {', '.join(ALL_METHODS)}")
    alpha = check_alpha(alpha)
    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    kv = str(resolved(kv_type, prof, "kv_cache_type")).lower()
    fa = flash_attn or "auto"
    if fa not in ("auto", "on", "off"):
        raise UserError(f"--flash-attn must be auto, on or off (got {flash_attn!r})")
    if fa == "on" and not prof.flash_attention:
        raise UserError(f"profile {prof.name} forbids flash attention (flash_attention: false); drop --flash-attn on")
    budget = Budget(
        memory_mb=float(resolved(budget_mb, prof, "budget_mb")),
        context=int(resolved(context, prof, "context_length")),
        kv_cache_type=kv,
        min_tokens_per_s=prof.min_tokens_per_s,
        max_quality_loss=float(resolved(max_quality_loss, prof, "max_quality_loss")),
    )
    if budget.memory_mb <= 0 or budget.context < 1:
        raise UserError("--budget-mb and --context must be positive")
    if heal_points < 0:
        raise UserError(f"--heal-curve-points must be 0 or more (got {heal_points})")
    if mixed and not prof.target.per_tensor_types:
        raise UserError(
            f"--mixed needs per-tensor types, which {prof.target.runtime_label} does not take; drop --mixed"
        )
    types: tuple[str, ...] = ()
    if mixed:
        from .solver.tensor_probe import CANDIDATES, check_types

        types = check_types(tuple(mixed_types or CANDIDATES))
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
        merge_opts if isinstance(merge_opts, ModelSettings) else ModelSettings.from_load_options(merge_opts),
        kv,
        fa,
        attention_removal,
        imatrix,
        measure_all,
        refuse_below_bar,
        mixed,
        types,
    )


def cheap_facts(s: PlanSettings) -> CheapFacts:
    """Shape, context and type sizes; refuses an impossible budget before any model work."""
    ms = read_shape(s.model, trust_remote_code=s.load.trust_remote_code)
    check_shape(ms, context=s.budget.context, k_max=s.k_max)
    n = ms.n_layers
    k_max = min(s.k_max if s.k_max is not None else min(8, n // 3), n - 1)
    measure = sum(ms.block_params) + ms.other_params <= PROBE_MAX_PARAMS and not s.quality_prior
    sizes = s.target.type_sizes(ms, list(s.quants), measure)
    exact = s.target.sizes_are_exact
    modes = s.target.cache_modes(s.kv_type, s.profile.flash_attention and s.flash_attn != "off", ms.shape.head_dim)
    if s.flash_attn == "on":
        modes = [m for m in modes if m.endswith("+fa")] or modes
    check_any_fits(
        ms,
        sizes,
        k_max=k_max,
        context=s.budget.context,
        modes=modes,
        budget_mb=s.budget.memory_mb,
        overhead_mb=DEFAULT_OVERHEAD_MB,
        exact=exact,
        forbidden=s.forbidden(),
    )
    attn = s.attention_removal and s.target.supports_attention_removal(ms.arch) and s.method in ATTENTION_BASES
    if s.mixed and not measure:
        raise UserError(
            "--mixed measures each tensor's error in llama.cpp, which a model this large (or --quality-prior) "
            "is not probed for on this host; drop --mixed"
        )
    return CheapFacts(ms, sizes, exact, measure, k_max, tuple(modes), attn)


def plain_costs(costs: dict[str, QuantCost]) -> dict[str, QuantCost]:
    """The costs without importance-matrix quantization (``--no-imatrix``, the old space): each
    type at its plain KL; types that need a matrix dropped."""
    out = {}
    for q, c in costs.items():
        if c.extra.get("imatrix") and "kl_plain" not in c.extra:
            continue
        out[q] = replace(c, kl=c.extra.get("kl_plain", c.kl), extra={**c.extra, "imatrix": False})
    return out


def _reach(s: PlanSettings, cheap: CheapFacts) -> int:
    """The most whole layers any curve of this plan can remove: k_max, or the attention curve's
    steps (each removes at most a layer), for the optimistic bounds of solver/scope.py."""
    n = cheap.shape.n_layers
    steps = min(ATTENTION_STEPS_PER_LAYER * cheap.k_max, 2 * n - 2) if cheap.attention_removal else 0
    return min(max(cheap.k_max, steps), n - 1)


def prior_cache_speeds(caches: dict[str, CacheCost], shape: Shape, sizes, context: int) -> dict[str, CacheCost]:
    """A model too large to probe: each quantized cache mode keeps only the conservative
    prior share of the baseline's decode speed (solver/scope.py ``speed_share_floor``, from
    SmolLM2's slowest measured mode with a 2x margin), at the smallest weights any type gives
    (the lowest share), and is labelled not measured.  Why not 1.0: a quantized cache trades
    memory for speed on a CPU (SmolLM2's q4_0 cache kept 0.44 of the f16 speed), and a plan
    whose speed rests on an unmeasured mode must not promise more than the prior allows."""
    weights = min(sum(c.per_layer) + c.other for c in sizes.values())
    share = speed_share_floor(weights, 0.5 * cache_bytes(shape, context, BASELINE_CACHE))
    return {
        mode: replace(c, speed_factor=round(share, 4), speed_measured=False) if CacheMode.parse(mode).quantized else c
        for mode, c in caches.items()
    }


def _optimistic_edits(cost: QuantCost, k_reach: int) -> list[EditSet]:
    """K = 0, then K = 1..k_reach with this type's largest layers gone and no KL: the least memory
    and loss any merge to K can reach (an unmeasured curve's lower bound)."""
    return [EditSet("", k, tuple(smallest_kept(list(cost.per_layer), k))) for k in range(k_reach + 1)]


def feasible_over(s: PlanSettings, shape: Shape, edits_of, caches, eff: float):
    """costs -> their candidates that fit the budget and speed floor, each type over its own edit
    sets ``edits_of(cost)`` and the cache modes ``caches()`` gives when called (as now known).
    ``eff``: the loaded model's decode efficiency; before loading, an upper bound of it (what a
    refusal may rest on)."""

    def run(costs: dict[str, QuantCost]) -> list[Candidate]:
        out = []
        for q, c in costs.items():
            cands = enumerate_plans(s, shape, {q: c}, eff, edits_of(c), caches())
            out += [x for x in cands if x.fits_memory and x.fits_speed]
        return out

    return run


def refuse_unreachable_bar(s: PlanSettings, costs: dict[str, QuantCost], bound) -> None:
    """Refuse a build (``s.refuse_below_bar``) whose best plan misses the quality bar even with
    every merge free: ``bound`` (``feasible_over`` with ``_optimistic_edits``: K = 0..k_reach with
    the largest layers gone at zero loss) over each type's KL (measured, prior or precision-order
    bound).  Healing lowers a merge's loss, never a type's, so this bound holds with healing too.
    Unknown KL: no bound, no refusal."""
    if not s.refuse_below_bar or not costs or any(c.kl is None for c in costs.values()):
        return
    refuse_if_bar_missed(bound(costs), s.budget.max_quality_loss, s.profile.name, at_least=True)


class _Measurer:
    """The measured facts of one plan, each only as far as it can change the choice.

    Order: speed calibration, then quant types best first against the unmerged model
    (solver/scope.py), the merge curves (as far as quality.needed_merge_kl says), the types that
    fit only merged against the curves' points; a cache mode's KL and decode speed only when a
    plan with it ranks first (``settle``, rule 4 of solver/scope.py: until then its cost is its
    lower bound and its speed share 1.0, so the first-ranked plan whose mode is known is the choice)."""

    def __init__(self, s: PlanSettings, cheap: CheapFacts, ctx, session, *, progress: bool, log):
        self.s, self.cheap, self.ctx, self.session, self.progress, self.log = s, cheap, ctx, session, progress, log
        self.t, self.lm = s.target, ctx.lm
        self.shape = Shape.from_config(ctx.model.config)
        self.sizes = cheap.sizes
        self.costs: dict[str, QuantCost] = {}
        self.caches: dict[str, CacheCost] = {}
        self.source = ""
        self.efficiency: Efficiency | None = None  # as timed by this plan's measurements

    def eff(self) -> Efficiency:
        """The decode efficiency this plan timed, else the one this host recorded for the model
        before (or the labelled prior)."""
        return self.efficiency or speed.efficiency(self.t.name, self.lm.fingerprint)

    def feasible(self, edits_of):
        """costs -> their feasible candidates over ``edits_of(cost)`` and the cache modes as now known."""
        return feasible_over(self.s, self.shape, edits_of, lambda: list(self.caches.values()), self.eff().value)

    def measure_types(self, quants: list[str]) -> None:
        got, self.source, timed = self.t.quant_costs(
            self.lm,
            self.cheap.shape,
            {q: self.sizes[q] for q in quants},
            quants,
            measure=self.cheap.measure,
            progress=self.progress,
            calibrate_speed=self.efficiency is None and not speed.calibrated(self.t.name, self.lm.fingerprint),
            log=self.log,
            **({} if self.s.imatrix else {"imatrix": False}),  # --no-imatrix: nothing measured with a matrix
            **({"session": self.session} if self.session is not None else {}),
        )
        self.efficiency = timed or self.efficiency
        got = plain_costs(got) if not self.s.imatrix else got
        for q, c in got.items():  # a measured file's cost keeps the dry run's embedding bytes
            if "embd_bytes" not in c.extra and "embd_bytes" in self.sizes[q].extra:
                got[q] = replace(c, extra={**c.extra, "embd_bytes": self.sizes[q].extra["embd_bytes"]})
        self.costs.update(got)

    def best_first(self, todo: list[str], bound, now, grids, skipped: dict, retain: bool, nowhere: str | None = None):
        """Measure the types of ``todo`` that can change the choice, best first (solver/scope.py
        ``next_to_measure``: ``bound`` the optimistic candidates, ``now`` the ones the incumbent
        comes from), settling cache modes between; what cannot change it lands in ``skipped``.
        ``retain``: the probe keeps only the file of the best unmerged plan (a build's hand-over)."""
        from .solver import scope

        unmerged = self.feasible(lambda c: _optimistic_edits(c, 0))
        kw = {"nowhere": nowhere} if nowhere is not None else {}
        while True:
            self.settle(now)
            q = scope.next_to_measure(
                todo, self.sizes, self.costs, bound, now, grids, skipped, prior=scope.published_kl, **kw
            )
            if q is None:
                return
            self.measure_types([q])
            todo.remove(q)
            if retain:
                self.session.retain_only(_best_quant(unmerged(self.costs)))

    def measure_caches(self, modes: list[str], timed: bool) -> None:
        costs = self.t.cache_costs(
            self.lm,
            modes,
            context=self.s.budget.context,
            measure=self.cheap.measure,
            progress=self.progress,
            log=self.log,
            **({} if timed else {"timed": False}),
            **({"session": self.session} if self.session is not None else {}),
        )
        self.caches = {c.mode: c for c in costs}

    def share_floor(self, cand) -> float:
        """Rule 6's least speed share of ``cand``'s cache mode: its weights against the f16 cache
        of its own layers at the plan's context (half of it: the average over a generation)."""
        shape = self.shape.with_layers(cand.layers, cand.attn_layers)
        f16 = 0.5 * cache_bytes(shape, self.s.budget.context, BASELINE_CACHE)
        return speed_share_floor(cand.memory_terms.get("weights_mb", 0.0) * MIB, f16)

    def settle(self, now) -> None:
        """Measure cache modes until the best candidate of ``now`` (by the plan's own order: KL, then
        memory) has a measured KL and speed.  An unmeasured mode's KL is a lower bound (its cost is
        never below zero) and its speed share 1.0 (a share only ever rules a plan out), so the first
        best candidate whose mode is measured is the one full measurement ranks first, and the
        incumbent every skip of solver/scope.py compares against is exact."""
        floor = self.s.budget.min_tokens_per_s
        while (need := unsettled(now(self.costs), self.caches, floor, self.share_floor)) is not None:
            mode, what = need
            kw = {"session": self.session} if self.session is not None else {}
            common = dict(context=self.s.budget.context, progress=self.progress, log=self.log, **kw)
            if what == "kl":
                (self.caches[mode],) = self.t.cache_costs(
                    self.lm, [mode], measure=self.cheap.measure, timed=False, **common
                )
            else:
                self.caches[mode] = self.t.cache_speed(self.lm, mode, **common)


def _curves(s: PlanSettings, cheap: CheapFacts, ctx, m: _Measurer, costs_now, *, progress: bool, log):
    """The merge curve (healed where the plan heals) and the attention curve, each only as far as
    it can change the choice: ``needed_merge_kl`` over the plans at K = 0 and K = k_max with the
    types' costs as now known (measured, or their bound: ``costs_now``)."""
    k_max = cheap.k_max
    ref_layers = next(iter(cheap.sizes.values())).per_layer
    eff = m.eff().value
    edge = enumerate_plans(
        s,
        m.shape,
        costs_now,
        eff,
        [EditSet(s.method, k, tuple(smallest_kept(ref_layers, k))) for k in range(k_max + 1)],
        list(m.caches.values()),
    )
    useful_below = needed_merge_kl(
        [c for c in edge if c.k == 0 and c.fits_memory and c.fits_speed and c.quant in m.costs],
        [c for c in edge if c.k == k_max and c.fits_memory and c.fits_speed],
    )
    if s.mixed and useful_below is not None:
        # a mixed plan turns the bytes a merge frees into bits for the rest, which the types' own
        # sizes do not show; still, no merge whose own KL reaches the best unmerged plan's can win
        unmerged = [c.kl for c in edge if c.k == 0 and c.fits_memory and c.fits_speed and c.quant in m.costs]
        useful_below = max(useful_below, min(unmerged, default=float("inf")))
        useful_below = None if useful_below == float("inf") else useful_below
    heal = s.heal
    if heal is not None and useful_below is not None and useful_below > 0:
        useful_below = None  # healing lowers the merge KL: only the "no merge can win" case holds
    curve = merge_curve(ctx, s.method, k_max, s.alpha, progress=progress, log=log, useful_below=useful_below)
    healed = None
    if heal is not None and len(curve["kl"]) > 1:
        healed = healed_curve(ctx, curve, s.method, s.alpha, heal, points=s.heal_points, progress=progress, log=log)
        curve = dict(curve, kl=healed["kl"])
    attn_curve = None
    if cheap.attention_removal and s.method != ATTENTION_METHOD:
        steps = min(ATTENTION_STEPS_PER_LAYER * k_max, 2 * cheap.shape.n_layers - 2)
        attn_curve = merge_curve(
            ctx, ATTENTION_METHOD, steps, s.alpha, progress=progress, log=log, useful_below=useful_below
        )
        if heal is not None and len(attn_curve["kl"]) > 1:
            h = healed_curve(
                ctx, attn_curve, ATTENTION_METHOD, s.alpha, heal, points=s.heal_points, progress=progress, log=log
            )
            attn_curve = dict(attn_curve, kl=h["kl"], unhealed_kl=h["unhealed_kl"])
    return curve, healed, attn_curve


def measure(
    s: PlanSettings, cheap: CheapFacts, ctx, *, progress: bool = True, log=print, keep: Path | None = None
) -> Facts:
    """Quant costs, cache-mode costs, speed efficiency and the merge curves on the loaded model
    (``ctx``), each only as far as it can change the choice (``_Measurer``; solver/scope.py has the
    rules).  ``measure_all``, or a target that calibrates speed only inside its probe, measures
    every type and mode as before.  ``keep``: a folder that receives the probe's file of the best
    plan that merges nothing (``ProbeSession.hand_over``), which a build then exports by moving."""
    from .solver import scope

    t = s.target
    sizes = cheap.sizes
    # rule 5 of solver/scope.py: with an importance matrix only, where one helps (--measure-all: both ways)
    with t.probe_session(ctx.lm, progress=progress, imatrix=s.imatrix, plain_too=s.measure_all) as session:
        m = _Measurer(s, cheap, ctx, session, progress=progress, log=log)
        prune = cheap.measure and not s.measure_all
        if cheap.measure:  # the host's decode speed first; a target that times it only in its probe says None
            m.efficiency = t.calibrate_speed(session, list(s.quants))
            if m.efficiency is None and not speed.calibrated(t.name, ctx.lm.fingerprint):
                prune = False  # this target calibrates only inside its probe: measure as before
        # a build's hand-over of the probe's file (not with --measure-all: it would keep every type's)
        retain = prune and keep is not None and hasattr(session, "retain_only")
        if retain:
            session.retain = True
        k_reach = _reach(s, cheap)
        skipped: dict[str, scope.Skipped] = {}
        modes_skipped: list[dict] = []
        grids = t.source_grids(ctx.lm) if prune else frozenset()
        todo: list[str] = []
        unmerged = m.feasible(lambda c: _optimistic_edits(c, 0))
        if not prune:
            m.measure_caches(list(cheap.modes), timed=True)
            if not cheap.measure:
                m.caches = prior_cache_speeds(m.caches, cheap.shape.shape, sizes, s.budget.context)
            m.measure_types(list(s.quants))
        else:
            m.caches = {c: CacheCost(c) for c in cheap.modes}  # no KL, full speed: the optimistic bound
            fits_with = {x.cache for x in m.feasible(lambda c: _optimistic_edits(c, k_reach))(sizes)}
            modes = [c for c in cheap.modes if c == BASELINE_CACHE or c in fits_with]
            modes_skipped = [
                {"mode": c, "why": "no type fits with it at any reduction"} for c in cheap.modes if c not in modes
            ]
            # KL too only when a plan with the mode ranks first (settle); until then a lower bound
            m.caches = {
                c: CacheCost(c)
                if c == BASELINE_CACHE
                else CacheCost(c, CACHE_KL_FLOOR, speed_measured=False, kl_measured=False)
                for c in modes
            }
            log("measuring the quant types that can change the choice, best first (cached after the first plan)")
            todo = list(s.quants)
            bound = m.feasible(lambda c: _optimistic_edits(c, k_reach))
            m.best_first(todo, bound, unmerged, grids, skipped, retain)
        costs = m.costs
        eff, eff_source = m.eff()
        bounded = {q: sizes[q].with_kl(scope.quant_bound(q, sizes, costs, grids)[0]) for q in todo}
        # before any merge curve: a bar no plan can meet, whatever the merges cost, is refused now
        if not s.mixed:  # a mixed plan may meet a bar no uniform type can; the build checks the plan's own figure
            refuse_unreachable_bar(s, {**costs, **bounded}, m.feasible(lambda c: _optimistic_edits(c, k_reach)))
        curve, healed, attn_curve = _curves(s, cheap, ctx, m, {**costs, **bounded}, progress=progress, log=log)
        ctx.references.clear()  # the curves' shared held-out reference (vocabulary-wide) is not needed past them
        if prune:  # the types that fit only merged, now against the curves' real points
            edits = edit_sets(curve, s.method) + (edit_sets(attn_curve, ATTENTION_METHOD)[1:] if attn_curve else [])
            real = m.feasible(lambda c: edits)
            nowhere = "fits only with more merging than can change the plan (the merge curves stop before it fits)"
            m.best_first(todo, real, real, grids, skipped, retain, nowhere)
            broken = scope.check_order(sizes, costs, grids)
            by_order = [q for q, sk in skipped.items() if "precision order" in sk.why]
            if broken and by_order:  # the rule failed on this model: what it skipped is measured after all
                log(f"the precision order failed on this model ({'; '.join(broken)}): measuring {', '.join(by_order)}")
                m.measure_types(by_order)
                for q in by_order:
                    skipped.pop(q)
                m.settle(real)
        mixed, mixed_scope = _mixed_costs(s, cheap, m, session, curve, attn_curve, progress=progress, log=log)
        runs = getattr(session, "runs", None)
        if retain and (best := _best_quant(unmerged(m.costs))):
            session.hand_over(best, keep)
    scope_rec = {
        "measure_all": not prune and cheap.measure,
        **({} if cheap.measure else {"priors": True}),
        "measured": sorted(costs, key=lambda q: -sizes[q].total_bytes),
        "skipped": [sk.as_dict() for sk in skipped.values()],
        "caches_skipped": modes_skipped,
        "speed_not_measured": [c.mode for c in m.caches.values() if not c.speed_measured],
        "kl_not_measured": [c.mode for c in m.caches.values() if not c.kl_measured],
        "order_violations": scope.check_order(sizes, costs, grids) if prune else [],
        **({"probe_runs": runs} if runs is not None else {}),
        **({"mixed": mixed_scope} if mixed_scope else {}),
    }
    return Facts(
        cheap,
        ctx.lm.fingerprint,
        m.shape,
        costs,
        m.source,
        eff,
        eff_source,
        curve,
        healed,
        tuple(m.caches.values()),
        attn_curve,
        scope_rec,
        mixed,
    )


def _mixed_costs(s: PlanSettings, cheap: CheapFacts, m: _Measurer, session, curve, attn_curve, *, progress, log):
    """(per-tensor costs or None, what the plan records of them): measured (``tensor_probe.sensitivity``,
    cached) only when a mixed plan could beat the best plan with one type, whose KL it can never go
    below the all-Q8_0 floor of (every mixed tensor is at most Q8_0) plus the least edit set's KL."""
    if not s.mixed:
        return None, None
    from .solver.tensor_probe import CARRIER, sensitivity

    edits = edit_sets(curve, s.method) + (edit_sets(attn_curve, ATTENTION_METHOD)[1:] if attn_curve else [])
    cands = enumerate_plans(s, m.shape, m.costs, m.eff().value, edits, list(m.caches.values()))
    best = min((c for c in cands if c.fits_memory and c.fits_speed), key=lambda c: c.kl, default=None)
    floor = m.costs[CARRIER].kl if CARRIER in m.costs and m.costs[CARRIER].kl is not None else 0.0
    if best is not None and min(e.kl for e in edits) + floor >= best.kl:
        why = (
            f"not measured: the best plan with one type ({best.label}, {best.kl:.4f} nats) already loses no more "
            f"than the all-{CARRIER} floor ({floor:.4f} nats) every mixed plan starts from"
        )
        log(f"mixed plans {why}")
        return None, {"measured": False, "why": why}
    sens = sensitivity(session, s.mixed_types, progress=progress, log=log)

    def now(costs: dict[str, QuantCost]) -> list[Candidate]:
        caches = list(m.caches.values())
        cands = enumerate_plans(s, m.shape, costs, m.eff().value, edits, caches)
        both = with_mixed(s, sens, m.shape, edits, cands, caches, m.eff().value)
        return [c for c in both if c.fits_memory and c.fits_speed]

    m.settle(now)  # a mixed plan that ranks first gets its cache mode measured, as any plan does
    return sens, {"measured": True, "types": list(s.mixed_types), "floor_kl": sens.floor[1]}


class Planned(NamedTuple):
    """A plan and the loaded merge context it was measured on (a build goes on to merge with it)."""

    plan: Plan
    context: Any  # mka.context.MergeContext


def plan_with_context(profile: str, model: str | None = None, *, progress: bool = True, log=print, **kw) -> Planned:
    """Settings -> cheap facts -> (model loaded) measured facts -> Plan; the loaded merge context
    comes back too (build goes on to merge with it)."""
    s = resolve_settings(profile, model, **kw)
    return plan_from_settings(s, progress=progress, log=log)


def _best_quant(cands) -> str | None:
    """The type of the first-ranked of ``cands`` (the plan's order: KL, then memory)."""
    return min(cands, key=lambda c: (c.kl, c.memory_mb)).quant if cands else None


def load_context(spec: str | None, load: ModelSettings, dtype):
    """The model and calibration batch as a plan measures them, in the dtype ``check_load`` chose;
    a saved plan's build loads it the same way."""
    return build_context(model=spec, **{**load.load_options(), "dtype": str(dtype).removeprefix("torch.")})


def plan_from_settings(s: PlanSettings, *, progress: bool = True, log=print, keep: Path | None = None) -> Planned:
    """``keep``: see ``measure`` (a build's hand-over folder for the probe's file)."""
    cheap = cheap_facts(s)
    # the host's RAM and GPU memory, before any weight loads; and the dtype that fits them
    dtype = check_load(cheap.shape, s.load.device, s.load.dtype)
    if not cheap.measure:  # the types' KL are priors: a bar no plan can meet is refused before loading
        modes = [CacheCost(c) for c in cheap.modes]  # no cache KL: the bound stays a bound
        costs = cheap.sizes if s.imatrix else plain_costs(cheap.sizes)
        k_reach = _reach(s, cheap)
        refuse_unreachable_bar(
            s,
            costs,
            feasible_over(
                s,
                cheap.shape.shape,
                lambda c: _optimistic_edits(c, k_reach),
                lambda: modes,
                speed.efficiency(s.target.name, None).value,  # before loading: the upper bound
            ),
        )
    ctx = load_context(s.model, s.load, dtype)
    if s.load.dtype == "auto" and str(dtype) != "torch.float32" and ctx.device.type == "cpu":
        log(f"      computing in {dtype} as stored: a float32 copy would not fit this host's RAM")
    return Planned(solve(measure(s, cheap, ctx, progress=progress, log=log, keep=keep), s), ctx)


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
    plan = Plan.from_json(data, where=f"--plan {path}")
    check_plan_names(plan, f"--plan {path}")
    return plan


_TENSOR_NAME = re.compile(r"^[A-Za-z0-9_.]+$")


def _check_mixed(entry: Ranked, target) -> None:
    """A mixed plan's entry: the MIXED type on a target that takes per-tensor types, its tensors
    named as GGUF names and each type a ggml type (they become the quantizer's overrides)."""
    import gguf

    if entry.quant != MIXED or not entry.tensor_types or not target.per_tensor_types:
        raise UserError(f"a {MIXED} plan needs its per-tensor types and a llama.cpp profile")
    for name, t in entry.tensor_types.items():
        if not _TENSOR_NAME.match(name) or t.upper() not in gguf.GGMLQuantizationType.__members__:
            raise UserError(f"tensor type {name[:60]!r} = {t[:20]!r} is not a GGUF tensor at a ggml type")


def check_plan_names(plan: Plan, where: str) -> None:
    """Refuse a plan whose choices are not ones mka-edge makes: a known format, merge method and
    alpha, integer K and attention counts, and a quant type of the plan's format.  Why: a build
    turns them into names (the merged folder ``model-METHOD-kK``, the artifact ``...-QUANT``, the
    trajectory's cache entry ``METHOD-KEY.json``), and plan.json is a file a user may get from
    elsewhere: a method or type such as ``../../x`` must be one line, never a path to write."""
    from .targets import get_target

    target = get_target(plan.format) if isinstance(plan.format, str) else None
    if target is None:
        raise UserError(f"{where}: field 'format' must be text (got {plan.format!r}); plan again")
    choice = Ranked.from_json(
        {
            "method": plan.choice.method,
            "k": plan.choice.k,
            "quant": plan.choice.quant,
            "tensor_types": plan.choice.tensor_types,
        },
        plan.choice.method,
        where,
    )
    for entry in [choice, *plan.ranked]:  # typed by Plan.from_json: here, the names
        if entry.method not in ALL_METHODS:
            raise UserError(f"{where}: unknown merge method {str(entry.method)[:60]!r}; plan again")
        try:
            if entry.tensor_types is not None or entry.quant == MIXED:
                _check_mixed(entry, target)
            else:
                target.check_quants([entry.quant])
        except UserError as exc:
            raise UserError(f"{where}: {exc}; plan again") from None
    costs = plan.quant_costs
    if not isinstance(costs, dict) or not all(isinstance(v, dict) for v in costs.values()):
        raise UserError(f"{where}: 'quant_costs' must map each quant type to its costs; plan again")
    check_alpha(str(plan.choice.alpha))


def write_plan(plan: Plan, out: Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "plan.json", json.dumps(plan.to_json(), indent=2))
    return out / "plan.json"
