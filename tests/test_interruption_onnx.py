"""Interruption of `export --format onnx`: mka-edge killed with SIGKILL at injected points (after the
builder wrote its files, just before and just after the final rename), the builder subprocess
killed mid-save, and mka-edge killed while its builder runs (these two with a stand-in builder).
--out is never half-written, the rerun gives files byte-identical to an uninterrupted export and
removes the killed runs' scratch, and no builder outlives a killed mka-edge.

Why a chain of runs on one --out and not a fresh start per point: every export runs
onnxruntime-genai's builder, seconds of imports on a small machine.  The first run, killed just
after its rename, is a whole uninterrupted export (the kill comes after its last byte): the
reference.  The next two are killed before they commit, while replacing it: the reference must
survive them whole (the absent case, a kill before a first export commits, is the same code with
no old --out, covered for merge and GGUF in test_interruption.py), and each run removes the scratch
of the one killed before it.  The last run, uninterrupted, must reproduce the reference byte for
byte: the fp32 builder is deterministic (external-data offsets, initializer names and graph follow
from the model; no timestamps or random names), as is our rewrite, so whole files are compared."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

QUANT = "fp32"  # the quickest build; the kill points do not depend on the quant


def _args(model: Path, out: Path) -> list[str]:
    return ["export", "--format", "onnx", "--quant", QUANT, "--model", str(model), "--out", str(out)]


def _killed_run(args: list[str], point: str) -> tuple[int, int, str]:
    """Run the CLI in a fresh process armed to SIGKILL itself at ``point``: (pid, returncode, stderr)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MKA_EDGE_KILL_AT", "MKA_EDGE_FAIL_AT")}
    env["MKA_EDGE_KILL_AT"] = point
    cmd = [sys.executable, "-m", "mka_edge.cli", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _, err = proc.communicate(timeout=300)
    return proc.pid, proc.returncode, err


def _cli(args: list[str]):
    """The same command in this process (its imports are warm: an export costs the builder only)."""
    from click.testing import CliRunner

    from mka_edge.cli import cli

    return CliRunner().invoke(cli, args)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _scratch(folder: Path, name: str) -> list[Path]:
    """Temporary siblings of --out (``.NAME.PID.*``: the scratch folder, a source copy, a replaced --out)."""
    return sorted(folder.glob(f".{name}.*"))


def test_killed_onnx_export_reruns_to_the_same_files(tiny_dir, tmp_path):
    out = tmp_path / "o"
    pid, rc, err = _killed_run(_args(tiny_dir, out), "after-rename:o")
    assert rc == -signal.SIGKILL, err[-2000:]
    ref = _digest(out)  # committed before the kill: a whole export, the reference
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "mka_edge.json"} <= set(ref)
    assert not _scratch(tmp_path, "o")
    for point in ("onnx:mid-build", "before-rename:o"):
        pid, rc, err = _killed_run(_args(tiny_dir, out), point)
        assert rc == -signal.SIGKILL, (point, err[-2000:])
        assert _digest(out) == ref, point  # not committed: the old export is untouched
        left = _scratch(tmp_path, "o")
        assert left and all(p.name.startswith(f".o.{pid}.") for p in left), (point, left)  # only this run's
    r = _cli(_args(tiny_dir, out))  # the same command, uninterrupted
    assert r.exit_code == 0, r.output[-2000:]
    assert _digest(out) == ref
    assert not _scratch(tmp_path, "o")  # the killed run's scratch and the replaced export are gone


SLOW_BUILDER = """
import sys, time
out = sys.argv[sys.argv.index("-o") + 1]
with open(out + "/model.onnx.data", "wb") as fh:
    fh.write(b"half a tensor")
print("Saving ONNX model in " + out, flush=True)
time.sleep(120)
"""


def _stand_in_builder(monkeypatch, folder: Path, name: str, code: str) -> None:
    """Make the exporter start ``code`` instead of onnxruntime-genai's builder (seconds of imports)."""
    from mka_edge.exporters import onnx as onnx_exporter

    folder.mkdir()
    (folder / f"{name}.py").write_text(code)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")])))
    monkeypatch.setattr(onnx_exporter, "BUILDER_MODULE", name)


def test_killed_builder_leaves_no_out(tiny_dir, tmp_path, monkeypatch):
    """The builder killed mid-save (as the out-of-memory killer would): one line naming the signal,
    no --out, no scratch (the builder's half-written file goes with it).  A stand-in builder: what
    is tested is how mka-edge takes its builder's death, not the builder."""
    _stand_in_builder(monkeypatch, tmp_path / "fakes", "slow_builder", SLOW_BUILDER)
    out = tmp_path / "o"
    monkeypatch.setenv("MKA_EDGE_KILL_AT", "onnx:kill-builder")
    r = _cli(_args(tiny_dir, out))
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.exit_code == 2 and len(lines) == 1 and "killed by SIGKILL" in lines[0], r.output[-2000:]
    assert "Traceback" not in r.output
    assert not out.exists() and not _scratch(tmp_path, "o")


def _gone(pid: int) -> bool:
    """Not running: no such process, or a zombie waiting for a reaper."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the builder's parent-death signal is Linux's")
def test_builder_dies_with_a_killed_mka_edge(tmp_path):
    """mka-edge SIGKILLed while its builder runs takes the builder with it: no orphan holding a
    second copy of the weights and writing into a scratch folder the next run removes.  A stand-in
    builder that sleeps keeps this quick."""
    (tmp_path / "sleepy_builder.py").write_text(
        "import time\nprint('Saving ONNX model', flush=True)\ntime.sleep(120)\n"
    )
    code = (
        "import os, signal\n"
        "from mka_edge.exporters.onnx import start_builder\n"
        "p = start_builder([], module='sleepy_builder')\n"
        "print(p.pid, flush=True)\n"
        "p.stdout.readline()\n"  # the builder is running its module
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    child = int(r.stdout.split()[0])
    deadline = time.monotonic() + 10
    while not _gone(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    if not _gone(child):
        os.kill(child, signal.SIGKILL)
        pytest.fail("the builder outlived the killed mka-edge")
