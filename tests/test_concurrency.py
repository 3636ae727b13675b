"""Concurrent commands share the cache safely.  Two `merge` runs, and two `build` runs, with the
same inputs, different --out folders and one cache, started together: both succeed with
byte-identical outputs, and every expensive cache entry (trajectory, merge-quality curve, quant
probe with its speed calibration, reference log-probs, the quant types' sizes) is computed once:
the second process waits on the entry's lock, says so, and reads what the first wrote."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

from conftest import predicted_memory_mb, tiny_build_inputs

from mka_edge.cache import entry_lock


def _sha(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


def test_two_merges_share_one_trajectory(tiny_dir, tmp_path):
    env = dict(os.environ, MKA_EDGE_CACHE=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "mka_edge.cli", "merge", "-k", "2", "--method", "sleb", "--model", str(tiny_dir)]
    cmd += ["--samples", "4", "--seq-len", "64", "--positions", "96", "--repeats", "2", "--loss-samples", "2"]
    procs = [
        subprocess.Popen([*cmd, "--out", str(tmp_path / name)], stderr=subprocess.PIPE, text=True, env=env)
        for name in ("a", "b")
    ]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert _sha(tmp_path / "a") == _sha(tmp_path / "b") and _sha(tmp_path / "a")
    computed = [e for e in errs if "merge sleb" in e]  # the trajectory's progress bar: only where it ran
    assert len(computed) == 1, errs
    # the other one either waited for the lock (said so) or started after the entry was written
    other = errs[1 - errs.index(computed[0])]
    assert "Traceback" not in other
    left = [p for p in (tmp_path / "cache" / "trajectories").glob(".*.json.*") if p.suffix != ".lock"]
    assert not left  # no temporary file left (the lock files stay: the kernel holds the lock, not the file)


# What only the process that computes an entry prints (progress bars and "not cached yet" lines).
BUILD_WORK = {
    "the quant probe (and the host's speed calibration in it)": r"measuring quant types:",
    "the sleb trajectory": r"merge sleb:",
    "the sleb merge-quality curve": r"merge-quality curve for sleb up to",
    "the probe's reference log-probs (2 chunks)": r"reference log-probs:\s+0%.*\| 0/2 ",
    "the validation's reference log-probs (4 chunks)": r"reference log-probs:\s+0%.*\| 0/4 ",
}


def test_two_builds_compute_each_expensive_entry_once(tmp_path):
    """Two builds started together: both package a byte-identical GGUF, and each expensive entry
    the build caches is computed by one of them only.  The budget lies between the K=1 and K=0
    footprints, so the plan needs the merge curve (sleb's; the sleb-attn curve beside it is the
    same code and lock, left out for time with --no-attention-removal)."""
    src, recipe, profile = tiny_build_inputs(tmp_path, seed=47)
    mem = [predicted_memory_mb(src, "Q8_0", k=k, context=1024) for k in (0, 1)]
    cache = tmp_path / "cache"
    env = dict(os.environ, MKA_EDGE_CACHE=str(cache))
    cmd = [sys.executable, "-m", "mka_edge.cli", "build", "--profile", str(profile), "--model", str(recipe)]
    cmd += ["--method", "sleb", "--quants", "Q8_0", "--max-merge", "1", "--budget-mb", f"{(mem[0] + mem[1]) / 2:.4f}"]
    cmd += ["--samples", "4", "--seq-len", "64", "--positions", "96", "--repeats", "2", "--mmlu-per-subject", "0"]
    cmd += ["--no-attention-removal", "--max-tries", "1"]
    procs = [
        subprocess.Popen(
            [*cmd, "--out", str(tmp_path / name)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        for name in ("a", "b")
    ]
    errs = [p.communicate(timeout=900)[0] for p in procs]  # the log (stdout) and the progress bars (stderr)
    assert [p.returncode for p in procs] == [0, 0], [e[-3000:] for e in errs]
    assert not any("Traceback" in e for e in errs)

    arts = [sorted((tmp_path / name).glob("*.gguf")) for name in ("a", "b")]
    assert len(arts[0]) == 1 and [a.name for a in arts[0]] == [a.name for a in arts[1]], arts
    assert "-K1-" in arts[0][0].name  # the budget forced a merge: the curves were needed
    assert hashlib.sha256(arts[0][0].read_bytes()).digest() == hashlib.sha256(arts[1][0].read_bytes()).digest()

    for what, marker in BUILD_WORK.items():
        ran = [i for i, e in enumerate(errs) if re.search(marker, e)]
        assert len(ran) == 1, f"{what}: computed by {len(ran)} of the 2 builds, not by exactly one"
    # the two met at a lock at least once (the probe alone takes seconds), and the one that waited said so
    assert any("waiting for another mka-edge process computing" in e for e in errs), errs

    # every entry that was computed has its lock beside it, and no temporary sibling is left
    for folder in ("type_sizes", "quant_probe", "references", "trajectories", "curves"):
        assert list((cache / folder).glob(".*.lock")), f"no entry lock in the cache's {folder}/"
    left = [p for p in cache.rglob(".*") if not p.name.endswith(".lock")]
    assert not left, left


def test_entry_lock_makes_the_second_holder_wait_and_say_so(tmp_path):
    said: list[str] = []
    order: list[str] = []
    entry = tmp_path / "entry.json"
    first_in = threading.Event()

    def first():
        with entry_lock(entry, "a test entry"):
            first_in.set()
            order.append("first computes")
            threading.Event().wait(0.5)
            entry.write_text("{}")
            order.append("first wrote")

    t = threading.Thread(target=first)
    t.start()
    first_in.wait(5)
    with entry_lock(entry, "a test entry", log=said.append):
        order.append("second sees the entry" if entry.is_file() else "second computes")
    t.join()
    assert order == ["first computes", "first wrote", "second sees the entry"]
    assert said == ["waiting for another mka-edge process computing a test entry (entry.json)"]


def _race(compute, stub_target: tuple, monkeypatch, capsys) -> list:
    """Run ``compute`` in two threads at once with the expensive worker ``stub_target`` (module,
    name) replaced by a slow counting stub; return the stub's call count and both results."""
    module, name = stub_target
    real_calls: list[int] = []
    original = getattr(module, name)

    def slow(*a, **kw):
        real_calls.append(1)
        threading.Event().wait(0.4)  # long enough for the other thread to reach the lock
        return original(*a, **kw)

    monkeypatch.setattr(module, name, slow)
    results: list = [None, None]
    start = threading.Barrier(2)

    def one(i: int) -> None:
        start.wait()
        results[i] = compute()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    return [len(real_calls), results, capsys.readouterr().err]


