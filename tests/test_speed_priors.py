"""Issue 23 item 5: the speed model's efficiency per model (a labelled conservative prior for a
model never timed here) and a labelled conservative speed share for quantized caches of a model
too large to probe.  Pure arithmetic on the cache files and records: no model loads."""

from __future__ import annotations

import json

import pytest


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MKA_EDGE_CACHE", str(tmp_path))
    return tmp_path


def test_efficiency_is_per_model_and_a_model_never_timed_gets_the_lowest_calibration(cache):
    from mka_edge.solver import speed

    eff, why = speed.efficiency("gguf", "model-a")
    assert eff == speed.DEFAULT_EFFICIENCY and why.startswith("conservative prior")
    assert not speed.calibrated("gguf", "model-a")

    speed.calibrate(60.0, 1e8, "gguf", "model-a", host_gbps=10.0)  # 60 x 0.1 GB / 10 GB/s = 0.6
    eff, why = speed.efficiency("gguf", "model-a")
    assert eff == pytest.approx(0.6) and why.startswith("calibrated") and speed.calibrated("gguf", "model-a")
    eff, why = speed.efficiency("gguf", "model-b")  # another model: never above the prior's ceiling
    assert eff == speed.DEFAULT_EFFICIENCY and "not measured" in why and not speed.calibrated("gguf", "model-b")

    speed.calibrate(30.0, 1e8, "gguf", "model-b", host_gbps=10.0)  # 0.3: both kept, side by side
    assert speed.efficiency("gguf", "model-a")[0] == pytest.approx(0.6)
    assert speed.efficiency("gguf", "model-c")[0] == pytest.approx(0.3)  # the lowest on this host
    assert speed.efficiency("gguf", None)[0] == pytest.approx(0.6)  # before loading: an upper bound
    assert speed.efficiency("onnx", "model-a")[0] == speed.DEFAULT_EFFICIENCY  # per runtime too


def test_a_calibration_file_from_before_per_model_records_only_bounds_the_prior(cache):
    from mka_edge.solver import speed
    from mka_edge.targets import get_target

    path = cache / get_target("gguf").speed_calibration_file
    path.write_text(json.dumps({"efficiency": 0.2, "measured_tps": 20.0, "host_copy_gbps": 10.0}))
    assert not speed.calibrated("gguf", "model-a")
    assert speed.efficiency("gguf", "model-a")[0] == pytest.approx(0.2)
    speed.calibrate(60.0, 1e8, "gguf", "model-a", host_gbps=10.0)
    assert list(json.loads(path.read_text())["models"]) == ["model-a"]  # the unowned record is gone


def test_a_model_too_large_to_probe_gets_a_conservative_labelled_speed_share_for_quantized_caches():
    from mka_edge.kv_cache import BASELINE_CACHE
    from mka_edge.planning import prior_cache_speeds
    from mka_edge.records import CacheCost, QuantCost
    from mka_edge.solver.memory import Shape, cache_bytes
    from mka_edge.solver.scope import MIN_SPEED_SHARE, speed_share_floor

    shape = Shape(n_layers=32, n_embd=4096, n_head=32, n_kv_head=8, head_dim=128, n_ff=14336, n_vocab=128256)
    gib = 2**30
    sizes = {
        "Q8_0": QuantCost("Q8_0", "gguf", tuple([0.2 * gib] * 32), 1.0 * gib),
        "Q2_K": QuantCost("Q2_K", "gguf", tuple([0.06 * gib] * 32), 0.4 * gib),
    }
    caches = {m: CacheCost(m, 0.01 if m != BASELINE_CACHE else 0.0) for m in (BASELINE_CACHE, "q8_0/q8_0+fa")}
    out = prior_cache_speeds(caches, shape, sizes, 4096)
    assert out[BASELINE_CACHE] == caches[BASELINE_CACHE]
    q8 = out["q8_0/q8_0+fa"]
    smallest = 32 * 0.06 * gib + 0.4 * gib
    expected = speed_share_floor(smallest, 0.5 * cache_bytes(shape, 4096, BASELINE_CACHE))
    assert q8.speed_factor == pytest.approx(expected, abs=1e-4) and MIN_SPEED_SHARE <= q8.speed_factor < 1.0
    assert not q8.speed_measured and q8.kl == 0.01


def test_the_efficiency_a_probe_times_is_handed_back_not_read_back(cache, monkeypatch):
    """Issue 24 item 3: the ONNX target computes the efficiency from its int8 probe entry and
    returns it with the costs (``MeasuredCosts.efficiency``); the record it leaves is for later plans."""
    from types import SimpleNamespace

    from mka_edge.solver import onnx_probe, speed
    from mka_edge.targets import get_target

    entry = {"per_layer": [4e7, 4e7], "other": 2e7, "kl": 0.01, "host_gen_tps": 50.0, "format": "onnx"}
    monkeypatch.setattr(onnx_probe, "probe_onnx", lambda lm, quants, progress: {"int8": dict(entry)})
    monkeypatch.setattr(speed, "host_bandwidth_gbps", lambda: 10.0)
    t = get_target("onnx")
    lm = SimpleNamespace(fingerprint="model-x")
    kw = dict(measure=True, progress=False, log=lambda m: None)
    got = t.quant_costs(lm, None, {}, ["int8"], calibrate_speed=True, **kw)
    assert got.efficiency.value == pytest.approx(50.0 * 1e8 / 10e9) and got.efficiency.source.startswith("calibrated")
    assert speed.efficiency("onnx", "model-x") == got.efficiency  # recorded for the next plan, as handed back
    assert t.quant_costs(lm, None, {}, ["int8"], calibrate_speed=False, **kw).efficiency is None
    assert got.costs["int8"].kl == pytest.approx(0.01)
