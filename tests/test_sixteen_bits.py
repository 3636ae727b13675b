"""Sixteen bits stay sixteen bits (issue 23, item 3): with ``--dtype auto`` a CPU build computes in
float32 where that copy fits the host and in the checkpoint's own 16-bit type where it does not
(an 8B model on a 24 GB host), decided before any weight loads; such a build then keeps that type
to the end: the merged model is reloaded in it, and validation measures against the build's own
loaded source instead of loading a float32 reference."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import SMALL, tiny_build_inputs

from mka_edge.errors import UserError
from mka_edge.host_need import ALLOWANCE, check_load


def _shape(n_params: float, stored: str = "bfloat16"):
    """A ModelShape's fields check_load reads (solver.feasibility.read_shape gives the real one)."""
    return SimpleNamespace(block_params=[n_params], other_params=0, config=SimpleNamespace(torch_dtype=stored))


def test_auto_is_float32_where_it_fits_else_the_checkpoint_s_16_bits(monkeypatch):
    """8B parameters in bf16: float32 (about 39 GiB) on a host with 48 GiB free; bf16 (16.5 GiB) on
    one with 24; refused with the least need (bf16's) on one with 8.  An explicit
    --dtype float32 is not changed behind the user's back, a float32 checkpoint never narrowed, and
    a capped load (--max-memory places it) stays as asked."""
    import mka_edge.host_need as hn

    n = 8.03e9
    for free_gib, want in ((48, torch.float32), (24, torch.bfloat16)):
        monkeypatch.setattr(hn, "available_ram", lambda g=free_gib: g * 2**30)
        assert check_load(_shape(n), device="cpu") == want, free_gib
    assert check_load(_shape(n, "float16"), device="cpu") == torch.float16  # its own type, not bf16
    with pytest.raises(UserError, match=r"needs about 38\.9 GiB"):
        check_load(_shape(n), device="cpu", dtype="float32")
    with pytest.raises(UserError, match=r"needs about 31\.4 GiB"):  # float32 stored: 4 bytes whatever
        check_load(_shape(n, "float32"), device="cpu")
    monkeypatch.setattr(hn, "available_ram", lambda: 8 * 2**30)
    with pytest.raises(UserError, match=r"needs about 16\.5 GiB.*--max-memory"):  # the least need: bf16
        check_load(_shape(n), device="cpu")
    assert check_load(_shape(n), device="cpu", max_memory="cpu=4GB") == torch.float32


def test_a_16_bit_fingerprint_is_its_own(tmp_path):
    """Every cache entry computed from a loaded model is keyed by its fingerprint: a bf16 computation
    gives other figures than float32's, so it may not read float32's entries (or write them)."""
    from mka_edge.models.loading import load_model

    src, _, _ = tiny_build_inputs(tmp_path, seed=3)
    a, b = load_model(str(src)), load_model(str(src), dtype=torch.bfloat16)
    assert a.model.dtype == torch.float32 and b.model.dtype == torch.bfloat16
    assert a.fingerprint != b.fingerprint and load_model(str(src)).fingerprint == a.fingerprint


def test_a_build_that_does_not_fit_in_float32_stays_16_bit_to_the_package(tmp_path, monkeypatch):
    """A bf16 checkpoint on a host whose RAM holds it in bf16 but not in float32 (this host's free
    RAM stood in for by a figure between the two needs), a plan that must merge (the budget fits
    only with a layer gone): the build says it computes in bf16, merges in bf16, reloads the merged
    model in bf16 (never float32), validates against the source it holds, and packages."""
    from conftest import predicted_memory_mb
    from transformers import AutoModelForCausalLM

    import mka_edge.build as build_mod
    import mka_edge.host_need as hn

    src, recipe, profile = tiny_build_inputs(tmp_path, seed=61)
    AutoModelForCausalLM.from_pretrained(src).to(torch.bfloat16).save_pretrained(src)
    assert json.loads((src / "config.json").read_text())["dtype"] == "bfloat16"
    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(src).parameters())
    free = ALLOWANCE + 3.0 * n  # bf16 (2 bytes per weight) fits, float32 (4, widened at 1.25x) does not
    monkeypatch.setattr(hn, "available_ram", lambda: free)
    monkeypatch.setattr(build_mod, "available_ram", lambda: free)

    loads, refs = [], []
    real_load, real_validate = build_mod.load_model, build_mod.validate_artifact
    monkeypatch.setattr(build_mod, "load_model", lambda *a, **k: loads.append(k.get("dtype")) or real_load(*a, **k))
    monkeypatch.setattr(
        build_mod,
        "validate_artifact",
        lambda *a, **k: refs.append(k.get("reference_model")) or real_validate(*a, **k),
    )
    budget = (predicted_memory_mb(src, "Q8_0", 1, 1024) + predicted_memory_mb(src, "Q8_0", 0, 1024)) / 2
    lines = []
    manifest = build_mod.build(
        str(profile),
        str(recipe),
        tmp_path / "pkg",
        progress=False,
        log=lines.append,
        mmlu_per_subject=0,
        repeats=1,
        max_tries=1,
        budget_mb=budget,
        quants=["Q8_0"],
        attention_removal=False,
        merge_opts=dict(SMALL, device="cpu"),
    )
    assert any("computing in torch.bfloat16 as stored" in x for x in lines), lines
    assert manifest["plan"]["k"] >= 1 and (tmp_path / "pkg" / "manifest.json").is_file()
    assert loads == [torch.bfloat16]  # the merged model's reload, in the build's dtype
    assert len(refs) == 1 and refs[0] is not None and refs[0].model.dtype == torch.bfloat16


def test_a_model_loaded_in_its_stored_dtype_is_mapped_from_its_file(tmp_path):
    """The ground of host_need's merged term (0 without a cap): a folder loaded in the dtype it was
    saved in (a build's merged model, reloaded) is file-backed, pages the kernel can drop, so
    reading every weight raises RssFile by the weights' bytes and RssAnon by far less.  Checked in
    a child process, so that this session's own memory does not blur the figures."""
    import subprocess
    import sys

    from mka_edge.models.synthetic import make_llama3_shaped, tiny_tokenizer

    folder = make_llama3_shaped(
        tmp_path / "m",
        num_hidden_layers=4,
        hidden_size=512,
        intermediate_size=2048,
        num_attention_heads=8,
        num_key_value_heads=2,
        tokenizer=tiny_tokenizer(),
    )
    code = f"""
import json, torch
from mka_edge.models.loading import load_model
def _rss_mb():
    rows = [l.split() for l in open("/proc/self/status") if l.startswith(("RssAnon:", "RssFile:", "RssShmem:"))]
    return {{r[0].rstrip(":"): int(r[1]) / 1024 for r in rows}}
lm = load_model({str(folder)!r}, dtype=torch.bfloat16)
before = _rss_mb()
with torch.no_grad():
    total = sum(float(p.float().sum()) for p in lm.model.parameters())
after = _rss_mb()
mb = sum(p.numel() * p.element_size() for p in lm.model.parameters()) / 2**20
mapped = lambda r: r["RssFile"] + r.get("RssShmem", 0)  # a file on tmpfs maps as shared memory
print(json.dumps({{"mb": mb, "file": mapped(after) - mapped(before), "anon": after["RssAnon"] - before["RssAnon"]}}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["mb"] > 200, got  # the 128,256-row embedding and head dominate: ~270 MB of bf16
    assert got["file"] > 0.9 * got["mb"], got  # every weight page came from the file
    assert got["anon"] < 0.25 * got["mb"], got  # and no copy of them was made
