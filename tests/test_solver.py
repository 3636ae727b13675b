"""Solver on synthetic cases, and the memory model's terms against what llama.cpp reports."""

from __future__ import annotations

import json

import pytest

from mka_edge.errors import UserError
from mka_edge.records import CacheCost, EditSet, QuantCost
from mka_edge.solver.memory import MIB, Shape, attention_bytes, kv_bytes, predict, reserved_compute_bytes
from mka_edge.solver.search import candidates, choose, pareto

SMOL = Shape(
    n_layers=30, n_embd=576, n_head=9, n_kv_head=3, head_dim=64, n_ff=1536, n_vocab=49152, tied_embeddings=True
)


def test_memory_terms_match_llama_cpp_reports():
    # llama.cpp's own log for SmolLM2 at n_ctx 512 / 4096 (f16 KV): KV 11.25 / 90.00 MiB,
    # compute buffer 98.25 / 99.38 MiB (CPU backend, n_ubatch 512)
    assert kv_bytes(SMOL, 512) / MIB == pytest.approx(11.25)
    assert kv_bytes(SMOL, 4096) / MIB == pytest.approx(90.0)
    assert kv_bytes(SMOL.with_layers(24), 4096) / MIB == pytest.approx(72.0)
    assert reserved_compute_bytes(SMOL, 512) / MIB == pytest.approx(98.25, rel=0.01)
    assert reserved_compute_bytes(SMOL, 4096) / MIB == pytest.approx(99.38, rel=0.01)


def test_resident_memory_prediction_tracks_measured_rss():
    # loose bound here; the strict figures live in bench/memory_model.py and docs/results.md.
    # Measured peak RSS (llama-cpp-python, prompt filling the context), SmolLM2 Q8_0: 230.1 MiB at
    # 512 and 402.7 MiB at 4096; F16 at 4096: 522.8 MiB.
    q8 = 136.4 * MIB
    for weights, ctx, measured in ((q8, 512, 230.1), (q8, 4096, 402.7), (256.6 * MIB, 4096, 522.8)):
        assert predict(SMOL, weights, ctx).total_mb == pytest.approx(measured, rel=0.10)
    # the context term grows with heads x context, and merging shrinks the KV cache in proportion
    assert attention_bytes(SMOL, 4096) > 7 * attention_bytes(SMOL, 512)
    assert predict(SMOL.with_layers(18), q8, 4096).kv_mb == pytest.approx(0.6 * predict(SMOL, q8, 4096).kv_mb)


def _probe():
    per = lambda mb: [mb * MIB] * 30  # noqa: E731
    rows = {
        "F16": {"per_layer": per(6.0), "other": 54 * MIB, "kl": 0.0},
        "Q8_0": {"per_layer": per(3.2), "other": 29 * MIB, "kl": 0.004},
        "Q4_K_M": {"per_layer": per(2.3), "other": 22 * MIB, "kl": 0.06},
        "Q4_0": {"per_layer": per(2.0), "other": 16 * MIB, "kl": 0.30},
    }
    return {q: QuantCost.from_json(q, "gguf", d) for q, d in rows.items()}


CURVE = [0.0, 0.12, 0.25, 0.34, 0.45, 0.6, 0.75]
KEPT = [list(range(30 - k)) for k in range(len(CURVE))]


EDITS = [EditSet("sleb", k, tuple(KEPT[k]), (), kl) for k, kl in enumerate(CURVE)]
BASE = [CacheCost("f16/f16")]


def _cands(budget, min_tps=1.0, context=512, caches=BASE, edits=EDITS):
    return candidates(
        SMOL,
        edits,
        _probe(),
        caches,
        context=context,
        budget_mb=budget,
        bandwidth_gbps=50,
        efficiency=0.5,
        min_tps=min_tps,
        max_kl=0.5,
        overhead_mb=40,
    )


