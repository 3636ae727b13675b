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
