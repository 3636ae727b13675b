"""``solve(facts, settings) -> Plan``: the plan from the measured facts, pure (no I/O, no model).

The planner (``planning.py``) gathers the facts: the model's shape and each type's bytes
(``CheapFacts``, before any weight loads), then the measured costs, curves and speed
(``Facts``).  This module only ranks: every edit set x quant type x cache mode predicted
(``search.candidates``), the feasible ones in the plan's order (``search.choose``), and the
``Plan`` record that says why.  The same facts give the same plan; a plan can be re-solved from
saved facts, and tests give it made-up ones.

It sits in the solver tier, below the profiles and the settings: what it needs of them is the
``PlanInputs`` protocol below, which ``planning.PlanSettings`` satisfies.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from .. import __version__
from ..kv_cache import BASELINE_CACHE
from ..mka.method_table import ATTENTION_METHOD
from ..models.recipes import DEFAULT_MODEL
from ..records import Budget, CacheCost, Choice, EditSet, Plan, QuantCost, Ranked
from ..target_protocols import CostModel
from .feasibility import ModelShape
from .memory import DEFAULT_OVERHEAD_MB, Shape
from .mixed_plans import mixed_candidates, planned_bytes, renumbered
from .search import Candidate, choose, edit_sets, pareto
from .search import candidates as enumerate_candidates
from .tensor_sensitivity import Sensitivity


class PlanInputs(Protocol):
    """What solving reads of the plan's settings (``planning.PlanSettings``)."""

    model: str | None
    budget: Budget
    method: str
    alpha: str
    heal: Any  # heal.distill.HealConfig, or None

    @property
    def target(self) -> CostModel: ...
    @property
    def profile(self) -> Any: ...  # profiles.Profile: its bandwidth_gbps
    def forbidden(self) -> str: ...
    def profile_json(self) -> dict: ...
    def settings_json(self) -> dict: ...


@dataclass(frozen=True)
class CheapFacts:
    """What the model's config and the quantizer's dry run tell, before any weights load."""

    shape: ModelShape
    sizes: dict[str, QuantCost]
    exact: bool
    measure: bool  # quant costs are measured on this model (else llama.cpp's published prior)
    k_max: int
    modes: tuple[str, ...] = (BASELINE_CACHE,)  # the cache modes this plan chooses between
    attention_removal: bool = False  # the sleb-attn curve is a candidate source


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
    caches: tuple[CacheCost, ...] = (CacheCost(BASELINE_CACHE),)
    attn_curve: dict | None = None  # the sleb-attn curve (healed when the plan heals)
    scope: dict = field(default_factory=dict)  # what was measured, what was not and why (solver/scope.py)
    mixed: Sensitivity | None = None  # per-tensor costs: mixed plans are candidates (--mixed)


def enumerate_plans(
    s: PlanInputs, facts_shape: Shape, costs, eff: float, edits: list[EditSet], caches
) -> list[Candidate]:
    """Every (edit set, type, cache mode) predicted against the plan's budget and device."""
    return enumerate_candidates(facts_shape, edits, costs, list(caches), **_device(s, eff))


def _device(s: PlanInputs, eff: float) -> dict:
    """What every candidate is priced against: the budget, the context, the device's speed."""
    b = s.budget
    return dict(
        context=b.context,
        budget_mb=b.memory_mb,
        bandwidth_gbps=s.profile.bandwidth_gbps,
        efficiency=eff,
        min_tps=b.min_tokens_per_s,
        max_kl=b.max_quality_loss,
        overhead_mb=DEFAULT_OVERHEAD_MB,
    )


def with_mixed(
    s: PlanInputs,
    sens: Sensitivity | None,
    shape: Shape,
    edits: list[EditSet],
    cands: list[Candidate],
    caches,
    eff: float,
) -> list[Candidate]:
    """``cands`` and, with per-tensor costs measured (``sens``), a mixed plan per edit set and
    cache mode that could beat the best feasible plan with one type
    (``mixed_plans.mixed_candidates``).  An unmeasured cache mode is priced at its bounds, as for
    every plan: the planner measures the mode of whichever plan ranks first (``_Measurer.settle``)."""
    if sens is None:
        return cands
    fit = [c.kl for c in cands if c.fits_memory and c.fits_speed]
    best = min(fit, default=float("inf"))
    return cands + mixed_candidates(
        sens, shape, edits, list(caches), target=s.target.name, incumbent_kl=best, **_device(s, eff)
    )


def all_edit_sets(facts: Facts, s: PlanInputs) -> list[EditSet]:
    """The edit sets a plan chooses between: the method's curve, then the attention curve's steps."""
    out = edit_sets(facts.curve, s.method)
    if facts.attn_curve:
        out += edit_sets(facts.attn_curve, ATTENTION_METHOD)[1:]  # its K=0 is the same unmerged model
    return out


