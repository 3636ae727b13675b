"""Interruption: `merge`, `export --format gguf`, `heal` and `build` killed with SIGKILL at injected
points (mid-way through the trajectory, the GGUF write, the heal's training or the build; just
before and just after the final rename), then run again on the same cache and --out.  The rerun
succeeds with the same weights / file, byte for byte, as an uninterrupted run; --out is never
half-written; the killed run's temporary folder is removed by the rerun; the cache entries a
killed run left are whole or absent; a heal (alone or inside a build) resumes from its checkpoint.

Every command runs pinned to one CPU: one thread in torch and llama.cpp on any host, so a rerun
does the same float reductions as the reference it is compared with byte for byte, and the runs
do not fight a loaded CI machine's other jobs for cores."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SMALL = ["--samples", "4", "--seq-len", "64", "--positions", "96", "--repeats", "2", "--loss-samples", "2"]


def _launcher() -> str:
    """``python -c`` code that pins the process to one CPU where the OS can (before torch loads)
    and runs the CLI."""
    pin = f"os.sched_setaffinity(0, {{{min(os.sched_getaffinity(0))}}}); " if hasattr(os, "sched_getaffinity") else ""
    return f"import os, sys; {pin}sys.argv[0] = 'mka-edge'; from mka_edge.cli import main; main()"


LAUNCH = _launcher()


def _run(args: list[str], cache: Path, kill: str | None = None) -> subprocess.CompletedProcess:
    """`mka-edge ARGS` on one CPU and one torch thread, killed at ``kill``."""
    env = dict(os.environ, MKA_EDGE_CACHE=str(cache), OMP_NUM_THREADS="1")
    env.pop("MKA_EDGE_KILL_AT", None)
    if kill:
        env["MKA_EDGE_KILL_AT"] = kill
    return subprocess.run([sys.executable, "-c", LAUNCH, *args], capture_output=True, text=True, env=env)


def _killed(args: list[str], cache: Path, point: str) -> subprocess.CompletedProcess:
    r = _run(args, cache, kill=point)
    assert r.returncode == -9, f"not killed at {point}: " + r.stderr[-2000:]
    _entries_whole(cache)
    return r


def _digest(path: Path) -> dict[str, str]:
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _leftovers(folder: Path, name: str) -> list[Path]:
    return [p for p in folder.glob(f".{name}.*") if not p.name.endswith(".lock")]


def _entries_whole(cache: Path) -> None:
    """Every cache entry a killed run left parses: JSON entries (trajectories, curves, probes) and
    heal checkpoints (meta, tensors, optimizer state).  A killed run's temporary siblings
    (``.NAME.PID.*``) are not entries: the next run removes them."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    entries = [p for p in cache.rglob("*") if not any(part.startswith(".") for part in p.relative_to(cache).parts)]
    for f in entries:
        if f.suffix == ".json":
            json.loads(f.read_text())  # a half-written entry would not parse
        elif f.suffix == ".npz":
            np.load(f).files  # nor would a half-written archive open
    for ckpt in (cache / "heal-checkpoints").glob("[!.]*"):
        json.loads((ckpt / "meta.json").read_text())
        load_file(str(ckpt / "trainable.safetensors"))
        torch.load(ckpt / "optimizer.pt", weights_only=True)


def _checkpoint_steps(cache: Path) -> list[int]:
    """The steps of the heal checkpoints in ``cache`` (they are keyed by settings, not by --out)."""
    return sorted(json.loads(m.read_text())["step"] for m in (cache / "heal-checkpoints").glob("[!.]*/meta.json"))


def _artifact(out: Path) -> str:
    """sha256 of the build's one GGUF (the rest of a package, reports and timings, may differ)."""
    (gguf,) = out.glob("*.gguf")
    return hashlib.sha256(gguf.read_bytes()).hexdigest()


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


HEAL = ["--steps", "4", "--checkpoint-every", "2", "--heal-seq-len", "64", "--heldout-chunks", "1"]


@pytest.fixture(scope="module")
def calibration(tmp_path_factory) -> Path:
    """40,000 characters of the packaged calibration articles: windows enough for these runs, and
    every run tokenizes 2 MB less (seconds per run on a slow CI machine)."""
    from mka_edge.calibration import load_texts

    text = "\n\n".join(load_texts()[:3])[:40_000]
    path = tmp_path_factory.mktemp("calibration") / "calibration.jsonl"
    path.write_text(json.dumps({"text": text}) + "\n")
    return path


@pytest.fixture(scope="module")
def heal_ref(tiny_dir, tmp_path_factory, calibration) -> tuple[list[str], Path]:
    """The heal command (without --out) of a merged tiny model (4 steps, a checkpoint at step 2),
    and the uninterrupted heal's result.  The merge and the reference heal run in this process (no
    second start of Python and torch), on one thread like the pinned commands."""
    import torch
    from conftest import tiny_context

    from mka_edge.heal.distill import HealConfig, heal
    from mka_edge.merging import merge

    root = tmp_path_factory.mktemp("heal")
    merged, ref = root / "merged", root / "ref"
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:  # the autouse cache fixture is not set up yet in a module fixture
        mp.setenv("MKA_EDGE_CACHE", str(root / "cache"))
        torch.set_num_threads(1)
        try:
            ctx = tiny_context(tiny_dir, calibration=str(calibration))
            merge(ctx, 1, "drop-last", "0.5", merged, heldout=0, progress=False)
            cfg = HealConfig(steps=4, checkpoint_every=2, seq_len=64, heldout_chunks=1, calibration=str(calibration))
            heal(str(merged), ref, cfg, progress=False, log=lambda m: None)
        finally:
            torch.set_num_threads(threads)
    return ["heal", "--model", str(merged), *HEAL, "--calibration", str(calibration)], ref