def test_loose_budget_picks_the_highest_quality_quant_unmerged():
    ranked, why = choose(_cands(10_000), 10_000, 1.0, 512)
    assert (ranked[0].k, ranked[0].quant) == (0, "F16") and "least predicted quality loss" in why


def test_tight_budget_makes_it_merge():
    cands = _cands(1e9)
    unmerged_min = min(c.memory_mb for c in cands if c.k == 0)
    budget = unmerged_min - 1  # not even the smallest unmerged plan fits
    ranked, why = choose(_cands(budget), budget, 1.0, 512)
    assert ranked[0].k > 0 and ranked[0].memory_mb <= budget and "without any (none fits)" in why
    # among the plans that fit, it is the least predicted KL
    fits = [c for c in _cands(budget) if c.fits_memory]
    assert ranked[0].kl == min(c.kl for c in fits)


def test_merging_can_beat_coarser_quantization():
    # a budget where unmerged needs Q4_0 (0.30 nats) but K=1 with Q4_K_M (0.12 + 0.06) fits
    cands = {(c.k, c.quant): c for c in _cands(1e9)}
    budget = cands[(1, "Q4_K_M")].memory_mb + 0.1
    assert cands[(0, "Q4_K_M")].memory_mb > budget and cands[(0, "Q4_0")].memory_mb <= budget
    ranked, why = choose(_cands(budget), budget, 1.0, 512)
    assert (ranked[0].k, ranked[0].quant) == (1, "Q4_K_M") and "beat the best plan without any (K=0 Q4_0" in why


def test_impossible_budget_says_the_smallest_footprint():
    with pytest.raises(
        UserError,
        match=r"no plan fits the 50 MB budget: the smallest footprint reachable is \d+ MB .*raise --budget-mb",
    ):
        choose(_cands(50), 50, 1.0, 512)


def test_unreachable_speed_is_a_clear_error():
    with pytest.raises(UserError, match="reaches 1e\\+06 tokens/s"):
        choose(_cands(10_000, min_tps=1e6), 10_000, 1e6, 512)


def test_pareto_front_is_monotone():
    front = pareto(_cands(1e9))
    assert all(a.memory_mb <= b.memory_mb and a.kl > b.kl for a, b in zip(front, front[1:]))
    assert front[-1].kl == 0.0


def test_a_model_too_large_to_probe_gets_exact_bytes_and_the_published_kl():
    """Above the probe's size (and with --quality-prior) a GGUF type's KL is llama.cpp's published
    figure, but its bytes are the dry run's, tensor by tensor (issue 23): on SmolLM2, whose 576-wide
    rows make llama.cpp swap most K-quant tensors for legacy types, the table's bits per weight
    would be off by a third."""
    from mka_edge.solver.feasibility import gguf_type_sizes, read_shape
    from mka_edge.solver.quant_prior import PUBLISHED_IMATRIX, prior_entry
    from mka_edge.targets import get_target

    ms = read_shape(None)
    got = get_target("gguf").type_sizes(ms, ["Q4_K_M", "IQ4_XS"], measure=False)
    exact = gguf_type_sizes(ms, ["Q4_K_M", "IQ4_XS"])
    for q in ("Q4_K_M", "IQ4_XS"):
        assert got[q].per_layer == tuple(exact[q]["per_layer"]) and got[q].other == exact[q]["other"]
        assert got[q].extra["tensor_map"] == exact[q]["tensor_map"]
        assert got[q].kl == prior_entry(q, [1], 0)["kl"] and "scoreboard" in got[q].extra["source"]
    assert got["IQ4_XS"].kl == PUBLISHED_IMATRIX["IQ4_XS"][1] and got["IQ4_XS"].extra["imatrix"]
    by_bpw = prior_entry("Q4_K_M", ms.block_params, ms.other_params)
    off = got["Q4_K_M"].total_bytes / (sum(by_bpw["per_layer"]) + by_bpw["other"])
    assert not 0.9 < off < 1.1, off  # the table's bits per weight do not size this model


