"""A budget is a promise: the memory model's margin (solver/memory.MARGIN) covers its measured
error on every plan bench/quality_at_budget.py built, and a plan's predicted peak includes it.
Pure arithmetic on recorded measurements; no model runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mka_edge.solver import memory
from mka_edge.solver.memory import MARGIN, Shape, architecture, margin_rate, predict

DATA = Path(__file__).parent.parent / "docs" / "data"
# the run each architecture's margins come from (solver/memory.py says why)
RUNS = {"llama": DATA / "quality_at_budget-s8.json", "deci": DATA / "quality_at_budget.json"}
SMOL = Shape(n_layers=30, n_embd=576, n_head=9, n_kv_head=3, head_dim=64, n_ff=1536, n_vocab=49152)


def _built_plans() -> list[dict]:
    out = []
    for arch, path in RUNS.items():
        rows = json.loads(path.read_text())["rows"]
        plans = [r[space] for r in rows for space in ("old", "full") if "measured" in r.get(space, {})]
        out += [p for p in plans if ("deci" if p.get("attn_removed") else "llama") == arch]
    return out


def test_the_margin_covers_every_plan_the_bench_measured():
    plans = _built_plans()
    assert len(plans) >= 30, len(plans)
    covered = set()
    for p in plans:
        terms = p["predicted"]["memory_terms"]  # the point estimate is every term but the margin
        point = sum(v for k, v in terms.items() if k not in ("total_mb", "margin_mb"))
        arch = "deci" if p.get("attn_removed") else "llama"
        layers = p["predicted"]["layers"]
        shape = SMOL.with_layers(layers, layers - len(p["attn_removed"]) if p.get("attn_removed") else None)
        assert architecture(shape) == arch
        rate = margin_rate(shape, p["cache"])
        measured = p["measured"]["peak_rss_mb"]
        assert measured > point, (p["label"], measured, point)  # why a margin is needed at all
        assert measured <= point * (1 + rate), (p["label"], measured, point, rate)
        covered.add((arch, p["cache"]))
    assert covered == set(MARGIN), "every margin comes from a measured plan, every measured mode has one"


def test_a_plan_s_peak_includes_the_margin_and_a_point_estimate_does_not():
    w = 100 * memory.MIB
    with_margin = predict(SMOL, w, 4096, "q4_0/q4_0+fa")
    point = predict(SMOL, w, 4096, "q4_0/q4_0+fa", margin=False)
    assert point.margin_mb == 0.0
    assert with_margin.margin_mb == pytest.approx(MARGIN[("llama", "q4_0/q4_0+fa")] * point.total_mb)
    assert with_margin.total_mb == pytest.approx(point.total_mb + with_margin.margin_mb)
    assert "margin_mb" in with_margin.as_dict()


def test_an_unmeasured_mode_takes_its_architecture_s_largest_margin():
    deci = SMOL.with_layers(30, 24)
    assert architecture(deci) == "deci" and architecture(SMOL) == "llama"
    assert margin_rate(SMOL, "q8_0/f16") == max(v for (a, _), v in MARGIN.items() if a == "llama")
    assert margin_rate(deci, "f16/f16") == MARGIN[("deci", "q4_0/q4_0+fa")]
    assert margin_rate(deci, "q4_0/q4_0+fa") > margin_rate(SMOL, "q4_0/q4_0+fa")


def test_the_repack_rule_is_llama_cpp_s_on_avx2():
    """ggml-cpu's repack (x86-64, AVX2): Q4_0, IQ4_NL, Q4_K and MXFP4 weights with ne[1] % 8 == 0
    get an interleaved copy; other types, other row counts and tensors that are not 2-D do not."""
    from mka_edge.solver.memory import repacked
    from mka_edge.solver.quant_probe import split_by_block

    assert repacked("Q4_K", 576) and repacked("Q4_0", 1536) and repacked("IQ4_NL", 8)
    assert not repacked("Q4_K", 12) and not repacked("Q5_K", 576) and not repacked("Q8_0", 576)
    assert not repacked("Q2_K", 576)  # AVX-512 only: not the laptop class
    split = split_by_block(
        [
            ("blk.0.ffn_down.weight", "Q4_K", 576, 100),
            ("blk.0.attn_q.weight", "Q5_0", 576, 40),
            ("blk.0.attn_norm.weight", "Q4_K", None, 7),
            ("blk.1.ffn_down.weight", "Q4_K", 12, 30),
            ("token_embd.weight", "Q4_0", 49152, 1000),
        ]
    )
    assert split == {"per_layer": [147, 30], "repack_per_layer": [100, 0], "other": 1000}
