"""Mixed plans (issue 25): for each edit set, every tensor its own type under what the budget
leaves for the weights, with layer and attention removal as the zero-bit end of the same budget.

Pure: the per-tensor costs come measured (``tensor_probe.sensitivity``, a ``Sensitivity``), the
memory and speed models from the target, and the allocation is ``allocate.allocate_at``.  Per
edit set the removed layers' tensors (and the attention tensors of blocks kept without
attention) are simply absent: their bytes are free for the rest, their loss is the edit set's
measured KL.  So one ranking decides between dropping a layer and lowering many tensors' types.

How a budget in MB becomes bytes for the allocation: the target's memory model is linear in the
weight bytes and in the repacked copies' bytes (``solver/memory.predict``); its slope in each is
read off two evaluations, so the allocation is budgeted in resident bytes (a repacked tensor
counts its copy too) and respects the same margin as every other plan.  The decode-speed floor
caps the weight bytes the same way.  Each allocation is then predicted as a candidate exactly as
a uniform type is (``search.candidates``), so the same checks decide whether it fits.

The prediction adds the edit set's KL, the mix's predicted KL on the unmerged model (the all-Q8_0
file's measured KL plus each kept tensor's calibrated error) and the cache mode's, as the
uniform plans do; a build measures the file it writes, and falls back on a miss.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from ..records import CacheCost, EditSet, QuantCost
from .allocate import Allocation, allocate_at
from .cost_models import cost_model
from .memory import Shape, repacked
from .search import Candidate
from .search import candidates as enumerate_candidates
from .tensor_sensitivity import Sensitivity

MIXED = "MIXED"  # the weight "type" of a mixed plan in candidates, plans and manifests
GIB = 2**30


def kept_tensors(sens: Sensitivity, edit: EditSet) -> list[str]:
    """The 2-D weights a model after ``edit`` still has, in the original model's names."""
    kept, no_attn = set(edit.kept), set(edit.attn_removed)
    return [
        n
        for n, r in sens.table.items()
        if r.layer is None or (r.layer in kept and not (r.layer in no_attn and r.kind.startswith("attn_")))
    ]


def renumbered(types: dict[str, str], kept: list[int]) -> dict[str, str]:
    """An allocation in the original model's tensor names as the edited model's: block ``kept[i]``
    is block ``i`` after the merge (a merged folder numbers its blocks from 0)."""
    from .tensor_sensitivity import kind_of

    new = {old: i for i, old in enumerate(kept)}
    out = {}
    for name, t in types.items():
        kind, layer = kind_of(name)
        if layer is None:
            out[name] = t
        elif layer in new:
            out[f"blk.{new[layer]}.{kind}.weight"] = t
    return out


def planned_bytes(sens: Sensitivity, types: dict[str, str], kept: list[int], attn_removed=()) -> int:
    """Tensor bytes of the file a mixed plan writes: its tensors at their types plus the kept
    layers' and the outside's tensors no allocation changes (norms, biases; a layer kept without
    attention has no attention norm)."""
    return sens.fixed_bytes(kept, attn_removed) + sum(sens.table[n].bytes[q] for n, q in types.items())


def mixed_cost(sens: Sensitivity, alloc: Allocation, target: str, kl: float, attn_removed=()) -> QuantCost:
    """The allocation as the cost record every plan is priced from: bytes per original layer (the
    removed layers' at 0), outside the layers, the repacked part, and the predicted KL."""
    per = [float(sens.fixed_layer(i, i in attn_removed)) for i in range(len(sens.fixed_per_layer))]
    rep = [0.0] * len(per)
    other = float(sens.fixed_other)
    embd = 0.0
    for n, q in alloc.types.items():
        r = sens.table[n]
        b = float(r.bytes[q])
        if r.layer is None:
            other += b
            embd += b if r.kind == "token_embd" else 0.0
        else:
            per[r.layer] += b
            if repacked(r.actual[q], r.rows):
                rep[r.layer] += b
    return QuantCost(
        MIXED,
        target,
        tuple(per),
        other,
        tuple(rep),
        kl,
        extra={"imatrix": True, "embd_bytes": embd, "exact_edit": True},
    )


def mixed_candidates(
    sens: Sensitivity,
    shape: Shape,
    edits: list[EditSet],
    caches: list[CacheCost],
    *,
    target: str,
    incumbent_kl: float,
    **plan,
) -> list[Candidate]:
    """A mixed candidate per (edit set, cache mode) that could beat ``incumbent_kl`` (the best
    feasible plan with one type): an edit set whose KL plus the all-Q8_0 floor is already no
    better is skipped.  ``plan``: ``search.candidates``' keyword arguments (context, budget_mb,
    bandwidth_gbps, efficiency, min_tps, max_kl, overhead_mb)."""
    t = cost_model(target)
    out = []
    floor_kl = sens.floor[1]
    for e in edits:
        if e.kl + floor_kl >= incumbent_kl:
            continue
        names = kept_tensors(sens, e)
        fixed = sens.fixed_bytes(e.kept, e.attn_removed)
        sh = shape.with_layers(e.layers, e.attn_layers if e.attn_removed else None)
        probe = QuantCost(MIXED, target, (0.0,), 0.0)
        budgets, slopes = [], []
        for cc in caches:
            base = t.predict_memory(sh, probe, fixed, 0.0, plan["context"], cc.mode, plan["overhead_mb"]).total_mb
            per_w = (
                t.predict_memory(sh, probe, fixed + GIB, 0.0, plan["context"], cc.mode, plan["overhead_mb"]).total_mb
                - base
            ) / GIB
            per_r = (
                t.predict_memory(sh, probe, fixed, GIB, plan["context"], cc.mode, plan["overhead_mb"]).total_mb - base
            ) / GIB
            room = (plan["budget_mb"] - base) / per_w if per_w > 0 else float("inf")
            kv = t.kv_bytes(sh, plan["context"], MIXED, cc.mode)
            if plan["min_tps"] > 0:  # weight bytes read per token at most what the speed floor allows
                most = plan["efficiency"] * plan["bandwidth_gbps"] * 1e9 * cc.speed_factor / plan["min_tps"]
                room = min(room, most - 0.5 * kv - fixed)
            budgets.append(max(room, 0.0))
            slopes.append(per_r / per_w if per_w > 0 else 1.0)
        # one allocation table per edit set, in the resident bytes of the most repacking cache mode
        ratio = max(slopes)
        opts = sens.options(
            names,
            resident=lambda r, q: int(
                r.bytes[q] * (1 + (ratio if r.layer is not None and repacked(r.actual[q], r.rows) else 0))
            ),
        )
        for cc, alloc in zip(caches, allocate_at(opts, budgets)):
            if alloc is None:
                continue
            types = alloc.types
            cost = mixed_cost(sens, alloc, target, sens.predict(types), e.attn_removed)
            (c,) = enumerate_candidates(shape, [e], {MIXED: cost}, [cc], **plan)
            out.append(replace(c, tensor_types=dict(types), mixed=_summary(sens, types)))
    return out


def _summary(sens: Sensitivity, types: dict[str, str]) -> str:
    """ "182 tensors at Q5_0, 29 at Q8_0" in the types llama.cpp writes (a K-quant request a row
    cannot take is named by its fallback)."""
    counts = Counter(sens.table[n].actual[q] for n, q in types.items()).most_common()
    parts = [f"{c} at {a}" for a, c in counts]
    return (
        (parts[0].replace(" at ", " tensors at ", 1) + (", " + ", ".join(parts[1:]) if parts[1:] else ""))
        if parts
        else ""
    )
