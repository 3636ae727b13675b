"""Concurrent commands share the cache safely: two `merge` runs with the same inputs, different
--out folders and one cache, started together, both succeed with byte-identical weights, and the
trajectory (the expensive entry) is computed once: the second process waits on the entry's lock,
says so, and reads what the first wrote."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path

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