def test_published_prior_and_plan_on_a_tiny_model(tmp_path, tiny_dir):
    """The prior path end to end on a tiny model: curve, costs sized for this model, a choice, plan.json."""
    from mka_edge.planning import plan_with_context, write_plan
    from mka_edge.report import plan_table
    from mka_edge.solver.quant_prior import bits_per_weight

    assert 4.8 < bits_per_weight("Q4_K_M") < 5.0 and 8.4 < bits_per_weight("Q8_0") < 8.6
    opts = dict(samples=4, seq_len=64, positions=96, repeats=2, loss_samples=2, device="cpu")
    plan, ctx = plan_with_context(
        "laptop-8gb",
        str(tiny_dir),
        method="shortgpt",
        k_max=2,
        quants=["F16", "Q8_0", "Q4_K_M"],
        context=512,
        merge_opts=opts,
        quality_prior=True,
        progress=False,
        log=lambda m: None,
    )
    assert (plan.choice.k, plan.choice.quant) == (0, "F16")  # a loose budget: best quality
    # F16, the best type, fits unmerged, so no merge can win: the curve is not computed (quality.needed_merge_kl)
    # the tiny model's 16-wide heads rule out quantized caches (llama.cpp's 32-element blocks): 2 cache modes
    assert list(plan.cache_costs) == ["f16/f16", "f16/f16+fa"]
    assert "prior" in plan.models["quant_cost"] and len(plan.candidates) == 3 * 2
    assert plan.curve["kl"] == [0.0] and not plan.curve["complete"]
    assert "choice: no merge" in plan_table(plan)
    path = write_plan(plan, tmp_path)
    assert json.loads(path.read_text())["choice"] == plan.to_json()["choice"]


# ---- cache modes: the attention path and the KV cache type as solver dimensions ----

# what cache_probe measured on SmolLM2 (KL over the baseline; decode speed share at context 4096)
MODES = [
    CacheCost("f16/f16"),
    CacheCost("q8_0/f16", 0.0003, 0.9),
    CacheCost("f16/f16+fa", 0.0, 1.2),
    CacheCost("q8_0/q8_0+fa", 0.0003, 0.5),
    CacheCost("q4_0/q4_0+fa", 0.041, 0.3),
]


def test_flash_attention_drops_the_kq_term_and_a_quantized_cache_shrinks_kv():
    q8 = 136.4 * MIB
    base, fa = predict(SMOL, q8, 4096, "f16/f16"), predict(SMOL, q8, 4096, "f16/f16+fa")
    # measured peak RSS at 4096: 402.8 MiB without flash attention, 309.2 with it, 265.7 with q8_0, 243.3 with q4_0
    assert base.attention_mb - fa.attention_mb == pytest.approx(100.8 - 6.8, abs=1.0)
    for mode, measured in (("f16/f16+fa", 309.2), ("q8_0/q8_0+fa", 265.7), ("q4_0/q4_0+fa", 243.3)):
        assert predict(SMOL, q8, 4096, mode).total_mb == pytest.approx(measured, rel=0.05)
    assert predict(SMOL, q8, 4096, "q8_0/q8_0+fa").kv_mb == pytest.approx(47.81, abs=0.01)  # llama.cpp's log
    assert predict(SMOL, q8, 4096, "q4_0/q4_0+fa").kv_mb == pytest.approx(25.31, abs=0.01)