def solve(facts: Facts, s: PlanInputs) -> Plan:
    """The plan: every (K, type) pair predicted, the feasible ones ranked, the reason.  No I/O."""
    curve, healed, heal = facts.curve, facts.healed, s.heal
    edits = all_edit_sets(facts, s)
    cands = enumerate_plans(s, facts.shape, facts.costs, facts.efficiency, edits, facts.caches)
    cands = with_mixed(s, facts.mixed, facts.shape, edits, cands, facts.caches, facts.efficiency)
    ranked, reason = choose(
        cands, s.budget.memory_mb, s.budget.min_tokens_per_s, s.budget.context, forbidden=s.forbidden()
    )
    best = ranked[0]
    best_edit = next(e for e in edits if (e.method, e.k) == (best.method, best.k))
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
    budget = Budget(**{**asdict(s.budget), "kv_cache_type": best.cache})  # the cache the plan is for
    return Plan(
        mka_edge=__version__,
        profile=s.profile_json(),
        model={
            "spec": s.model or DEFAULT_MODEL,
            "fingerprint": facts.fingerprint,
            "layers": facts.cheap.shape.n_layers,
        },
        format=t.name,
        budget=budget,
        choice=Choice(
            best.method,
            s.alpha,
            best.k,
            best.quant,
            best.layers,
            list(best_edit.kept),
            best.as_dict(),
            best.cache,
            best.imatrix,
            list(best_edit.attn_removed),
            _as_written(best, edits, facts.mixed),
        ),
        reason=reason,
        alternatives=[c.as_dict() for c in ranked[1:6]],
        pareto=[c.as_dict() for c in pareto(cands)],
        models={
            "quality": (
                "KL(K, q, c) = held-out KL of the edit set at K after healing "
                f"({heal.steps} steps, {heal.train}; healed at K = {', '.join(map(str, healed['healed_at']))}, "
                "the K between by the interpolated healed/unhealed ratio) + KL of quant q on the unmerged model "
                "+ KL of cache mode c on the unmerged Q8_0 model"
                if healed
                else "KL(K, q, c) = held-out KL of the edit set at K + KL of quant q on the unmerged model "
                "+ KL of cache mode c on the unmerged Q8_0 model"
            ),
            "quant_cost": facts.quant_source
            + (
                "; MIXED: per-tensor types allocated under the budget left for the weights, each tensor's "
                "KL its importance-matrix-weighted error at the type (read back from llama.cpp's own "
                f"quantizer) x nats per unit of error calibrated per tensor kind at {facts.mixed.calibrate}, "
                f"plus the all-{facts.mixed.floor[0]} file's measured KL"
                if facts.mixed is not None
                else ""
            ),
            "cache_cost": "measured on this model in llama.cpp (Q8_0 file, held-out KL over the f16 cache without "
            "flash attention; decode speed with the cache filled to the plan's context, as a share of that mode's)"
            if len(facts.caches) > 1
            else "one cache mode",
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
                    "attention": {
                        "method": ATTENTION_METHOD,
                        "kl": facts.attn_curve["kl"],
                        "attn_removed": facts.attn_curve.get("attn_removed"),
                        "kept": facts.attn_curve.get("kept"),
                        "bytes_saved": facts.attn_curve.get("bytes_saved"),
                        "complete": facts.attn_curve.get("complete", True),
                    }
                }
                if facts.attn_curve
                else {}
            ),
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
        quant_costs={q: c.plan_json() for q, c in facts.costs.items()} | _mixed_json(facts, best, best_edit),
        cache_costs={
            c.mode: {
                "kl": c.kl,
                "speed_factor": c.speed_factor,
                "speed_measured": c.speed_measured,
                "kl_measured": c.kl_measured,
            }
            for c in facts.caches
        },
        scope=facts.scope,
        candidates=[c.as_dict() for c in cands],
        ranked=[
            Ranked(c.method, c.k, c.quant, c.imatrix, c.cache, c.attn_layers, c.kl, _as_written(c, edits, facts.mixed))
            for c in ranked
        ],
        settings=s.settings_json(),
    )


def _mixed_json(facts: Facts, best: Candidate, edit: EditSet) -> dict:
    """plan.json's record of the per-tensor costs a mixed plan was allocated from (the allocation
    itself is in the choice and in each ranked plan)."""
    sens = facts.mixed
    if sens is None:
        return {}
    embd = "token_embd.weight"
    types = best.tensor_types or {}
    planned = {}
    if types:  # the chosen allocation's tensor bytes in the file: exact, as llama.cpp writes them
        planned = {"planned_bytes": planned_bytes(sens, types, list(edit.kept), edit.attn_removed)}
    return {
        "MIXED": {
            "floor": list(sens.floor),
            "calibrate": sens.calibrate,
            "types": sorted({q for r in sens.table.values() for q in r.err}),
            "tensors": len(sens.table),
            # the all-floor file's bytes: at least any allocation's (a build's disk check reads it)
            "bytes": sens.fixed_other
            + sum(sens.fixed_per_layer)
            + sum(r.bytes[sens.floor[0]] for r in sens.table.values()),
            **({"embd_bytes": sens.table[embd].bytes[types[embd]]} if embd in types else {}),
            "imatrix": True,
            **planned,
        }
    }


def _as_written(c: Candidate, edits: list[EditSet], sens: Sensitivity | None) -> dict | None:
    """A mixed candidate's types as llama.cpp writes them (a K-quant a tensor's rows cannot take
    named by its fallback, which requested directly writes the same bytes), in the names of the
    model its edit set leaves (blocks numbered from 0 after a merge): what the build hands
    llama.cpp's quantizer and the artifact records."""
    if c.tensor_types is None or sens is None:
        return None
    e = next(e for e in edits if (e.method, e.k) == (c.method, c.k))
    written = {n: sens.table[n].actual[q] for n, q in c.tensor_types.items()}
    return renumbered(written, list(e.kept))
