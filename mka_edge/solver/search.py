"""The search: every (edit set, weight type, cache mode) triple, the ones that fit the budget and
the speed target, and the best predicted quality among them.  Pure functions over plain data, so
the choice can be tested on synthetic cases and printed, diffed and re-checked.

The levers, each priced in memory and in predicted KL:
- the edit set: a point of a merge curve (whole layers removed; or, on llama.cpp targets,
  attention sub-blocks and layers removed by ``sleb-attn``);
- the weight quant type, quantized with an importance matrix where the probe measured that it helps;
- the cache mode: the attention path (flash attention or not) and the K / V cache types.

Quality rule: KL = KL(edit set) + KL(weight type on the unmerged model) + KL(cache mode on the
unmerged Q8_0 model): measured separately and added (its error is checked in docs/results.md).
The enumeration is a product of a few dozen edit sets, about ten types and at most six modes: a
few thousand cheap predictions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import UserError
from ..kv_cache import BASELINE_CACHE
from ..records import CacheCost, EditSet, QuantCost
from .cost_models import cost_model
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
    method: str = ""
    cache: str = BASELINE_CACHE
    imatrix: bool = False
    attn_layers: int | None = None  # layers keeping attention (None: all)
    kl_terms: dict | None = None  # {'edits', 'quant', 'cache'}
    mixed: str | None = None  # a mixed plan's types in a few words ("182 tensors at Q5_0, 29 at Q8_0")
    tensor_types: dict | None = None  # a mixed plan's allocation {original tensor name: ggml type}; not in as_dict

    @property
    def key(self) -> tuple:
        return (self.method, self.k, self.quant, self.cache)

    @property
    def label(self) -> str:
        """The plan in a few words: edits, weight type, cache mode."""
        attn = self.layers - (self.attn_layers if self.attn_layers is not None else self.layers)
        edits = f"K={self.k}" + (f" ({attn} attn)" if attn else "")
        return f"{edits} {self.quant}{'+imatrix' if self.imatrix else ''} {self.cache}"

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("tensor_types")  # a few hundred entries: plan.json keeps them once, in its ranked plans
        if d["mixed"] is None:
            d.pop("mixed")
        for key in ("memory_mb", "kl", "tps"):
            d[key] = round(d[key], 4)
        if d["kl_terms"]:
            d["kl_terms"] = {k: round(v, 5) for k, v in d["kl_terms"].items()}
        return d


def embedding_bytes(cost: QuantCost, shape: Shape) -> float:
    """Bytes of the token embedding in this type: llama.cpp's dry run says (``embd_bytes``); a cost
    without it (a measured file's) counts half the bytes outside the layers for an untied model,
    whose output matrix has the embedding's shape."""
    if "embd_bytes" in cost.extra:
        return float(cost.extra["embd_bytes"])
    return 0.0 if shape.tied_embeddings else cost.other / 2


def attention_share(shape: Shape) -> float:
    """Share of a block's weights in its attention (q, k, v, o): the bytes a removed attention
    sub-block takes out of a layer's quantized size (by parameter count; llama.cpp's mixes give
    some attention tensors more bits, so the built file is measured, not this)."""
    d, hd = shape.n_embd, shape.head_dim
    attn = 2 * d * shape.n_head * hd + 2 * d * shape.n_kv_head * hd
    return attn / (attn + 3 * d * shape.n_ff + 2 * d)


def edit_sets(curve: dict, method: str) -> list[EditSet]:
    """A merge curve (solver.quality.merge_curve's dict) as edit sets, one per K."""
    attn = curve.get("attn_removed") or [[] for _ in curve["kl"]]
    return [
        EditSet(method, k, tuple(curve["kept"][k]), tuple(attn[k]), float(kl))
        for k, kl in enumerate(curve["kl"])
        if k < len(curve["kept"])
    ]


def candidates(
    shape: Shape,
    edits: list[EditSet],
    probe: dict[str, QuantCost],
    caches: list[CacheCost],
    *,
    context: int,
    budget_mb: float,
    bandwidth_gbps: float,
    efficiency: float,
    min_tps: float,
    max_kl: float,
    overhead_mb: float,
) -> list[Candidate]:
    """Every (edit set, weight type, cache mode) with its predicted memory, speed and KL.  Each
    cost's target supplies the memory model and the KV bytes."""
    share = attention_share(shape)
    out = []
    for e in edits:
        sh = shape.with_layers(e.layers, e.attn_layers if e.attn_removed else None)
        for quant, cost in probe.items():
            target = cost_model(cost.target)
            wb, rb = cost.weight_bytes(list(e.kept))
            if e.attn_removed and not cost.extra.get("exact_edit"):  # a mixed cost already left them out
                per = cost.per_layer
                rep = cost.repack_per_layer or (0.0,) * len(per)
                wb -= share * sum(per[i] for i in e.attn_removed)
                rb -= share * sum(rep[i] for i in e.attn_removed)
            imatrix = bool(cost.extra.get("imatrix", False))
            for cc in caches:
                mem = target.predict_memory(sh, cost, wb, rb, context, cc.mode, overhead_mb)
                kv = target.kv_bytes(sh, context, quant, cc.mode)
                embd = embedding_bytes(cost, shape)
                tps = predict_tps(bandwidth_gbps, bytes_per_token(wb, kv, shape.tied_embeddings, embd), efficiency)
                tps *= cc.speed_factor
                terms = {"edits": e.kl, "quant": cost.kl or 0.0, "cache": cc.kl}  # sizes alone carry no KL
                kl = sum(terms.values())
                out.append(
                    Candidate(
                        e.k,
                        quant,
                        e.layers,
                        mem.total_mb,
                        mem.as_dict(),
                        kl,
                        tps,
                        mem.total_mb <= budget_mb,
                        tps >= min_tps,
                        kl <= max_kl,
                        e.method,
                        cc.mode,
                        imatrix,
                        e.attn_layers if e.attn_removed else None,
                        terms,
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


def refuse_if_nothing_fits(
    cands: list[Candidate], budget_mb: float, context: int, at_least: bool = False, forbidden: str = ""
) -> None:
    """The one refusal of a budget no plan meets, with the smallest footprint and what to relax.
    ``at_least``: the figures are lower bounds (the early check, before measuring); ``forbidden``:
    the levers the profile or command line ruled out, named so the user knows what else could fit."""
    if any(c.fits_memory for c in cands):
        return
    small = min(cands, key=lambda c: c.memory_mb)
    kv = small.memory_terms["kv_mb"]
    raise UserError(
        f"no plan fits the {budget_mb:.0f} MB budget: the smallest footprint reachable is "
        f"{'at least ' if at_least else ''}{small.memory_mb:.0f} MB "
        f"({small.label}, {kv:.0f} MB of it KV cache at context {context}"
        f"{'; ' + forbidden if forbidden else ''}); raise --budget-mb to at "
        f"least {small.memory_mb + 1:.0f} or lower --context"
    )


def _lever_notes(best: Candidate, feasible: list[Candidate]) -> list[str]:
    """Why the chosen plan beats the best plan without each lever it uses."""
    notes = []

    def best_where(pred) -> Candidate | None:
        pool = [c for c in feasible if pred(c)]
        return min(pool, key=lambda c: (c.kl, c.memory_mb)) if pool else None

    if best.k > 0:
        u = best_where(lambda c: c.k == 0)
        notes.append(
            f"its {best.k} removal step{'s' if best.k > 1 else ''} ({best.method}) beat the best plan without any "
            + (f"({u.label}, {u.kl:.3f} nats)" if u else "(none fits)")
        )
    if best.attn_layers is not None:
        w = best_where(lambda c: c.attn_layers is None)
        notes.append(
            "removing attention sub-blocks beats whole-layer removal only "
            + (f"({w.label}, {w.kl:.3f} nats)" if w else "(no such plan fits)")
        )
    if best.cache != BASELINE_CACHE:
        b = best_where(lambda c: c.cache == BASELINE_CACHE)
        notes.append(
            f"the {best.cache} cache beats the f16 cache without flash attention "
            + (f"({b.label}, {b.kl:.3f} nats)" if b else "(no plan with it fits)")
        )
    if best.tensor_types is not None:
        u = best_where(lambda c: c.tensor_types is None)
        notes.append(
            f"mixed: {best.mixed}; beat the best plan with one type "
            + (f"({u.label}, {u.kl:.3f} nats)" if u else "(none fits)")
        )
    elif best.imatrix:
        p = best_where(lambda c: c.quant == best.quant and not c.imatrix)
        if p is None:
            notes.append(f"{best.quant} with an importance matrix measured lower KL than without")
    return notes


def choose(
    cands: list[Candidate], budget_mb: float, min_tps: float, context: int, forbidden: str = ""
) -> tuple[list[Candidate], str]:
    """Feasible candidates ranked best first (least predicted KL, then least memory) and the reason."""
    if not cands:
        raise UserError("no candidate plans to choose from")
    refuse_if_nothing_fits(cands, budget_mb, context, forbidden=forbidden)
    fit_mem = [c for c in cands if c.fits_memory]
    feasible = [c for c in fit_mem if c.fits_speed]
    if not feasible:
        fast = max(fit_mem, key=lambda c: c.tps)
        raise UserError(
            f"no plan within the memory budget reaches {min_tps:g} tokens/s: the fastest is predicted at "
            f"{fast.tps:.1f} tokens/s ({fast.label}); lower the profile's min_tokens_per_s or pick a faster device"
        )
    ranked = sorted(feasible, key=lambda c: (c.kl, c.memory_mb))
    best = ranked[0]
    why = [
        f"least predicted quality loss ({best.kl:.3f} nats) among {len(feasible)} plans that fit "
        f"{budget_mb:.0f} MB and reach {min_tps:g} tokens/s"
    ]
    why += _lever_notes(best, feasible)
    nxt = next((c for c in ranked[1:] if c.kl > best.kl + 1e-9), None)
    if nxt is not None:
        why.append(f"next best: {nxt.label}, {nxt.kl:.3f} nats, {nxt.memory_mb:.0f} MB")
    if not best.meets_quality:
        why.append("it misses the quality bar; no feasible plan meets it")
    return ranked, "; ".join(why)
