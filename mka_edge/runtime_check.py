"""Preflight: check once that the installed llama.cpp runs on this CPU, before the first llama.cpp
child of a command.

Why: a llama-cpp-python compiled for another CPU (a native build on a VM that advertises AMX and
refuses it, issue 22) loads fine and dies by SIGILL only in its first large batch, minutes into a
build, as "probe of Q8_0 failed".  A child (``runtime_check_worker``) runs the same quantized
kernels on a tiny model in about a second, so the failure comes first and says what to reinstall.
Success is remembered on disk per (llama-cpp-python version, its library files, the CPU's flags,
the Python) and for the rest of the process; a failure is never remembered.

Called by ``validate/runner.run_child`` (for the llama.cpp worker only), by
``exporters/llama_quantize`` (dry run and quantize) and by ``validate/llama_buffers``.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .cache import atomic_write_text, cache_root, stable_hash
from .child_exit import explain_exit
from .cpu import cpu_flags, reinstall_command
from .errors import UserError
from .versions import dist_version

WORKER = "mka_edge.runtime_check_worker"
WORKER_VERSION = 1  # bump when the worker checks something new: old entries then no longer count
LLAMA_CPP_WORKERS = frozenset({"mka_edge.validate.gguf_worker"})  # run_child's workers that run llama.cpp
TIMEOUT_S = 300
WHAT = "llama.cpp's runtime check (a 64-token batch over Q8_0 and Q4_0 weights)"

_passed = False  # this process has seen the check pass (or found it in the cache)


def worker_command(folder: Path) -> list[str]:
    """The child that runs the check, writing its model files into ``folder`` (tests replace it)."""
    return [sys.executable, "-m", WORKER, str(folder)]


def _library_files() -> list[tuple[str, int, int]]:
    """(name, size, mtime) of the llama_cpp package's shared libraries, found without importing it
    (importing llama.cpp into the caller is what the check keeps away): a reinstall of the same
    version with other CMake flags changes them."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return []
    lib = Path(next(iter(spec.submodule_search_locations))) / "lib"
    if not lib.is_dir():
        return []
    return [
        (p.name, p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(lib.iterdir())
        if p.is_file() and not p.is_symlink() and (".so" in p.name or p.suffix in (".dylib", ".dll"))
    ]


def _key() -> dict:
    return {
        "worker": WORKER_VERSION,
        "llama_cpp_python": dist_version("llama-cpp-python"),
        "libraries": _library_files(),
        "cpu_flags": sorted(cpu_flags()),
        "python": sys.executable,
    }


def entry_path(key: dict | None = None) -> Path:
    """Where the success of the check for this install, CPU and Python is recorded."""
    return cache_root() / "runtime_check" / f"{stable_hash(key or _key())}.json"


def _failure(proc: subprocess.CompletedProcess) -> str:
    """The one line for a check child that did not pass."""
    lines = [line.strip() for line in (proc.stderr or "").splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    killed = explain_exit(proc.returncode, WHAT, last)
    if killed:
        return killed
    if last.startswith("cannot load: "):
        return f"llama.cpp's bindings cannot load ({last.removeprefix('cannot load: ')[:200]}); reinstall: " + (
            reinstall_command()
        )
    why = last.removeprefix("llama.cpp failed: ")[:200] or f"exit code {proc.returncode}"
    return f"{WHAT} failed ({why}); reinstall: {reinstall_command()}"


def check_llama_cpp() -> None:
    """Raise UserError with one line unless the installed llama.cpp runs quantized kernels on this
    CPU; a second call (in this process, or any process finding the cache entry) costs nothing."""
    global _passed
    if _passed:
        return
    key = _key()
    entry = entry_path(key)
    if entry.is_file():
        _passed = True
        return
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mka-edge-runtime-check-") as tmp:
        try:
            proc = subprocess.run(worker_command(Path(tmp)), capture_output=True, text=True, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise UserError(
                f"{WHAT} did not finish within {TIMEOUT_S} s; check that the machine is not overloaded and rerun"
            ) from None
    if proc.returncode != 0:
        raise UserError(_failure(proc))
    atomic_write_text(entry, json.dumps(key | {"seconds": round(time.monotonic() - t0, 2)}, indent=1) + "\n")
    _passed = True
