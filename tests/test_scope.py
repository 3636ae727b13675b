"""Measure only what can change the choice (solver/scope.py): the precision order, the bound, and
the best-first loop against measuring every type, on synthetic types and on SmolLM2's real ones
(tensor types from llama.cpp's dry run, KL measured in llama.cpp: tests/data/smollm2_quant_facts.json,
written by `bench/quality_at_budget.py --scope-check`)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from mka_edge.exporters.quant_types import GRIDS_CONTAINING
from mka_edge.records import CacheCost, EditSet, QuantCost
from mka_edge.solver.memory import MIB, Shape
from mka_edge.solver.scope import ORDER_MARGIN, check_order, next_to_measure, quant_bound, surely_better
from mka_edge.solver.search import candidates, choose

DATA = Path(__file__).parent / "data" / "smollm2_quant_facts.json"
SMOL = Shape(
    n_layers=30, n_embd=576, n_head=9, n_kv_head=3, head_dim=64, n_ff=1536, n_vocab=49152, tied_embeddings=True
)


def cost(q: str, tmap: dict[str, str], mb_per_layer: float = 1.0, kl: float | None = None) -> QuantCost:
    return QuantCost(q, "gguf", (mb_per_layer * MIB,) * 30, 20 * MIB, (), kl, extra={"tensor_map": tmap})


def test_precision_order_tensor_by_tensor():
    q8 = cost("Q8_0", {"a": "Q8_0", "b": "Q8_0"})
    q6 = cost("Q6_K", {"a": "Q8_0", "b": "Q6_K"})
    q5 = cost("Q5_K_M", {"a": "Q5_1", "b": "Q6_K"})
    q5k = cost("Q5_K_S", {"a": "Q5_K", "b": "Q6_K"})
    assert surely_better(q8, q6) and surely_better(q6, q5) and surely_better(q8, q5)
    assert not surely_better(q6, q8) and not surely_better(q6, q6)  # same types: not strictly better
    assert not surely_better(q5, q5k) and not surely_better(q5k, q5)  # one tier: never compared
    # a source on a Q4_1 grid is exact in Q5_1: those tensors are not compared
    assert not surely_better(q6, q5, GRIDS_CONTAINING["Q4_1"])
    assert surely_better(q6, q5k, GRIDS_CONTAINING["Q4_1"])
    assert not surely_better(q8, cost("X", {"a": "Q4_0"}))  # other tensors: no comparison


def test_rule_2b_a_sibling_type_on_a_tenth_of_the_weights():
    """Rule 2b on Qwen2.5-1.5B's real tensor types (llama.cpp's dry run): IQ4_XS writes the attention
    output at IQ4_XS where IQ3_M has Q4_K (the same tier), 5% of the weights the two write
    differently, and every other tensor a tier higher: IQ4_XS is surely better.  Q3_K_M's attention
    output and FFN down projection at Q4_K are a third of them: not compared.  Without weight
    counts, rule 2 alone."""
    n = {"o": 2_359_296, "q": 2_359_296, "gate": 13_762_560, "down": 13_762_560}
    iq4 = {"o": "IQ4_XS", "q": "IQ4_XS", "gate": "IQ4_XS", "down": "IQ4_XS"}
    iq3m = {"o": "Q4_K", "q": "IQ3_S", "gate": "IQ3_S", "down": "IQ3_S"}
    q3km = {"o": "Q4_K", "q": "Q3_K", "gate": "Q3_K", "down": "Q4_K"}

    def c(q, tmap, params=True):
        return QuantCost(
            q, "gguf", (MIB,), 0, (), None, extra={"tensor_map": tmap, **({"tensor_params": n} if params else {})}
        )

    assert surely_better(c("IQ4_XS", iq4), c("IQ3_M", iq3m))
    assert not surely_better(c("IQ4_XS", iq4), c("IQ3_M", iq3m, params=False))
    assert not surely_better(c("IQ4_XS", iq4), c("Q3_K_M", q3km))
    assert not surely_better(c("IQ3_M", iq3m), c("IQ4_XS", iq4))


def test_prior_order_measures_the_likely_winner_first():
    """The measuring order (a type's published KL, never below its bound) only says which type comes
    first: with Q2_K fitting beside an f16 cache and IQ4_XS only beside a quantized one, the lower
    bounds alone pick Q2_K first (0 < the cache's floor); the prior picks IQ4_XS.  Rules 2 and 2c then
    bound Q2_K at 1.1x IQ4_XS's KL, which beside the free f16 cache is still below IQ4_XS with a
    quantized cache that costs more than the margin, so Q2_K is measured (exact); where IQ4_XS fits
    beside f16 too, Q2_K is never quantized."""
    from mka_edge.records import CACHE_KL_FLOOR
    from mka_edge.solver.scope import published_kl

    sizes = {
        "IQ4_XS": cost("IQ4_XS", {"a": "IQ4_XS"}, 2.0),
        "Q2_K": cost("Q2_K", {"a": "Q2_K"}, 1.0),
    }
    caches = [CacheCost("f16/f16"), CacheCost("q4_0/f16", CACHE_KL_FLOOR, kl_measured=False)]

    def f(costs):
        out = []
        for q, c in costs.items():
            for cache in caches:
                if q == "IQ4_XS" and cache.mode == "f16/f16":
                    continue  # does not fit beside an f16 cache
                kl = (c.kl or 0.0) + cache.kl
                out.append(SimpleNamespace(quant=q, cache=cache.mode, kl=kl, memory_mb=c.total_bytes / MIB))
        return out

    assert next_to_measure(["IQ4_XS", "Q2_K"], sizes, {}, f, f, frozenset(), {}) == "Q2_K"
    todo, skipped = ["IQ4_XS", "Q2_K"], {}
    assert next_to_measure(todo, sizes, {}, f, f, frozenset(), skipped, prior=published_kl) == "IQ4_XS"
    measured = {"IQ4_XS": sizes["IQ4_XS"].with_kl(0.04)}
    todo.remove("IQ4_XS")
    caches[1] = CacheCost("q4_0/f16", 0.006)  # settled, as planning does; above the margin's 0.004
    assert next_to_measure(list(todo), sizes, measured, f, f, frozenset(), skipped, prior=published_kl) == "Q2_K"

    def g(costs):  # IQ4_XS fits beside the f16 cache as well
        return f(costs) + [
            SimpleNamespace(quant=q, cache="f16/f16", kl=c.kl or 0.0, memory_mb=c.total_bytes / MIB)
            for q, c in costs.items()
            if q == "IQ4_XS"
        ]

    assert next_to_measure(todo, sizes, measured, g, g, frozenset(), skipped, prior=published_kl) is None
    assert skipped["Q2_K"].rule == "cannot win" and "IQ4_XS" in skipped["Q2_K"].why


def test_bound_and_skip_reasons():
    sizes = {
        "Q8_0": cost("Q8_0", {"a": "Q8_0"}, 3.0),
        "Q4_0": cost("Q4_0", {"a": "Q4_0"}, 1.5),
        "Q5_1": cost("Q5_1", {"a": "Q5_1"}, 2.0),
        "F16": cost("F16", {"a": "F16"}, 6.0),
    }
    measured = {"Q8_0": sizes["Q8_0"].with_kl(0.01)}
    assert quant_bound("Q4_0", sizes, measured, frozenset()) == (pytest.approx(0.01 * ORDER_MARGIN), "Q8_0")
    assert quant_bound("F16", sizes, measured, frozenset()) == (0.0, "")

    def feasible(limit_mb):
        def run(costs):
            out = []
            for q, c in costs.items():
                cands = candidates(
                    SMOL,
                    [EditSet("", 0, tuple(range(30)))],
                    {q: c},
                    [CacheCost("f16/f16")],
                    context=512,
                    budget_mb=limit_mb,
                    bandwidth_gbps=10,
                    efficiency=0.5,
                    min_tps=0,
                    max_kl=9,
                    overhead_mb=0,
                )
                out += [x for x in cands if x.fits_memory]
            return out

        return run

    todo, skipped = ["F16", "Q4_0", "Q5_1"], {}
    f = feasible(200)  # F16 (200 MB of weights) cannot fit
    nxt = next_to_measure(todo, sizes, measured, f, f, frozenset(), skipped)
    assert skipped["F16"].rule == "too large"
    assert skipped["Q4_0"].rule == "cannot win" and "Q8_0" in skipped["Q4_0"].why
    assert skipped["Q5_1"].rule == "cannot win"
    assert nxt is None and todo == []
    # the same Q5_1 on a source whose grid it reproduces cannot be bounded by Q8_0
    skipped = {}
    todo = ["Q5_1"]
    measured_q5 = {"Q8_0": sizes["Q8_0"].with_kl(0.01)}
    assert next_to_measure(todo, sizes, measured_q5, f, f, GRIDS_CONTAINING["Q4_1"], skipped) == "Q5_1"


def test_the_margin_breaks_a_tie_a_cache_mode_apart_and_is_checked():
    """Rule 2c: a measured type at its best with a quantized cache (a KL cost too small to print)
    against a surely worse type's bound with the free f16 cache.  Without the margin the bound ties
    the incumbent to the last digit and the worse type would be quantized; with it, it is skipped.
    A measured pair closer than the margin is reported as broken (the plan then measures what the
    order skipped)."""
    sizes = {"IQ4_XS": cost("IQ4_XS", {"a": "IQ4_XS"}, 1.0), "IQ3_M": cost("IQ3_M", {"a": "IQ3_S"}, 0.9)}
    measured = {"IQ4_XS": sizes["IQ4_XS"].with_kl(0.0027)}
    caches = {"f16/f16": CacheCost("f16/f16"), "q8_0/q8_0+fa": CacheCost("q8_0/q8_0+fa", 2e-6, 1.0)}

    def feasible(costs):  # IQ4_XS fits only with the q8_0 cache, IQ3_M with either
        out = []
        for q, c in costs.items():
            for mode in caches.values():
                if q == "IQ4_XS" and mode.mode == "f16/f16":
                    continue
                out.append(SimpleNamespace(kl=c.kl + mode.kl, memory_mb=1.0, quant=q, cache=mode.mode))
        return out

    skipped = {}
    assert next_to_measure(["IQ3_M"], sizes, measured, feasible, feasible, frozenset(), skipped) is None
    assert skipped["IQ3_M"].rule == "cannot win" and f"{ORDER_MARGIN}x IQ4_XS" in skipped["IQ3_M"].why
    close = {"IQ4_XS": measured["IQ4_XS"], "IQ3_M": sizes["IQ3_M"].with_kl(0.0027 * (1 + ORDER_MARGIN) / 2)}
    assert check_order(sizes, close, frozenset()) and not check_order(
        sizes, {**close, "IQ3_M": sizes["IQ3_M"].with_kl(0.0027 * ORDER_MARGIN * 1.01)}, frozenset()
    )


@pytest.fixture(scope="module")
def smol_facts() -> dict:
    if not DATA.is_file():
        pytest.skip(f"{DATA.name} is missing: write it with bench/quality_at_budget.py --scope-check")
    return json.loads(DATA.read_text())


def _costs(facts: dict, with_kl: bool) -> dict[str, QuantCost]:
    return {
        q: QuantCost(
            q,
            "gguf",
            tuple(d["per_layer"]),
            d["other"],
            tuple(d["repack_per_layer"]),
            d["kl"] if with_kl else None,
            extra={"tensor_map": d["tensor_map"], "tensor_params": d["tensor_params"]},
        )
        for q, d in facts["types"].items()
    }


def test_precision_order_holds_on_smollm2(smol_facts):
    """Every pair the rule orders on SmolLM2's real tensor types is ordered so by measured KL, once the
    Q4_1 source's grid types are left out; with them compared, SmolLM2 breaks it (Q6_K against Q5_K_M
    with importance matrices), which is why the exception exists."""
    sizes, measured = _costs(smol_facts, False), _costs(smol_facts, True)
    grids = frozenset(smol_facts["source_grids"])
    assert check_order(sizes, measured, grids) == []
    assert any(v.startswith("Q6_K") and "Q5_K_M" in v for v in check_order(sizes, measured, frozenset()))
    # and the rule orders enough to matter: Q8_0 bounds every type below it that has no Q4_1/Q5_1 tensor
    bounded = [q for q in sizes if q != "Q8_0" and surely_better(sizes["Q8_0"], sizes[q], grids)]
    assert {"Q6_K", "Q4_K_M", "Q4_0", "IQ4_XS", "Q2_K"} <= set(bounded)


def smol_feasible(budget: float, caches: dict[str, CacheCost]):
    """costs -> SmolLM2's unmerged candidates that fit ``budget`` at context 4096 and 5 tokens/s, over
    the cache modes in ``caches`` as they are when called (the lazy loop updates them)."""
    edits = [EditSet("", 0, tuple(range(30)))]

    def run(costs):
        cands = candidates(
            SMOL,
            edits,
            costs,
            list(caches.values()),
            context=4096,
            budget_mb=budget,
            bandwidth_gbps=20,
            efficiency=0.4,
            min_tps=5,
            max_kl=1,
            overhead_mb=64,
        )
        return [c for c in cands if c.fits_memory and c.fits_speed]

    return run


def test_best_first_picks_what_measuring_everything_picks(smol_facts):
    """On SmolLM2's real sizes, KL and cache costs, at budgets from every type's edge: the loop
    (measure the best-bounded type, skip those that cannot win) picks the plan measuring all types
    picks, with fewer types measured (unmerged plans; the merge curve is planning's part)."""
    sizes, measured_all = _costs(smol_facts, False), _costs(smol_facts, True)
    grids = frozenset(smol_facts["source_grids"])
    caches = {m: CacheCost(m, c["kl"], c["speed_factor"]) for m, c in smol_facts["caches"].items()}

    def feasible(budget):
        return smol_feasible(budget, caches)

    fewer = 0
    for budget in range(150, 560, 15):
        f = feasible(budget)
        if not f(measured_all):
            continue
        want = choose(f(measured_all), budget, 5, 4096)[0][0]
        got, todo, skipped = {}, list(sizes), {}
        while (q := next_to_measure(todo, sizes, got, f, f, grids, skipped)) is not None:
            got[q] = measured_all[q]
            todo.remove(q)
        best = choose(f(got), budget, 5, 4096)[0][0]
        assert (best.quant, best.cache) == (want.quant, want.cache), budget
        fewer += len(got) < len(sizes)
    assert fewer >= 10


def test_cache_modes_measured_only_when_they_rank_first(smol_facts):
    """Rule 4 (``unsettled``) with the type loop, on SmolLM2's real sizes, KL and cache costs: a mode
    starts at its lower bound and is measured only when the best candidate uses it; the choice is
    the one measuring every type and mode makes, with fewer modes measured at most budgets."""
    from mka_edge.records import CACHE_KL_FLOOR
    from mka_edge.solver.scope import unsettled

    sizes, measured_all = _costs(smol_facts, False), _costs(smol_facts, True)
    grids = frozenset(smol_facts["source_grids"])
    real = {m: CacheCost(m, c["kl"], min(1.0, c["speed_factor"])) for m, c in smol_facts["caches"].items()}
    # and the case the floor is for: quantized caches measured no worse than f16 (two at the floor, a tie)
    tied = {**real, **{m: CacheCost(m, CACHE_KL_FLOOR, real[m].speed_factor) for m in ("q8_0/f16", "q8_0/q8_0+fa")}}
    feasible = smol_feasible

    fewer, checked = 0, 0
    for full, budget in [(f, b) for f in (real, tied) for b in range(150, 560, 15)]:
        if not feasible(budget, full)(measured_all):
            continue
        want = choose(feasible(budget, full)(measured_all), budget, 5, 4096)[0][0]
        lazy = {
            m: c if m == "f16/f16" else CacheCost(m, CACHE_KL_FLOOR, speed_measured=False, kl_measured=False)
            for m, c in full.items()
        }
        f = feasible(budget, lazy)
        got, todo, skipped, runs = {}, list(sizes), {}, 0
        while True:
            while (need := unsettled(f(got), lazy)) is not None:
                mode, what = need
                lazy[mode] = (
                    CacheCost(mode, full[mode].kl, speed_measured=False)
                    if what == "kl"
                    else CacheCost(mode, full[mode].kl, full[mode].speed_factor)
                )
                runs += what == "kl"
            if (q := next_to_measure(todo, sizes, got, f, f, grids, skipped)) is None:
                break
            got[q] = measured_all[q]
            todo.remove(q)
        best = choose(f(got), budget, 5, 4096)[0][0]
        assert (best.quant, best.cache) == (want.quant, want.cache), budget
        assert lazy[best.cache].kl_measured and lazy[best.cache].speed_measured
        checked += 1
        fewer += runs < len(full) - 1
    print(f"cache modes: fewer measured at {fewer} of {checked} budgets")
    assert checked >= 10 and fewer >= checked // 2, (checked, fewer)


def test_a_speed_share_that_cannot_matter_is_not_timed():
    """Rule 6: speed enters a plan only through the floor, so the best candidate's cache mode is timed
    only when it would miss the floor at MIN_SPEED_SHARE of its predicted speed; KL comes first."""
    from mka_edge.solver.scope import MIN_SPEED_SHARE, unsettled
    from mka_edge.solver.search import Candidate

    def cand(tps, cache="q8_0/q8_0+fa"):
        return Candidate(0, "Q4_K_M", 30, 100.0, {}, 0.05, tps, True, True, True, cache=cache)

    untimed = {"q8_0/q8_0+fa": CacheCost("q8_0/q8_0+fa", 0.001, speed_measured=False)}
    unknown = {"q8_0/q8_0+fa": CacheCost("q8_0/q8_0+fa", 1e-6, speed_measured=False, kl_measured=False)}
    floor = 10.0
    fast, slow = floor / MIN_SPEED_SHARE + 1, floor / MIN_SPEED_SHARE - 1
    assert unsettled([cand(fast)], untimed, floor) is None
    assert unsettled([cand(slow)], untimed, floor) == ("q8_0/q8_0+fa", "speed")
    assert unsettled([cand(fast)], unknown, floor) == ("q8_0/q8_0+fa", "kl")
    assert unsettled([], untimed, floor) is None


def test_the_least_speed_share_follows_the_cache_s_part_of_a_token():
    """Rule 6's floor per model: SmolLM2's own measured shares are all above the floor it gets (the
    rule holds where it was fitted), a Qwen2.5-1.5B-shaped model at IQ4_XS gets a far higher one
    (its cache is a smaller part of a token's reads), so a plan predicted at 20 tok/s against a
    10 tok/s floor needs no timing there, while at the old flat 0.22 it did."""
    from mka_edge.solver.memory import cache_bytes
    from mka_edge.solver.scope import MIN_SPEED_SHARE, speed_share_floor, unsettled
    from mka_edge.solver.search import Candidate

    facts = json.loads(DATA.read_text())
    q8 = facts["types"]["Q8_0"]
    smol = speed_share_floor(sum(q8["per_layer"]) + q8["other"], 0.5 * cache_bytes(SMOL, 4096, "f16/f16"))
    assert MIN_SPEED_SHARE < smol < min(c["speed_factor"] for c in facts["caches"].values())
    qwen = Shape(
        n_layers=28, n_embd=1536, n_head=12, n_kv_head=2, head_dim=128, n_ff=8960, n_vocab=151936, tied_embeddings=True
    )
    big = speed_share_floor(896e6, 0.5 * cache_bytes(qwen, 4096, "f16/f16"))
    assert 0.55 < big < 0.65
    cand = Candidate(0, "IQ4_XS", 28, 990.0, {"weights_mb": 855.0}, 0.003, 20.0, True, True, True, cache="q8_0/q8_0+fa")
    untimed = {"q8_0/q8_0+fa": CacheCost("q8_0/q8_0+fa", 0.0003, speed_measured=False)}
    assert unsettled([cand], untimed, 10.0) == ("q8_0/q8_0+fa", "speed")  # the flat floor
    assert unsettled([cand], untimed, 10.0, lambda c: big) is None
    assert unsettled([cand], untimed, 10.0, lambda c: smol) == ("q8_0/q8_0+fa", "speed")
