"""The search: every (K, quant type) pair, the ones that fit the budget and the speed target,
and the best predicted quality among them.  Pure functions over plain data, so the choice can be
tested on synthetic cases and printed, diffed and re-checked."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import UserError
from ..records import QuantCost
from ..targets import get_target
from .memory import Shape
from .speed import bytes_per_token, predict_tps


@dataclass
class Candidate:
    k: int
    quant: str
    layers: int
    memory_mb: float
    memory_terms: dict
    kl: float
    tps: float
    fits_memory: bool
    fits_speed: bool
    meets_quality: bool

    def as_dict(self) -> dict:
        d = asdict(self)
        for key in ("memory_mb", "kl", "tps"):
            d[key] = round(d[key], 4)
        return d


def candidates(
    shape: Shape,
    curve_kl: list[float],
    kept: list[list[int]],
    probe: dict[str, QuantCost],
    *,
    context: int,
    kv_type: str,
    budget_mb: float,
    bandwidth_gbps: float,
    efficiency: float,
    min_tps: float,
    max_kl: float,
    overhead_mb: float,
) -> list[Candidate]:
    """Every (K, quant) pair with its predicted memory, speed and KL.  Each cost's target supplies
    the memory model and the KV bytes."""
    out = []
    for k, kl_merge in enumerate(curve_kl):
        layers = shape.n_layers - k
        sh = shape.with_layers(layers)
        for quant, cost in probe.items():
            target = get_target(cost.target)
            wb, rb = cost.weight_bytes(kept[k] if k < len(kept) else layers)
            mem = target.predict_memory(sh, cost, wb, rb, context, kv_type, overhead_mb)
            kv = target.kv_bytes(sh, context, quant, kv_type)
            tps = predict_tps(bandwidth_gbps, bytes_per_token(wb, kv, shape.tied_embeddings), efficiency)
            kl = kl_merge + (cost.kl or 0.0)  # sizes alone (the early check) carry no KL
            out.append(
                Candidate(
                    k,
                    quant,
                    layers,
                    mem.total_mb,
                    mem.as_dict(),
                    kl,
                    tps,
                    mem.total_mb <= budget_mb,
                    tps >= min_tps,
                    kl <= max_kl,
                )
            )
    return out


def pareto(cands: list[Candidate]) -> list[Candidate]:
    """Candidates no other beats on both memory and quality (sorted by memory)."""
    front, best_kl = [], float("inf")
    for c in sorted(cands, key=lambda c: (c.memory_mb, c.kl)):
        if c.kl < best_kl - 1e-12:
            front.append(c)
            best_kl = c.kl
    return front


def refuse_if_nothing_fits(cands: list[Candidate], budget_mb: float, context: int, at_least: bool = False) -> None:
    """The one refusal of a budget no plan meets, with the smallest footprint and what to relax.
    ``at_least``: the figures are lower bounds (the early check, before measuring)."""
    if any(c.fits_memory for c in cands):
        return
    small = min(cands, key=lambda c: c.memory_mb)
    kv = small.memory_terms["kv_mb"]
    raise UserError(
        f"no plan fits the {budget_mb:.0f} MB budget: the smallest footprint reachable is "
        f"{'at least ' if at_least else ''}{small.memory_mb:.0f} MB "
        f"(K={small.k}, {small.quant}, {kv:.0f} MB of it KV cache at context {context}); raise --budget-mb to at "
        f"least {small.memory_mb + 1:.0f} or lower --context"
    )


def choose(cands: list[Candidate], budget_mb: float, min_tps: float, context: int) -> tuple[list[Candidate], str]:
    """Feasible candidates ranked best first (least predicted KL, then least memory) and the reason."""
    if not cands:
        raise UserError("no candidate plans to choose from")
    refuse_if_nothing_fits(cands, budget_mb, context)
    fit_mem = [c for c in cands if c.fits_memory]
    feasible = [c for c in fit_mem if c.fits_speed]
    if not feasible:
        fast = max(fit_mem, key=lambda c: c.tps)
        raise UserError(
            f"no plan within the memory budget reaches {min_tps:g} tokens/s: the fastest is predicted at "
            f"{fast.tps:.1f} tokens/s (K={fast.k}, {fast.quant}); lower the profile's min_tokens_per_s or pick a faster device"
        )
    ranked = sorted(feasible, key=lambda c: (c.kl, c.memory_mb))
    best = ranked[0]
    unmerged = [c for c in feasible if c.k == 0]
    why = [
        f"least predicted quality loss ({best.kl:.3f} nats) among {len(feasible)} plans that fit "
        f"{budget_mb:.0f} MB and reach {min_tps:g} tokens/s"
    ]
    if best.k > 0:
        if unmerged:
            u = min(unmerged, key=lambda c: c.kl)
            why.append(
                f"merging {best.k} layer{'s' if best.k > 1 else ''} beats the best unmerged plan ({u.quant}, {u.kl:.3f} nats)"
            )
        else:
            why.append("no unmerged plan fits, so layers must be merged")
    if not best.meets_quality:
        why.append("it misses the quality bar; no feasible plan meets it")
    return ranked, "; ".join(why)
