"""A full disk: export and build when a write fails mid-way for lack of space.  Always a simulated
failure (``MKA_EDGE_FAIL_AT``: the GGUF writer raises ENOSPC half-way through its tensors), and a
real small filesystem (tmpfs) where this host lets the test mount one.  One line saying how much
space the export needs, nothing left at --out, no scratch folder left beside it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_build_inputs

from mka_edge.records import Ranked


def _run(args: list[str], cache: Path, fail: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, MKA_EDGE_CACHE=str(cache))
    if fail:
        env["MKA_EDGE_FAIL_AT"] = fail
    return subprocess.run([sys.executable, "-m", "mka_edge.cli", *args], capture_output=True, text=True, env=env)


def _one_line(r: subprocess.CompletedProcess, says: str) -> None:
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert lines and says in lines[-1] and len([x for x in lines if x.startswith("error:")]) == 1, r.stderr[-2000:]


def test_export_out_of_space_is_one_line_and_leaves_nothing(tiny_dir, tmp_path):
    out = tmp_path / "x.gguf"
    args = ["export", "--quant", "Q8_0", "--model", str(tiny_dir), "--pre-tokenizer", "gpt-2", "--out", str(out)]
    r = _run(args, tmp_path / "cache", fail="gguf:mid-write")
    _one_line(r, "no space left on the disk of")
    assert "the export needs about" in r.stderr and "MB are free" in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".x.gguf.*"))
    assert _run(args, tmp_path / "cache").returncode == 0  # space back: the same command works


def test_build_out_of_space_leaves_no_package_and_a_consistent_cache(tmp_path):
    src, recipe, profile = tiny_build_inputs(tmp_path, seed=41)
    out = tmp_path / "pkg"
    args = ["build", "--profile", str(profile), "--model", str(recipe), "--method", "drop-last", "--quants", "Q8_0"]
    args += ["--samples", "4", "--seq-len", "64", "--positions", "96", "--repeats", "2", "--max-merge", "1"]
    args += ["--mmlu-per-subject", "0", "--out", str(out)]
    r = _run(args, tmp_path / "cache", fail="gguf:mid-write")  # fails in the plan's quant probe, its first GGUF
    _one_line(r, "no space left on a device")
    assert "free space where --out, the cache" in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".pkg.*"))
    r = _run(args, tmp_path / "cache")  # the cache the failed build left serves the rerun
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "manifest.json").is_file()


def test_export_onto_a_real_full_filesystem(tiny_dir, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(small)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"this host refuses to mount a tmpfs ({r.stderr.decode().strip()[:80]})")
    try:
        out = small / "x.gguf"
        args = ["export", "--quant", "Q8_0", "--model", str(tiny_dir), "--pre-tokenizer", "gpt-2", "--out", str(out)]
        r = _run(args, tmp_path / "cache")
        _one_line(r, "no space left on the disk of")
        assert not out.exists() and not list(small.iterdir())
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)


def test_build_disk_need_is_counted_from_the_plan_and_refused_up_front(tiny_dir, tmp_path, monkeypatch):
    """The build's disk check sums what it really writes, from plan.json's own entries (float
    intermediate, the quantized file at the plan's size, the merged folder; while healing the
    unhealed and healed copies, which never sit beside the export), not a blanket multiple of the
    float32 size, and refuses with one line before any work when the disk is short."""
    from types import SimpleNamespace

    from mka_edge import build as build_mod
    from mka_edge.errors import UserError
    from mka_edge.exporters.gguf import f32_bytes
    from mka_edge.models.loading import load_model
    from mka_edge.targets import get_target

    lm = load_model(str(tiny_dir))
    model, gguf, onnx = lm.model, get_target("gguf"), get_target("onnx")
    layers = model.config.num_hidden_layers
    f32 = f32_bytes(model.config)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    q8 = 0.27 * f32  # plan.json's "bytes" of the unmerged model in the type
    plan = SimpleNamespace(ranked=[Ranked("sleb", 0, "Q8_0")], quant_costs={"Q8_0": {"kl": 0.0, "bytes": q8}})
    need = build_mod.disk_need_bytes
    assert need(plan, lm, gguf, False, 3) == pytest.approx(f32 + q8)  # F32 intermediate + Q8_0 file
    plan.ranked = [Ranked("sleb", 0, "F32"), Ranked("sleb", 1, "Q8_0")]
    plan.quant_costs["F32"] = {"kl": 0.0, "bytes": f32}
    merged = model_bytes * (layers - 1) / layers
    assert need(plan, lm, gguf, True, 3) == pytest.approx(max(merged + f32 + q8, 2 * merged))
    assert need(plan, lm, gguf, True, 1) == pytest.approx(f32)  # F32: the float file is the artifact
    # ONNX: a float32 source copy only when the model has no folder of its own (K=0 here: it has one)
    plan.ranked, plan.quant_costs = [Ranked("sleb", 0, "int4")], {"int4": {"kl": 0.0, "bytes": 0.15 * f32}}
    no_folder = SimpleNamespace(model=model, source={})
    assert need(plan, no_folder, onnx, False, 1) - need(plan, lm, onnx, False, 1) == pytest.approx(f32)

    monkeypatch.setattr(build_mod.shutil, "disk_usage", lambda p: SimpleNamespace(free=1000))
    with pytest.raises(UserError, match=r"has 0 MB free; the build needs about \d+ MB"):
        build_mod.check_host(plan, lm, onnx, tmp_path / "pkg", True, 3)
    assert not (tmp_path / "pkg").exists()


def test_a_heal_checkpoint_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    """torch's writer fails on a full disk with a RuntimeError, not an OSError: the checkpoint save
    turns it into ENOSPC (the CLI's one line) when the disk is nearly full, else a UserError naming
    the folder; the checkpoint folder is left as it was (absent)."""
    import errno
    from types import SimpleNamespace

    import torch

    from mka_edge.errors import UserError
    from mka_edge.heal import distill

    monkeypatch.setenv("MKA_EDGE_CACHE", str(tmp_path / "cache"))
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())

    def fail(*a, **k):
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(distill.torch, "save", fail)
    ckpt = distill.Checkpoint("k1")
    monkeypatch.setattr(distill.shutil, "disk_usage", lambda p: SimpleNamespace(free=10 * 2**20))
    with pytest.raises(OSError) as info:
        ckpt.save(model, opt, 2, [1.0, 0.5])
    assert info.value.errno == errno.ENOSPC and "heal checkpoint" in str(info.value)
    monkeypatch.setattr(distill.shutil, "disk_usage", lambda p: SimpleNamespace(free=100 * 2**30))
    with pytest.raises(UserError, match="cannot write the heal checkpoint in .*file write failed"):
        ckpt.save(model, opt, 2, [1.0, 0.5])
    assert not ckpt.dir.exists()
