"""Merge methods behind one interface: each yields a trajectory, one step per merged layer (for
sleb-attn, per removal unit: an attention sub-block or a whole layer; see ``sleb_attn``).

A step records the composition of the whole stack after it (see ``fusion``), what was done,
the similarity behind it, the alpha, and the calibration KL. Iterative methods pass through
every smaller K on the way to K_max, so one run serves all K <= K_max.  Each method is a
generator: a caller that learns after step K that it needs no more (the plan's curve rule,
``solver.quality.merge_curve``) stops it there and pays for nothing beyond K.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from ..errors import UserError
from ..models.attention_removal import attention_removed
from .attention import single_source, unit_bytes, without_attention
from .context import MergeContext
from .fusion import Composition, fuse, keep_only, realize_layer, remove
from .method_table import ALL_METHODS, AUTO_POOL, ROWS  # noqa: F401 - re-exported for callers

Step = dict  # the fields of merge_log.MergeStep, plus "composition"; a dict for the JSON trajectory cache
Trajectory = Iterator[Step]


def _sources(comp: Composition, pos: int) -> list[int]:
    return sorted(comp[pos])


def _tail_after_fusion(ctx: MergeContext, comp: Composition, pos: int) -> list:
    layers = ctx.current_layers()
    return [realize_layer(ctx.originals, comp[pos], ctx.names)] + layers[pos + 2 :]


def _alpha_search(ctx: MergeContext, pos: int, grid) -> tuple[float, float, dict]:
    """Calibrated alpha: the grid point with the least calibration KL. The grid holds 0 and 1
    (plain removal of one layer of the pair), so the fusion is never worse than that removal."""
    tried = {}
    for a in grid:
        cand = fuse(ctx.comp, pos, a)
        tried[a] = ctx.engine.loss_from(pos, _tail_after_fusion(ctx, cand, pos))
    best = min(tried, key=lambda a: (tried[a], abs(a - 0.5)))
    return best, tried[best], tried


def _pick_alpha(ctx: MergeContext, pos: int, sim: float, rule: str) -> tuple[float, float | None, dict]:
    if rule == "paper":
        return sim, None, {}
    if rule == "calibrated":
        return _alpha_search(ctx, pos, ctx.settings.alpha_grid)
    return float(rule), None, {}


def _fusion_step(
    ctx: MergeContext,
    k: int,
    pos: int,
    alpha: float,
    sim: float,
    loss: float | None,
    method: str,
    extra: dict | None = None,
) -> Step:
    before = (_sources(ctx.comp, pos), _sources(ctx.comp, pos + 1))
    new = fuse(ctx.comp, pos, alpha)
    if loss is None:
        loss = ctx.engine.loss_from(pos, _tail_after_fusion(ctx, new, pos))
    ctx.apply(new)
    step = {
        "k": k,
        "action": "fuse",
        "position": pos,
        "pair_sources": [before[0], before[1]],
        "alpha": round(float(alpha), 6),
        "similarity": round(float(sim), 6),
        "calib_kl": loss,
        "composition": new,
        "method": method,
    }
    step.update(extra or {})
    return step


def _removal_step(ctx: MergeContext, k: int, comp: Composition, loss: float | None, method: str, info: dict) -> Step:
    if loss is None:
        ctx.apply(comp)
        loss = ctx.engine.current_loss()
    return {"k": k, "action": "remove", "calib_kl": loss, "composition": comp, "method": method, **info}


# ---- MKA, literal: iterative, most similar adjacent pair anywhere, alpha by rule ----------------
def mka_iterative(ctx: MergeContext, k_max: int, alpha: str, bar) -> Trajectory:
    ctx.reset()
    for k in range(1, k_max + 1):
        sim = ctx.similarity().adjacent()
        pos = max(range(len(sim)), key=lambda i: sim[i])
        a, loss, _ = _pick_alpha(ctx, pos, sim[pos], alpha)
        step = _fusion_step(ctx, k, pos, a, sim[pos], loss, "mka", {"adjacent_similarity": sim})
        bar.update(1)
        yield step


# ---- MKA one-shot: similarity once, the K most similar pairs fused in order -------------------
def mka_oneshot(ctx: MergeContext, k_max: int, alpha: str, bar) -> Trajectory:
    """Overlaps: edges are applied in order of similarity; an edge that touches an already fused
    group fuses that group's current weights (alpha) with its neighbour (1 - alpha), so a chain of
    neighbouring picks folds into one group."""
    ctx.reset()
    sim = ctx.similarity().adjacent()
    order = sorted(range(len(sim)), key=lambda i: -sim[i])[:k_max]
    groups = [[i] for i in range(ctx.n_original)]  # membership, even where a weight became 0
    for k, edge in enumerate(order, 1):
        pos = next(j for j, g in enumerate(groups) if edge in g)
        groups[pos : pos + 2] = [groups[pos] + groups[pos + 1]]
        a, loss, _ = _pick_alpha(ctx, pos, sim[edge], alpha)
        step = _fusion_step(ctx, k, pos, a, sim[edge], loss, "mka-oneshot", {"edge": [edge, edge + 1]})
        bar.update(1)
        yield step


# ---- default fusion: protected ends, loss-guided choice among the most similar pairs ----------
def mka_guided(ctx: MergeContext, k_max: int, alpha: str, bar) -> Trajectory:
    """NMI shortlists the ``candidates`` most similar adjacent pairs (never the first or last
    layer, whose fusion broke the model in our measurements); each is scored on calibration KL
    at alpha 0, 0.5 and 1, the best pair is refined over the full grid, and the least-loss
    fusion is taken. ``alpha`` other than 'calibrated' fixes alpha and only the pair is chosen."""
    ctx.reset()
    for k in range(1, k_max + 1):
        sim = ctx.similarity().adjacent()
        n = len(ctx.comp)
        eligible = [p for p in range(1, n - 2)] or list(range(n - 1))
        short = sorted(eligible, key=lambda p: -sim[p])[: ctx.settings.candidates]
        scores = {}
        for p in short:
            if alpha == "calibrated":
                coarse = [g for g in ctx.settings.alpha_grid if g in (0.0, 0.5, 1.0)] or list(ctx.settings.alpha_grid)
                a, loss, _ = _alpha_search(ctx, p, coarse)
            else:
                a = sim[p] if alpha == "paper" else float(alpha)
                loss = ctx.engine.loss_from(p, _tail_after_fusion(ctx, fuse(ctx.comp, p, a), p))
            scores[p] = (loss, a)
        pos = min(scores, key=lambda p: scores[p][0])
        loss, a = scores[pos]
        if alpha == "calibrated":
            a, loss, _ = _alpha_search(ctx, pos, ctx.settings.alpha_grid)
        step = _fusion_step(
            ctx,
            k,
            pos,
            a,
            sim[pos],
            loss,
            "mka-guided",
            {"shortlist": {str(p): [round(v[0], 6), v[1]] for p, v in scores.items()}},
        )
        bar.update(1)
        yield step


# ---- removal baselines ------------------------------------------------------------------------
def drop_last(ctx: MergeContext, k_max: int, alpha: str, bar) -> Trajectory:
    L = ctx.n_original
    for k in range(1, k_max + 1):
        step = _removal_step(
            ctx, k, keep_only(L, range(L - k, L)), None, "drop-last", {"removed": list(range(L - k, L))}
        )
        bar.update(1)
        yield step


def shortgpt(ctx: MergeContext, k_max: int, alpha: str, bar) -> Trajectory:
    """Block Influence BI_l = 1 - mean cos(x_l, x_{l+1}); remove the K lowest in one shot."""
    ctx.reset()
    st = ctx.activations().states
    cos = torch.nn.functional.cosine_similarity(st[:-1], st[1:], dim=-1).mean(1)
    bi = (1 - cos).tolist()
    order = sorted(range(len(bi)), key=lambda i: bi[i])
    for k in range(1, k_max + 1):
        gone = sorted(order[:k])
        step = _removal_step(
            ctx,
            k,
            keep_only(ctx.n_original, gone),
            None,
            "shortgpt",
            {"removed": gone, "block_influence": [round(b, 6) for b in bi]},
        )
        bar.update(1)
        yield step


def angular(ctx: MergeContext, k_max: int, alpha: str, bar) -> Trajectory:
    """Gromov et al.: cut the block of n layers minimising arccos(cos(h_l, h_{l+n}))/pi, last token."""
    ctx.reset()
    last = ctx.activations().last_token  # [L+1, B, d]
    L = ctx.n_original
    for k in range(1, k_max + 1):
        d = [
            float(
                torch.arccos(torch.nn.functional.cosine_similarity(last[l], last[l + k], dim=-1).clamp(-1, 1)).mean()
                / math.pi
            )
            for l in range(L - k + 1)
        ]
        start = min(range(len(d)), key=lambda l: d[l])
        gone = list(range(start, start + k))
        step = _removal_step(
            ctx, k, keep_only(L, gone), None, "angular", {"removed": gone, "angular_distance": round(d[start], 6)}
        )
        bar.update(1)
        yield step


def _greedy_removal(
    ctx: MergeContext, k: int, pos: int, loss: float, method: str, extra: dict, bar, partial: bool = False
) -> Step:
    """Remove the layer at ``pos`` of the working stack (the greedy searches' step) and record it.
    ``partial``: recompute the cached hidden states from ``pos`` on only (those before are unchanged)."""
    orig = _sources(ctx.comp, pos)
    new = remove(ctx.comp, pos)
    ctx.apply(new, refresh=not partial)
    if partial:
        ctx.engine.refresh_from(pos)
    gone = sorted(set(range(ctx.n_original)) - {i for c in new for i in c})
    bar.update(1)
    return {
        "k": k,
        "action": "remove",
        "removed_now": orig,
        "removed": gone,
        "calib_kl": loss,
        "composition": new,
        "method": method,
        **extra,
    }


def sleb(ctx: MergeContext, k_max: int, alpha: str, bar) -> Trajectory:
    """SLEB-style greedy removal: at each step drop the layer whose removal costs least calibration KL."""
    ctx.reset()
    for k in range(1, k_max + 1):
        layers = ctx.current_layers()
        losses = [ctx.engine.loss_from(p, layers[p + 1 :]) for p in range(len(layers))]
        pos = min(range(len(losses)), key=lambda p: losses[p])
        yield _greedy_removal(ctx, k, pos, losses[pos], "sleb", {}, bar)


SCREEN_FRACTION = 4  # sleb-fast screens on the first 1/4 of the positions of every calibration sequence
CONFIRM = 3  # and confirms the best 3 screened candidates on sleb's full loss


def shortlist_size(n_layers: int) -> int:
    """How many candidates sleb-fast screens per step: the least block-influential third of the
    layers, at least 6 (10 of SmolLM2's 30, 11 of Llama-3-8B's 32)."""
    return max(6, math.ceil(n_layers / 3))


def block_influence(states: list[list[torch.Tensor]]) -> list[float]:
    """1 - mean cos(hidden entering layer p, hidden leaving it) per current layer, from the cached
    hidden states (no forward pass); position 0 (the attention sink, a huge outlier) is left out."""
    n = len(states[0]) - 1
    sims = torch.zeros(n)
    count = 0
    for st in states:
        for p in range(n):
            a, b = st[p][:, 1:].float(), st[p + 1][:, 1:].float()
            sims[p] += torch.nn.functional.cosine_similarity(a, b, dim=-1).sum().cpu()
        count += st[0][:, 1:].shape[0] * st[0][:, 1:].shape[1]
    return (1 - sims / count).tolist()


def sleb_fast(ctx: MergeContext, k_max: int, alpha: str, bar) -> Trajectory:
    """sleb at a fraction of the cost, in three filters per step.

    1. Shortlist: the ``shortlist_size`` layers of least block influence, read from the hidden
       states the engine already holds (no forward pass).
    2. Screen: each shortlisted removal scored on calibration KL over the first quarter of the
       positions of every calibration sequence (a quarter of a tail pass; every text is seen).
    3. Confirm: the ``CONFIRM`` best screened are scored on sleb's full calibration loss and the
       least is taken; afterwards only the hidden states from the removed position on are recomputed.
    sleb scores every layer on every position: ~30 full tail passes per step on SmolLM2, against
    ~10 quarter passes and 3 full ones here.  Why a prefix of every sequence and not some whole
    sequences: on SmolLM2 the prefix screen ranked sleb's choice first at each of three states
    tried, one whole sequence of four ranked it 6th, 1st and 2nd (docs/results.md)."""
    ctx.reset()
    prefix = max(1, ctx.engine.batches[0].shape[1] // SCREEN_FRACTION)
    for k in range(1, k_max + 1):
        layers = ctx.current_layers()
        bi = block_influence(ctx.engine.inputs)
        short = sorted(range(len(layers)), key=lambda p: bi[p])[: shortlist_size(len(layers))]
        screen = {p: ctx.engine.kl_sum(p, layers[p + 1 :], prefix=prefix) for p in short}
        screen = {p: t / c for p, (t, c) in screen.items()}
        best = sorted(short, key=lambda p: screen[p])[:CONFIRM]
        losses = {p: ctx.engine.loss_from(p, layers[p + 1 :]) for p in best}
        pos = min(best, key=lambda p: losses[p])
        extra = {
            "shortlist": {str(p): round(screen[p], 6) for p in short},
            "confirmed": {str(p): round(losses[p], 6) for p in best},
        }
        yield _greedy_removal(ctx, k, pos, losses[pos], "sleb-fast", extra, bar, partial=True)


# ---- sleb-attn: attention sub-blocks or whole layers, the least KL per reference byte ----------
def _per_byte(delta: float, nbytes: int) -> tuple[float, int]:
    """Sort key of a removal unit: calibration KL increase per byte saved, least first; a unit that
    costs nothing (or lowers the KL) is 0 per byte, and among those the largest goes first."""
    return max(delta, 0.0) / nbytes, -nbytes


def sleb_attn(ctx: MergeContext, k_max: int, alpha: str, bar) -> Trajectory:
    """Greedy removal in units of an attention sub-block or a whole layer, chosen by calibration KL
    increase per reference byte saved (``attention.unit_bytes``: F16 weights plus the f16 KV cache
    at ``settings.ref_context`` tokens; a layer whose attention is already gone saves its MLP and
    norm only).  One step per unit, so K counts units, not layers.

    Per step, sleb-fast's filters: the candidates are the attention of every layer that still has
    it (never the first layer's: llama.cpp's deci reads the head size from layer 0) and the
    ``shortlist_size`` layers of least block influence (a whole first layer only when the second
    keeps its attention); each is screened on the first quarter of every calibration sequence, the
    ``CONFIRM`` best by screened KL per byte are scored on the full calibration loss, and the
    least per byte is taken; then the cached hidden states are recomputed from its position on.
    The baselines per byte are the stack's own losses, which the previous step measured (its
    chosen candidate's screened and full KL), so no extra pass is needed."""
    ctx.reset()
    cfg, ref_ctx = ctx.model.config, ctx.settings.ref_context
    sizes = [unit_bytes(b, ctx.arch, cfg, ref_ctx) for b in ctx.originals]  # (attention, rest) per layer
    gone_attn = set(attention_removed(cfg))  # a source may have lost some attention already
    if gone_attn:
        ctx.apply(ctx.comp, attn_removed=gone_attn)
    prefix = max(1, ctx.engine.batches[0].shape[1] // SCREEN_FRACTION)
    base_screen = base_full = 0.0
    saved = 0
    for k in range(1, k_max + 1):
        layers, comp = ctx.current_layers(), ctx.comp
        orig = [single_source(c) for c in comp]
        units: dict[tuple[str, int], int] = {}  # (unit, position) -> reference bytes it saves
        for p in range(1, len(layers)):
            if orig[p] not in gone_attn:
                units[("attention", p)] = sizes[orig[p]][0]
        if len(layers) > 1:
            bi = block_influence(ctx.engine.inputs)
            for p in sorted(range(len(layers)), key=lambda p: bi[p])[: shortlist_size(len(layers))]:
                if p == 0 and orig[1] in gone_attn:
                    continue
                units[("layer", p)] = sizes[orig[p]][1] + (0 if orig[p] in gone_attn else sizes[orig[p]][0])
        if not units:
            return

        def tail(unit: str, p: int) -> list:
            return (
                [without_attention(layers[p], ctx.arch)] + layers[p + 1 :] if unit == "attention" else layers[p + 1 :]
            )

        screen = {}
        for u in units:
            t, c = ctx.engine.kl_sum(u[1], tail(*u), prefix=prefix)
            screen[u] = t / c
        best = sorted(units, key=lambda u: _per_byte(screen[u] - base_screen, units[u]))[:CONFIRM]
        losses = {u: ctx.engine.loss_from(u[1], tail(*u)) for u in best}
        unit, pos = choice = min(best, key=lambda u: _per_byte(losses[u] - base_full, units[u]))
        layer = orig[pos]
        if unit == "attention":
            gone_attn.add(layer)
            new = comp
        else:
            gone_attn.discard(layer)
            new = remove(comp, pos)
        saved += units[choice]
        ctx.apply(new, refresh=False, attn_removed=gone_attn)
        ctx.engine.refresh_from(pos)
        base_screen, base_full = screen[choice], losses[choice]
        name = {u: f"{u[0]} {orig[u[1]]}" for u in units}  # original numbering
        removed = sorted(set(range(ctx.n_original)) - {i for c in new for i in c})
        bar.update(1)
        yield {
            "k": k,
            "action": "remove-attention" if unit == "attention" else "remove",
            "unit": unit,
            "layer": layer,
            **({"removed_now": [layer]} if unit == "layer" else {}),
            "removed": removed,
            "attn_removed": sorted(gone_attn),
            "bytes_saved": saved,
            "ref_context": ref_ctx,
            "calib_kl": losses[choice],
            "composition": new,
            "method": "sleb-attn",
            "shortlist": {name[u]: [round(screen[u], 6), units[u]] for u in units},
            "confirmed": {name[u]: round(losses[u], 6) for u in best},
        }


METHODS: dict[str, Callable] = {
    "mka": mka_iterative,
    "mka-oneshot": mka_oneshot,
    "mka-guided": mka_guided,
    "drop-last": drop_last,
    "shortgpt": shortgpt,
    "angular": angular,
    "sleb": sleb,
    "sleb-fast": sleb_fast,
    "sleb-attn": sleb_attn,
}
if set(METHODS) != set(ROWS):  # one table of methods (method_table), one of their functions
    raise ImportError(f"merge method tables disagree: {sorted(set(METHODS) ^ set(ROWS))}")


def check_alpha(alpha: str) -> str:
    if alpha in ("paper", "calibrated"):
        return alpha
    try:
        a = float(alpha)
    except ValueError:
        raise UserError(f"--alpha must be paper, calibrated or a number in [0, 1], not '{alpha}'") from None
    if not 0.0 <= a <= 1.0:
        raise UserError(f"--alpha {alpha} is outside [0, 1]")
    return str(a)
