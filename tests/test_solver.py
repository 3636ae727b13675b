"""Solver on synthetic cases, and the memory model's terms against what llama.cpp reports."""

from __future__ import annotations

import json

import pytest

from mka_edge.errors import UserError
from mka_edge.records import QuantCost
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


def _cands(budget, min_tps=1.0, context=512):
    return candidates(
        SMOL,
        CURVE,
        KEPT,
        _probe(),
        context=context,
        kv_type="f16",
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
    assert ranked[0].k > 0 and ranked[0].memory_mb <= budget and "merged" in why
    # among the plans that fit, it is the least predicted KL
    fits = [c for c in _cands(budget) if c.fits_memory]
    assert ranked[0].kl == min(c.kl for c in fits)


def test_merging_can_beat_coarser_quantization():
    # a budget where unmerged needs Q4_0 (0.30 nats) but K=1 with Q4_K_M (0.12 + 0.06) fits
    cands = {(c.k, c.quant): c for c in _cands(1e9)}
    budget = cands[(1, "Q4_K_M")].memory_mb + 0.1
    assert cands[(0, "Q4_K_M")].memory_mb > budget and cands[(0, "Q4_0")].memory_mb <= budget
    ranked, why = choose(_cands(budget), budget, 1.0, 512)
    assert (ranked[0].k, ranked[0].quant) == (1, "Q4_K_M") and "beats the best unmerged plan (Q4_0" in why


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


def test_published_prior_and_plan_on_a_tiny_model(tmp_path, tiny_dir):
    """The prior path end to end on a tiny model: curve, costs sized for this model, a choice, plan.json."""
    from mka_edge.planning import plan_table, plan_with_context, write_plan
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
    assert "prior" in plan.models["quant_cost"] and len(plan.candidates) == 3
    assert plan.curve["kl"] == [0.0] and not plan.curve["complete"]
    assert "choice: merge K=0" in plan_table(plan)
    path = write_plan(plan, tmp_path)
    assert json.loads(path.read_text())["choice"] == plan.to_json()["choice"]
