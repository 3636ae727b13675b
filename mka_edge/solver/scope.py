"""Measure only what can change the choice: which quant types a plan quantizes and measures, and
which it can show it would never pick.

A plan picks the feasible (edit set, weight type, cache mode) of least predicted KL = KL(edits) +
KL(type) + KL(cache), ties going to less memory (``search.choose``).  Measuring a type costs a
quantize and a run in llama.cpp (seconds on SmolLM2, minutes at 1.5B parameters, twice for the
types measured with and without an importance matrix); most cannot win, and these rules say which:

1. **Too large.** A type that fits no memory budget or speed floor even at the largest reduction
   any curve offers (the largest layers gone, the least-memory cache mode) cannot be chosen.  Exact:
   sizes come from llama.cpp's dry run before any weights load.
2. **Precision order.** Type A has lower KL than type B when llama.cpp writes every tensor of A at
   B's ggml type or at a higher precision tier (``quant_types.PRECISION_TIER``), at least one higher.
   Not applied to tensors whose type can reproduce the source's own grid (``GRIDS_CONTAINING``: a
   model dequantized from a Q4_1 GGUF is exact in Q5_1).  Checked: every measured pair it orders,
   in every plan (``check_order``), on SmolLM2's full measurement in tests, and against llama.cpp's
   Llama-3-8B scoreboard.
   **2b.** The same when A's other tensors are at B's tier in another type (llama.cpp's IQ4_XS
   against Q4_K, say) and hold at most ``NEAR_SHARE`` of the weights the two types write
   differently: one tier is about a bit per weight, several times the squared error, which a
   tenth of the weights at a sibling type of the same tier cannot give back (IQ3_M's attention
   output at Q4_K against IQ4_XS's at IQ4_XS, 5% of a 1.5B model's weights).  Needs each
   tensor's weight count (the dry run's ``tensor_params``); checked as rule 2 is.
   **2c. A margin.** A type surely better than another (2 or 2b) has at most 1/``ORDER_MARGIN``
   of its KL: ordered pairs are a bit per weight or more apart on some tensors, and the KL ratio
   of the closest ordered pairs measured is 1.62 on SmolLM2 (Q4_0 against Q2_K, both with a
   matrix; 1.41 plain) and 1.13 on llama.cpp's Llama-3-8B scoreboard (Q4_K_S against Q4_K_M, with
   a matrix; Q3_K_M against Q3_K_L 1.15), so 1.1 keeps a margin below both.  Without it two
   candidates a cache mode apart tie to the last digit (IQ4_XS with a q8_0 cache against IQ3_M's
   bound with the free f16 one, on a 1.5B model) and the smaller type is quantized for nothing.
   Checked with rule 2 (``check_order``): a measured pair closer than the margin counts as broken.
3. **Non-negative terms.** Each KL term is at least 0 and a merge step adds loss (the merge
   curve's own stopping rule): a candidate's KL is at least its type's lower bound (rule 2's, else
   0) plus its cache mode's cost (``records.CACHE_KL_FLOOR`` until measured: no mode but the
   baseline is free) plus its edit set's KL (0 before the curve is known).
4. **Cache modes when they rank first.** A cache mode's KL and decode speed are measured only when
   the best candidate uses it (``unsettled``): until then its cost is its lower bound and its speed
   share 1.0, so the incumbent a skip compares against is always exact.
5. **An importance matrix does not lose.** A type llama.cpp quantizes better with an importance
   matrix (``QuantType.imatrix_helps``) is measured with one only, not also plainly: on SmolLM2
   the matrix won for every one of the 8 such types (by 1.3x to 11x in KL,
   tests/data/smollm2_quant_facts.json), as in llama.cpp's own results.  ``--measure-all``
   measures both ways and keeps the better, so benchmarks can check the rule.
6. **A speed share that cannot matter is not timed.** Decode speed enters a plan only through the
   profile's floor; a quantized cache's share of the f16 cache's speed is timed (a long prefill to
   the plan's context: minutes at 1.5B parameters) only when the best candidate would fall below
   the floor at its least possible share (``speed_share_floor``: the weights read per token cost
   what they cost, the cache at most ``CACHE_TIME_PER_BYTE`` times the f16 cache's time per byte;
   never below ``MIN_SPEED_SHARE``).  Otherwise its share stays 1.0 and the plan says its device
   speed was predicted without it.

Order does not change the choice, only how soon the incumbent is tight: the type measured next is
the one whose best feasible plan is predicted least lossy at its prior (llama.cpp's published KL,
``quant_prior``, never below its bound), so the likely winner comes first and the types it bounds
by rule 2 are never quantized; types without a prior go by their bound.

A type is skipped when that lower bound, at every (edit set, cache mode) where it fits, reaches the
KL of the best feasible plan already measured (the incumbent): it can neither beat it nor tie it on
KL.  The plan chosen is the one measuring every type would choose, as long as the rules hold;
``--measure-all`` measures everything (benchmarks compare both).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..records import CacheCost, QuantCost


@dataclass(frozen=True)
class Skipped:
    """A quant type the plan did not measure, and why (shown in the plan table, kept in plan.json)."""

    quant: str
    rule: str  # 'too large' | 'cannot win'
    why: str

    def as_dict(self) -> dict:
        return {"quant": self.quant, "rule": self.rule, "why": self.why}


# Rule 2b: the most of the differently written weights that may sit at a sibling type of the same tier
NEAR_SHARE = 0.10
# Rule 2c: the least KL ratio of a surely worse type to a surely better one
ORDER_MARGIN = 1.1


def surely_better(a: QuantCost, b: QuantCost, exact_grids: frozenset[str] = frozenset()) -> bool:
    """Rule 2: ``a`` writes every tensor at ``b``'s type or a higher precision tier, one at least
    higher; rule 2b: or at a sibling type of ``b``'s tier for at most NEAR_SHARE of the weights the
    two write differently (weight counts from ``b``'s ``tensor_params``; without them, rule 2 only).
    ``exact_grids``: tensor types that may hold the source's grid exactly (never compared)."""
    from mka_edge.exporters.quant_types import PRECISION_TIER

    ma, mb = a.extra.get("tensor_map") or {}, b.extra.get("tensor_map") or {}
    if not ma or ma.keys() != mb.keys():
        return False
    params = b.extra.get("tensor_params") or {}
    higher = sibling = 0
    for name, tb in mb.items():
        ta = ma[name]
        if ta == tb:
            continue
        ra, rb = PRECISION_TIER.get(ta.upper()), PRECISION_TIER.get(tb.upper())
        if tb.upper() in exact_grids or ra is None or rb is None or ra < rb:
            return False
        if ra == rb:
            if name not in params:
                return False
            sibling += params[name]
        else:
            higher += params.get(name, 1)
    return higher > 0 and sibling <= NEAR_SHARE * (higher + sibling)


def quant_bound(q: str, sizes: dict[str, QuantCost], measured: dict[str, QuantCost], grids) -> tuple[float, str]:
    """The least KL type ``q`` can have (rules 2 and 2c over the measured types: ORDER_MARGIN times
    the KL of the worst type surely better than it; 0 without one) and the type that gives it (''
    when none).  ``sizes`` carry the tensor maps, ``measured`` the KL."""
    kl, by = 0.0, ""
    for p, c in measured.items():
        if p in sizes and c.kl is not None and c.kl * ORDER_MARGIN > kl and surely_better(sizes[p], sizes[q], grids):
            kl, by = c.kl * ORDER_MARGIN, p
    return kl, by


def check_order(sizes: dict[str, QuantCost], measured: dict[str, QuantCost], grids) -> list[str]:
    """Measured pairs that break rule 2 or its margin (2c): the plan records them and measures what
    the order skipped; none is expected."""
    out = []
    for a, ca in measured.items():
        for b, cb in measured.items():
            if a == b or a not in sizes or b not in sizes or ca.kl is None or cb.kl is None:
                continue
            if surely_better(sizes[a], sizes[b], grids) and ca.kl * ORDER_MARGIN > cb.kl:
                out.append(f"{a} ({ca.kl:.4f}) did not beat {b} ({cb.kl:.4f}) by {ORDER_MARGIN}x")
    return out


Feasible = Callable[[dict[str, QuantCost]], list]  # costs -> feasible search.Candidates


def best_kl(feasible: Feasible, measured: dict[str, QuantCost]) -> float | None:
    """The incumbent: the least KL among feasible plans of measured types (None: none is feasible)."""
    cands = feasible(measured) if measured else []
    return min((c.kl for c in cands), default=None)


def _least_kl(feasible: Feasible, c: QuantCost) -> float | None:
    """The least KL of a feasible plan with type cost ``c`` (None: it fits nowhere)."""
    return min((x.kl for x in feasible({c.quant: c})), default=None)


def next_to_measure(
    todo: list[str],
    sizes: dict[str, QuantCost],
    measured: dict[str, QuantCost],
    bound: Feasible,
    now: Feasible,
    grids,
    skipped: dict[str, Skipped],
    nowhere: str = "fits the budget and speed floor at no edit set and cache mode",
    prior: Callable[[str], float | None] | None = None,
) -> str | None:
    """The type to measure next, or None when none is worth measuring yet.

    ``now``: the feasible candidates over the edit sets known now (the unmerged model before the
    merge curves, their points after): the incumbent is the best measured one, and a type is worth
    measuring now only if its bound over them is below it (least bound first; larger first on a
    tie, as it bounds the smaller ones; with ``prior``, a type's KL guess, least predicted first:
    the order only decides how soon the incumbent is tight).  ``bound``: the candidates over every edit set any curve
    could reach (optimistic before the curves are known): a type whose bound over them reaches
    the incumbent, or that fits nowhere, goes into ``skipped`` and leaves ``todo``; the others wait."""
    inc = best_kl(now, measured)
    ranked, keep = [], []
    for q in todo:
        q_bound, by = quant_bound(q, sizes, measured, grids)
        lb = _least_kl(bound, sizes[q].with_kl(q_bound))
        if lb is None:
            skipped[q] = Skipped(q, "too large", nowhere)
            continue
        if inc is not None and lb >= inc:
            src = f"at least {ORDER_MARGIN}x {by}'s {measured[by].kl:.4f} nats by the precision order, " if by else ""
            skipped[q] = Skipped(
                q, "cannot win", f"its best plan is {src}at least {lb:.4f} nats >= {inc:.4f} of a measured plan"
            )
            continue
        keep.append(q)
        lb_now = _least_kl(now, sizes[q].with_kl(q_bound))
        if lb_now is not None and (inc is None or lb_now < inc):
            guess = prior(q) if prior is not None else None
            est = lb_now
            if guess is not None:
                est = _least_kl(now, sizes[q].with_kl(max(guess, q_bound)))
                est = lb_now if est is None else est
            ranked.append((est, lb_now, -sizes[q].total_bytes, q))
    todo[:] = keep
    return min(ranked)[-1] if ranked else None


def published_kl(q: str) -> float | None:
    """llama.cpp's published KL of ``q`` on Llama-3-8B (the lower of plain and with a matrix), the
    measuring order's guess (``next_to_measure``'s ``prior``); None for a type it has no row for."""
    from .quant_prior import KNOWN, prior_entry

    return prior_entry(q, [1], 0)["kl"] if q in KNOWN else None


# The least share of the f16 cache's decode speed any cache mode keeps (rule 6): SmolLM2's slowest,
# q4_0/q4_0+fa at context 4096 on a 2-core host, kept 0.44 (docs/results.md); halved for margin.
MIN_SPEED_SHARE = 0.22
# The same measurement per byte: a token's time is the weights' read plus the cache's, and SmolLM2's
# slowest mode spent 6.1x the f16 cache's time per byte of f16 cache (143 MB of Q8_0 weights, 47 MB
# of f16 cache on average over a 4096 context: (143 + 47) / 0.441 = 143 + 6.1 x 47).  Doubled for
# margin.  A larger model's cache is a smaller part of what a token reads, so its share stays higher.
CACHE_TIME_PER_BYTE = 12.2


def speed_share_floor(weight_bytes: float, f16_cache_bytes: float) -> float:
    """The least share of the f16 cache's decode speed a quantized cache mode can keep for a model
    reading ``weight_bytes`` per token beside ``f16_cache_bytes`` of f16 cache (the average over a
    generation, half the full cache): (W + H) / (W + CACHE_TIME_PER_BYTE x H), never below
    MIN_SPEED_SHARE.  A Qwen2.5-1.5B-shaped model at IQ4_XS and context 4096: 0.59."""
    w, h = max(0.0, weight_bytes), max(0.0, f16_cache_bytes)
    if w + h <= 0:
        return MIN_SPEED_SHARE
    return max(MIN_SPEED_SHARE, (w + h) / (w + CACHE_TIME_PER_BYTE * h))


def unsettled(
    cands: list, caches: dict[str, CacheCost], min_tps: float = float("inf"), share_floor=None
) -> tuple[str, str] | None:
    """What the best of ``cands`` (search.Candidate, by the plan's order: KL, then memory) still
    needs measured of its cache mode: ``(mode, "kl")``, ``(mode, "speed")``, or None when both are
    known, or its speed cannot matter.  An unmeasured mode's KL is a lower bound (a cost is never
    below zero) and its speed share 1.0 (a share only ever rules a plan out), so once the best
    candidate's mode is measured it is the candidate full measurement ranks first, and no other
    mode needs measuring.  Speed enters a plan only through the floor ``min_tps``: a candidate
    that reaches it even at its least possible share (rule 6: ``share_floor(candidate)``, default
    MIN_SPEED_SHARE) needs no timing."""
    if not cands:
        return None
    best = min(cands, key=lambda c: (c.kl, c.memory_mb))
    cache = caches[best.cache]
    if not cache.kl_measured:
        return best.cache, "kl"
    share = share_floor(best) if share_floor is not None else MIN_SPEED_SHARE
    if not cache.speed_measured and best.tps * share < min_tps:
        return best.cache, "speed"
    return None