def test_plan_picks_a_quantized_cache_when_it_is_the_cheapest_lever():
    # unmerged Q4_K_M: 335 MB with the f16 cache and no flash attention, 234 with flash attention,
    # 192 with a q8_0 cache (memory margins included).  At 300 MB the old space (f16 cache, no flash attention) must merge;
    # the full space changes only the attention path (and affords Q8_0).  At 210 MB the old space has nothing; the
    # full space buys the bytes from the cache for 0.0003 nats.
    old_best = choose(_cands(300, context=4096), 300, 1.0, 4096)[0][0]
    best = choose(_cands(300, context=4096, caches=MODES), 300, 1.0, 4096)[0][0]
    assert old_best.k > 0 and old_best.cache == "f16/f16"
    assert (best.k, best.quant, best.cache) == (0, "Q8_0", "f16/f16+fa") and best.kl < old_best.kl - 0.1
    with pytest.raises(UserError, match="no plan fits the 210 MB"):
        choose(_cands(210, context=4096), 210, 1.0, 4096)
    ranked, why = choose(_cands(210, context=4096, caches=MODES), 210, 1.0, 4096)
    best = ranked[0]
    # Q8_0 weights with a q4_0 cache (204 MB; 0.004 + 0.041) beat Q4_K_M with a q8_0 cache (0.06 + 0.0003)
    assert (best.k, best.quant, best.cache) == (0, "Q8_0", "q4_0/q4_0+fa")
    assert "the q4_0/q4_0+fa cache beats the f16 cache without flash attention (no plan with it fits)" in why
    assert best.kl_terms == {"edits": 0.0, "quant": 0.004, "cache": 0.041}


def test_profile_forbidding_quantized_caches_keeps_them_out():
    from mka_edge.kv_cache import LLAMA_CPP_MODES, allowed_modes

    pinned = allowed_modes(LLAMA_CPP_MODES, flash_attention=True, kv_cache_type="f16")
    no_fa = allowed_modes(LLAMA_CPP_MODES, flash_attention=False, kv_cache_type="auto")
    assert [m.label for m in pinned] == ["f16/f16", "f16/f16+fa"]
    assert all(not m.flash_attn and m.type_v == "f16" for m in no_fa) and len(no_fa) == 3
    allowed = [c for c in MODES if c.mode in {m.label for m in pinned}]
    best = choose(_cands(300, context=4096, caches=allowed), 300, 1.0, 4096)[0][0]
    assert best.cache == "f16/f16+fa"
    with pytest.raises(UserError, match="no plan fits the 170 MB.*smallest footprint reachable is 188 MB"):
        choose(_cands(170, context=4096, caches=allowed), 170, 1.0, 4096)  # only a quantized cache reaches 170 MB
    assert choose(_cands(170, context=4096, caches=MODES), 170, 1.0, 4096)[0][0].cache.startswith("q")


def test_the_speed_floor_prices_a_slow_cache():
    # q4_0 keeps 30% of the decode speed in MODES: with a floor between, it is never chosen
    cands = _cands(1e9, context=4096, caches=MODES)
    fast_q4 = max(c.tps for c in cands if c.cache == "q4_0/q4_0+fa")
    floor = fast_q4 + 1
    ranked, _ = choose(_cands(1e9, min_tps=floor, context=4096, caches=MODES), 1e9, floor, 4096)
    assert all(c.cache != "q4_0/q4_0+fa" for c in ranked)


def test_forbidden_levers_are_named_when_nothing_fits():
    with pytest.raises(UserError, match="smallest footprint reachable.*flash attention forbidden by the profile"):
        choose(_cands(50), 50, 1.0, 512, forbidden="flash attention forbidden by the profile")


def test_attention_removal_edit_sets_are_priced_per_layer():
    from mka_edge.solver.search import attention_share

    # one edit set with layers 1 and 2's attention removed: weights drop by the attention share of
    # two layers, and the KV cache by two layers' worth with flash attention
    e = EditSet("sleb-attn", 2, tuple(range(30)), (1, 2), 0.02)
    cands = _cands(1e9, context=4096, caches=MODES, edits=[EDITS[0], e])
    by = {(c.method, c.quant, c.cache): c for c in cands}
    a, b = by[("sleb-attn", "F16", "f16/f16+fa")], by[("sleb", "F16", "f16/f16+fa")]
    assert a.attn_layers == 28 and b.attn_layers is None
    share = attention_share(SMOL)
    assert b.memory_terms["weights_mb"] - a.memory_terms["weights_mb"] == pytest.approx(2 * share * 6.0, rel=1e-3)
    assert b.memory_terms["kv_mb"] - a.memory_terms["kv_mb"] == pytest.approx(2 * 3.0, rel=1e-3)