def test_each_new_entry_lock_computes_once(tmp_path, monkeypatch, capsys):
    """The entries locked for issue 16 (merge-quality curve, healed curve, importance matrix,
    reference log-probs and MMLU answers, llama.cpp's type sizes, the ONNX probe): two callers at
    once compute each one once; the second waits on the lock, says so, and reads the first's."""
    from types import SimpleNamespace

    import numpy as np
    import torch

    from mka_edge.exporters import imatrix
    from mka_edge.heal.distill import HealConfig
    from mka_edge.solver import feasibility, onnx_probe, quality
    from mka_edge.validate import reference

    monkeypatch.setenv("MKA_EDGE_CACHE", str(tmp_path / "cache"))
    ctx = SimpleNamespace(
        lm=SimpleNamespace(fingerprint="f" * 40, tokenizer=None, input_device="cpu"),
        settings=SimpleNamespace(key=lambda: "s", ref_context=64),
        n_original=4,
    )

    def fake_curve(ctx, path, method, *a):
        quality.atomic_write_text(path, json.dumps({"kl": [0.0, 0.1], "complete": True}))
        return {"kl": [0.0, 0.1], "complete": True, "cached": False}

    def fake_healed(ctx, curve, path, *a):
        quality.atomic_write_text(path, json.dumps({"kl": [0.0, 0.05]}))
        return {"kl": [0.0, 0.05], "cached": False}

    def fake_reference(lm, ids, path, progress, top_k):
        np.savez(path, ids=ids.numpy(), top_logp=np.zeros((1, 2, 2), np.float32))

    def fake_onnx(lm, missing, keys, results, folder, *a):
        for q in missing:
            quality.atomic_write_text(folder / f"onnx-{q}-{keys[q][:20]}.json", json.dumps({"kl": 0.1}))
            results[q] = {"kl": 0.1}

    monkeypatch.setattr(quality, "_compute_curve", fake_curve)
    monkeypatch.setattr(quality, "_compute_healed", fake_healed)
    monkeypatch.setattr(imatrix, "_imatrix_arrays", lambda lm, batch, progress: {"blk.0.x": np.ones(2, np.float32)})
    monkeypatch.setattr(reference, "heldout_chunks", lambda tok, n, path=None: torch.zeros((1, 3), dtype=torch.int64))
    monkeypatch.setattr(reference, "_write_reference", fake_reference)
    monkeypatch.setattr(onnx_probe, "_measure_onnx", fake_onnx)
    monkeypatch.setattr(feasibility, "write_shape_gguf", lambda lm, path: {})
    monkeypatch.setattr(feasibility, "dry_run_types", lambda src, ftypes: {f: {} for f in ftypes})
    shape = SimpleNamespace(config=SimpleNamespace(to_json_string=lambda use_diff: "{}"), model=None, arch=None)
    spec = SimpleNamespace(source="packaged:test", samples=1, seq_len=3)
    curve = {"kl": [0.0, 0.1], "chunks": 1}
    mmlu = SimpleNamespace(
        **vars(ctx.lm), model=lambda input_ids, use_cache, **kw: SimpleNamespace(logits=torch.ones(1, 1, 4))
    )

    cases = {
        "the merge-quality curve of sleb": (
            lambda: quality.merge_curve(ctx, "sleb", 1, progress=False),
            (quality, "_compute_curve"),
        ),
        "the healed quality curve of sleb": (
            lambda: quality.healed_curve(ctx, curve, "sleb", "calibrated", HealConfig(steps=1), points=1),
            (quality, "_compute_healed"),
        ),
        "the importance matrix": (
            lambda: imatrix.ensure_imatrix(ctx.lm, ("k" * 20, None, spec), progress=False),
            (imatrix, "_imatrix_arrays"),
        ),
        "the reference log-probabilities": (
            lambda: reference.compact_reference(ctx.lm, 1, progress=False)[0],
            (reference, "_write_reference"),
        ),
        "the reference MMLU answers": (
            lambda: reference.reference_mmlu(mmlu, [{"ids": [1, 2], "answer": 0}], [0, 1, 2, 3], progress=False),
            (mmlu, "model"),
        ),
        "the quant types' sizes": (
            lambda: feasibility.gguf_type_sizes(shape, ["Q8_0"]),
            (feasibility, "dry_run_types"),
        ),
        "the ONNX quant probe": (
            lambda: onnx_probe.probe_onnx(ctx.lm, ["int8"], progress=False),
            (onnx_probe, "_measure_onnx"),
        ),
    }
    for what, (compute, worker) in cases.items():
        calls, results, err = _race(compute, worker, monkeypatch, capsys)
        assert calls == 1, f"{what}: computed {calls} times by two callers at once"
        assert results[0] == results[1] or what.endswith("curve of sleb"), (what, results)
        assert f"waiting for another mka-edge process computing {what}" in err, (what, err)
