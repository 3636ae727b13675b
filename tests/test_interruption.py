"""Interruption: `merge` and `export --format gguf` killed with SIGKILL at injected points (mid-way
through the trajectory or the GGUF write, just before and just after the final rename), then run
again on the same cache and --out.  The rerun succeeds with the same weights / file, byte for byte,
as an uninterrupted run; --out is never half-written; the killed run's temporary folder is removed
by the rerun; the cache entries a killed run left are whole or absent."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SMALL = ["--samples", "4", "--seq-len", "64", "--positions", "96", "--repeats", "2", "--loss-samples", "2"]


def _run(args: list[str], cache: Path, kill: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, MKA_EDGE_CACHE=str(cache))
    env.pop("MKA_EDGE_KILL_AT", None)
    if kill:
        env["MKA_EDGE_KILL_AT"] = kill
    return subprocess.run([sys.executable, "-m", "mka_edge.cli", *args], capture_output=True, text=True, env=env)


def _digest(path: Path) -> dict[str, str]:
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _leftovers(folder: Path, name: str) -> list[Path]:
    return [p for p in folder.glob(f".{name}.*") if not p.name.endswith(".lock")]


def _entries_whole(cache: Path) -> None:
    for f in (cache / "trajectories").glob("*.json") if (cache / "trajectories").is_dir() else []:
        json.loads(f.read_text())  # a half-written entry would not parse


@pytest.fixture(scope="module")
def merge_ref(tiny_dir, tmp_path_factory) -> Path:
    """An uninterrupted merge: what every interrupted one must end up as."""
    ref = tmp_path_factory.mktemp("ref") / "ref"
    args = ["merge", "-k", "2", "--method", "sleb", "--model", str(tiny_dir), *SMALL]
    assert _run([*args, "--out", str(ref)], ref.parent / "cache").returncode == 0
    return ref


@pytest.fixture(scope="module")
def export_ref(tiny_dir, tmp_path_factory) -> Path:
    ref = tmp_path_factory.mktemp("ref") / "ref.gguf"
    args = ["export", "--quant", "Q8_0", "--model", str(tiny_dir), "--pre-tokenizer", "gpt-2"]
    assert _run([*args, "--out", str(ref)], ref.parent / "cache").returncode == 0
    return ref


@pytest.mark.parametrize("point", ["trajectory:step-1", "before-rename:m", "after-rename:m"])
def test_killed_merge_reruns_to_the_same_weights(tiny_dir, tmp_path, point, merge_ref):
    args = ["merge", "-k", "2", "--method", "sleb", "--model", str(tiny_dir), *SMALL]
    ref = merge_ref
    out, cache = tmp_path / "m", tmp_path / "cache"
    r = _run([*args, "--out", str(out)], cache, kill=point)
    assert r.returncode == -9, r.stderr[-2000:]
    if point == "after-rename:m":  # the rename is the commit: the folder is whole
        assert _digest(out) == _digest(ref)
    else:
        assert not out.exists()
        assert _leftovers(tmp_path, "m") or point.startswith("trajectory")
    _entries_whole(cache)
    r = _run([*args, "--out", str(out)], cache)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _digest(out) == _digest(ref) and (out / "merge_log.json").is_file()
    assert not _leftovers(tmp_path, "m")  # the killed run's temporary folder is gone


@pytest.mark.parametrize("point", ["gguf:mid-write", "before-rename:x.gguf", "after-rename:x.gguf"])
def test_killed_gguf_export_reruns_to_the_same_file(tiny_dir, tmp_path, point, export_ref):
    args = ["export", "--quant", "Q8_0", "--model", str(tiny_dir), "--pre-tokenizer", "gpt-2"]
    ref = export_ref
    out = tmp_path / "x.gguf"
    r = _run([*args, "--out", str(out)], tmp_path / "cache", kill=point)
    assert r.returncode == -9, r.stderr[-2000:]
    if point.startswith("after"):
        assert _digest(out)["x.gguf"] == _digest(ref)["ref.gguf"]
    else:
        assert not out.exists() and _leftovers(tmp_path, "x.gguf")
    r = _run([*args, "--out", str(out)], tmp_path / "cache")
    assert r.returncode == 0, r.stderr[-2000:]
    assert _digest(out)["x.gguf"] == _digest(ref)["ref.gguf"]
    assert not _leftovers(tmp_path, "x.gguf")