def test_the_bar_refusal_names_the_best_plan_and_every_way_to_pass():
    """solver/bar.py: no refusal while one feasible plan meets the bar (or none is feasible: that is
    choose's refusal); else the least-loss feasible plan (ties: fewest removals) and the ways out."""
    from mka_edge.solver.bar import refuse_if_bar_missed
    from mka_edge.solver.search import Candidate

    def cand(k, quant, kl, fits=True, mb=100.0):
        return Candidate(k, quant, 10 - k, mb - k, {}, kl, 10.0, fits, True, kl <= 0.5)

    refuse_if_bar_missed([cand(0, "Q4_0", 0.9), cand(2, "Q8_0", 0.4)], 0.5, "p", at_least=False)
    refuse_if_bar_missed([cand(0, "Q4_0", 0.1, fits=False)], 0.5, "p", at_least=False)
    with pytest.raises(UserError) as got:
        refuse_if_bar_missed([cand(3, "Q2_K", 1.2), cand(0, "Q8_0", 0.3, fits=False)], 0.5, "p", at_least=False)
    line = str(got.value)
    assert "the best plan that fits p (K=3 Q2_K f16/f16, 97 MB) is predicted to lose 1.200 nats" in line
    assert "--max-quality-loss 1.26" in line and "heal the merged model" in line and "--build-anyway" in line
    with pytest.raises(UserError) as got:  # a bound: free merges tie, the fewest removals are named
        refuse_if_bar_missed([cand(4, "Q3_K_M", 0.8), cand(1, "Q3_K_M", 0.8)], 0.5, "p", at_least=True)
    line = str(got.value)
    assert "even with every merge free, the best (Q3_K_M with K=1 removed) is predicted to lose at least 0.800" in line
    assert "heal" not in line


def test_an_untied_embedding_is_gathered_not_read_per_token():
    """The speed model counts the token embedding of an untied model as gathered (one row per
    token), not read: from the dry run's embd_bytes, else half the bytes outside the layers."""
    from mka_edge.solver.search import embedding_bytes

    untied = Shape(
        n_layers=2, n_embd=64, n_head=4, n_kv_head=2, head_dim=16, n_ff=128, n_vocab=1000, tied_embeddings=False
    )
    tied = Shape(n_layers=2, n_embd=64, n_head=4, n_kv_head=2, head_dim=16, n_ff=128, n_vocab=1000)
    plain = QuantCost("Q8_0", "gguf", (10 * MIB, 10 * MIB), 8 * MIB, (), 0.01)
    dry = QuantCost("Q8_0", "gguf", (10 * MIB, 10 * MIB), 8 * MIB, (), 0.01, extra={"embd_bytes": 3 * MIB})
    assert embedding_bytes(plain, untied) == 4 * MIB and embedding_bytes(plain, tied) == 0.0
    assert embedding_bytes(dry, untied) == 3 * MIB

    def tps(shape, cost):
        (c,) = candidates(
            shape,
            [EditSet("", 0, (0, 1))],
            {"Q8_0": cost},
            [CacheCost("f16/f16")],
            context=64,
            budget_mb=1e4,
            bandwidth_gbps=10,
            efficiency=0.5,
            min_tps=0,
            max_kl=1,
            overhead_mb=0,
        )
        return c.tps

    # 28 MiB of weights and a small cache: untied, 4 MiB are not read
    assert tps(untied, plain) / tps(tied, plain) == pytest.approx(28.0 / 24.0, rel=0.01)
