"""A full disk during `export --format onnx`: in our own writes (``MKA_EDGE_FAIL_AT=onnx:mid-write``
raises ENOSPC after model.onnx is rewritten), in the builder subprocess (a stand-in builder whose
write fails with errno 28, injected or for real on a 160 KiB tmpfs where this host lets the test
mount one).  Each is one line saying how much space the export needs and how much is free; nothing
is left at --out and no scratch folder beside it; with the space back the same command works.

The CLI runs in this process (click's runner): its imports are then warm and an export costs the
builder only; only the export that must work runs the real builder, which keeps these tests within
their time budget."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytest


def _args(model: Path, out: Path) -> list[str]:
    return ["export", "--format", "onnx", "--quant", "fp32", "--model", str(model), "--out", str(out)]


def _cli(args: list[str]):
    from click.testing import CliRunner

    from mka_edge.cli import cli

    return CliRunner().invoke(cli, args)


def _one_disk_line(r, where: Path) -> None:
    """Exit code 2, no traceback, exactly one error line: the disk, what the export needs, what is free."""
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.exit_code == 2 and "Traceback" not in r.output and len(errors) == 1, r.output[-2000:]
    assert errors[0].startswith(f"error: no space left on the disk of {where} while writing the ONNX export")
    assert "the export needs about" in errors[0] and "MB are free" in errors[0], errors[0]


def _nothing_left(folder: Path, out: Path) -> None:
    assert not out.exists()
    assert not list(folder.glob(f".{out.name}.*")), list(folder.iterdir())  # scratch, source copy


# A stand-in for the builder that writes the least our finishing step reads (a one-node model and
# its genai_config.json): the failing run below needs a builder's output to fail in, not the real
# builder's seconds of imports.  The run after it, with the real builder, is the export that works.
SMALL_BUILDER = """
import json, sys
import onnx
from onnx import TensorProto, helper
out = sys.argv[sys.argv.index("-o") + 1]
io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in ("x", "y")]
graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", io[:1], io[1:])
onnx.save_model(helper.make_model(graph), out + "/model.onnx")
with open(out + "/genai_config.json", "w") as fh:
    json.dump({"model": {"decoder": {"filename": "model.onnx"}}, "search": {"max_length": 64}}, fh)
"""


def _stand_in_builder(monkeypatch, folder: Path, name: str, code: str) -> None:
    """Make the exporter start ``code`` instead of onnxruntime-genai's builder."""
    from mka_edge.exporters import onnx as onnx_exporter

    folder.mkdir(exist_ok=True)
    (folder / f"{name}.py").write_text(code)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")])))
    monkeypatch.setattr(onnx_exporter, "BUILDER_MODULE", name)


def test_out_of_space_in_our_writes_is_one_line_and_leaves_nothing(tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "o"
    with monkeypatch.context() as m:
        _stand_in_builder(m, tmp_path / "fakes", "small_builder", SMALL_BUILDER)
        m.setenv("MKA_EDGE_FAIL_AT", "onnx:mid-write")
        _one_disk_line(_cli(_args(tiny_dir, out)), tmp_path)
    _nothing_left(tmp_path, out)
    r = _cli(_args(tiny_dir, out))  # space back: the same command works (the real builder)
    assert r.exit_code == 0, r.output[-2000:]
    assert {"model.onnx", "model.onnx.data", "genai_config.json"} <= {p.name for p in out.iterdir()}
    assert not list(tmp_path.glob(".o.*"))


FULL_BUILDER = """
import sys
out = sys.argv[sys.argv.index("-o") + 1]
print("Reading layer 0", flush=True)
print("Saving ONNX model in " + out, flush=True)
with open(out + "/model.onnx.data", "wb") as fh:
    for _ in range(64):
        fh.write(bytes(16384))  # 1 MiB: more than the small tmpfs holds
        fh.flush()
raise OSError(28, "No space left on device")  # where the disk had room: as if it had not
"""


@contextmanager
def _small_fs(folder: Path) -> Iterator[Path | None]:
    """A 160 KiB tmpfs mounted at ``folder`` where this host lets the test mount one, else None."""
    folder.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        yield None
        return
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(folder)], capture_output=True
    ).returncode:
        yield None
        return
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


@pytest.mark.parametrize("disk", ["injected", "tmpfs"])
def test_out_of_space_in_the_builder_is_the_same_one_line(tiny_dir, tmp_path, monkeypatch, disk):
    """The builder's own write failing (its traceback ends in errno 28) reads like ours, and its
    half-written file goes with the scratch folder.  On the tmpfs the kernel refuses the write in
    the subprocess.  A stand-in builder writes the weights: the real one takes seconds to start, and
    how it fails on a full disk (Python's ``OSError: [Errno 28] No space left on device``, from
    onnx_ir's external-data writer) is what the stand-in prints."""
    _stand_in_builder(monkeypatch, tmp_path / "fakes", "full_builder", FULL_BUILDER)
    with _small_fs(tmp_path / "small") if disk == "tmpfs" else nullcontext(tmp_path) as where:
        if where is None:
            pytest.skip("mounting a small tmpfs needs root, mount(8) and a host that allows it")
        out = where / "o"
        _one_disk_line(_cli(_args(tiny_dir, out)), where)
        _nothing_left(where, out)
        if disk == "tmpfs":
            assert not list(where.iterdir())