def test_killed_heal_resumes_and_reruns_to_the_same_weights(tmp_path, heal_ref):
    """One heal killed at each point in turn, each run the rerun of the one killed before it
    (mid-training after the step-2 checkpoint, just before and just after the healed folder's
    rename), then run to the end: the same weights as the uninterrupted heal."""
    base, ref = heal_ref
    out, cache = tmp_path / "h", tmp_path / "cache"
    args = [*base, "--out", str(out)]

    _killed(args, cache, "heal:step-3")  # killed after step 3: the checkpoint of step 2 is whole
    assert not out.exists() and _checkpoint_steps(cache) == [2]

    r = _killed(args, cache, "before-rename:h")
    assert "resuming from the checkpoint at step 2 of 4" in r.stderr
    assert not out.exists() and _leftovers(tmp_path, "h")

    r = _killed(args, cache, "after-rename:h")  # the rename is the commit: the folder is whole
    assert "resuming from the checkpoint at step 2 of 4" in r.stderr
    assert _digest(out) == _digest(ref) and json.loads((out / "heal_log.json").read_text())["resumed_from"] == 2
    assert not _leftovers(tmp_path, "h")  # the run killed before the rename left its folder; this run removed it

    r = _run(args, cache)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _digest(out) == _digest(ref) and (out / "merge_log.json").is_file() and (out / "heal_log.json").is_file()
    assert not _leftovers(tmp_path, "h") and _checkpoint_steps(cache) == []  # a finished heal removes its checkpoint


@pytest.fixture(scope="module")
def build_ref(tmp_path_factory, calibration) -> tuple[list[str], Path, Path]:
    """An uninterrupted healed build of a tiny model (K=1 forced by the budget, 4 heal steps with
    a checkpoint at step 2, Q8_0): the command, its cache and the package.  The cache is shared
    with the killed builds: with the plan's caches warm (its healed curve included), the only heal
    a killed build runs is the build's own."""
    from conftest import predicted_memory_mb, tiny_build_inputs

    root = tmp_path_factory.mktemp("build")
    src, recipe, profile = tiny_build_inputs(root, seed=47)
    with pytest.MonkeyPatch.context() as mp:  # the type sizes' cache entry: the build's cache, not ~/.cache
        mp.setenv("MKA_EDGE_CACHE", str(root / "cache"))
        budget = (predicted_memory_mb(src, "Q8_0", 0, 1024) + predicted_memory_mb(src, "Q8_0", 1, 1024)) / 2
    args = ["build", "--profile", str(profile), "--model", str(recipe), "--method", "drop-last", "--quants", "Q8_0"]
    args += ["--samples", "4", "--seq-len", "64", "--positions", "96", "--repeats", "2", "--max-merge", "1"]
    args += ["--calibration", str(calibration), "--mmlu-per-subject", "0", "--budget-mb", f"{budget:.4f}", "--force"]
    args += ["--heal-steps", "4", "--checkpoint-every", "2", "--heal-seq-len", "64", "--heal-curve-points", "1"]
    ref = root / "ref"
    r = _run([*args, "--out", str(ref)], root / "cache")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((ref / "manifest.json").read_text())["attempts"][-1]["heal"]["steps"] == 4  # merged and healed
    return args, root / "cache", ref


def test_killed_healed_build_resumes_and_reruns_to_the_same_artifact(tmp_path, build_ref):
    """One build killed at each point in turn, each run the rerun of the one killed before it:
    mid-heal (after the step-2 checkpoint), after the export but before the validation, just
    before and just after --out's rename; then run to the end.  The heal
    resumes from its checkpoint (the build's temporary folder, where it heals, is lost with the
    killed run), and every artifact equals the uninterrupted build's, byte for byte."""
    base, cache, ref = build_ref
    out = tmp_path / "pkg"
    args = [*base, "--out", str(out)]

    _killed(args, cache, "heal:step-3")
    assert not out.exists() and _leftovers(tmp_path, "pkg") and _checkpoint_steps(cache) == [2]

    r = _killed(args, cache, "build:after-export")  # the artifact written in the temporary folder, not validated
    assert "resuming from the checkpoint at step 2 of 4" in r.stdout + r.stderr
    (scratch,) = _leftovers(tmp_path, "pkg")  # this run's: the first killed run's folder is gone
    assert not out.exists() and _artifact(scratch) == _artifact(ref)
    assert _checkpoint_steps(cache) == []  # the heal finished

    _killed(args, cache, "before-rename:pkg")
    assert not out.exists() and len(_leftovers(tmp_path, "pkg")) == 1

    _killed(args, cache, "after-rename:pkg")  # the rename is the commit: the package is whole
    assert _artifact(out) == _artifact(ref) and (out / "manifest.json").is_file()
    assert not _leftovers(tmp_path, "pkg")

    r = _run(args, cache)  # the same command (--force) over the whole package
    assert r.returncode == 0, r.stderr[-2000:]
    assert _artifact(out) == _artifact(ref) and (out / "manifest.json").is_file()
    assert not _leftovers(tmp_path, "pkg")
