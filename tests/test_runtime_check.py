"""A llama.cpp built for another CPU (issue 22: a native build on a VM that advertises AMX and refuses
it) is named in one line with the reinstall that fits, before any work: the child-exit explanation,
the runtime preflight and its cache, and the installed library itself (no AMX, no AVX-512)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mka_edge import child_exit, cpu, runtime_check
from mka_edge.errors import UserError

# a child that dies as issue 22's did, without leaving a core file
DIE_BY = (
    "import os, resource, signal; resource.setrlimit(resource.RLIMIT_CORE, (0, 0)); os.kill(os.getpid(), signal.{})"
)


def _fake_worker(root: Path, signame: str, monkeypatch) -> str:
    """A worker module (importable by the child through PYTHONPATH) that kills itself by ``signame``."""
    name = f"fake_{signame.lower()}_worker"
    (root / f"{name}.py").write_text(DIE_BY.format(signame) + "\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    return name


@pytest.fixture
def fresh(tmp_path, monkeypatch) -> Path:
    """An empty cache and a process that has not run the preflight yet."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("MKA_EDGE_CACHE", str(cache))
    monkeypatch.setattr(runtime_check, "_passed", False)
    return cache


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


def test_sigill_in_a_llama_cpp_worker_names_the_cpu_and_the_reinstall(tmp_path, monkeypatch):
    from mka_edge.validate import runner
    from mka_edge.validate.jobs import LatencyJob

    module = _fake_worker(tmp_path, "SIGILL", monkeypatch)
    monkeypatch.setattr(runner, "LLAMA_CPP_WORKERS", frozenset({module}))
    monkeypatch.setattr(runtime_check, "_passed", True)  # the preflight is tested below
    with pytest.raises(UserError) as exc:
        runner.run_child(module, LatencyJob("x.gguf", 1), 60, "probe of Q8_0")
    msg = _one_line(exc)
    assert msg.startswith("probe of Q8_0 was killed by SIGILL: llama.cpp ran an instruction this CPU refuses"), msg
    flags = cpu.cpu_flags()
    if flags:
        assert f"avx2 {'yes' if 'avx2' in flags else 'no'}" in msg and "amx_tile " in msg, msg
    how, command = cpu.fitting_reinstall(flags)
    assert msg.endswith(f"llama-cpp-python was compiled for another CPU: {how}: {command}"), msg
    assert "--no-cache-dir --force-reinstall --no-deps llama-cpp-python==" in command


def test_other_signals_are_named(tmp_path, monkeypatch):
    from mka_edge.validate import runner
    from mka_edge.validate.jobs import LatencyJob

    module = _fake_worker(tmp_path, "SIGSEGV", monkeypatch)
    with pytest.raises(UserError) as exc:  # not a llama.cpp worker: no preflight, no reinstall advice
        runner.run_child(module, LatencyJob("x.gguf", 1), 60, "latency run")
    assert _one_line(exc).startswith("latency run was killed by SIGSEGV"), str(exc.value)
    assert child_exit.explain_exit(0, "x") is None and child_exit.explain_exit(1, "x") is None
    assert (
        child_exit.explain_exit(-9, "the quantizer", "last words") == "the quantizer was killed by SIGKILL (last words)"
    )


def test_sigill_advice_fits_the_cpu(monkeypatch, tmp_path):
    """A CPU without AVX2 gets the native build; one whose flags cannot be read, the portable one."""
    monkeypatch.setattr(cpu, "_is_x86", lambda: True)
    monkeypatch.setattr(child_exit, "cpu_flags", lambda: frozenset({"sse4_2", "avx"}))
    msg = child_exit.explain_exit(-4, "probe")
    assert "too old for the portable build (missing: avx2, fma, f16c, bmi2)" in msg, msg
    assert msg.endswith(cpu.reinstall_command(cpu.NATIVE_CMAKE_ARGS)) and "GGML_NATIVE=ON" in msg, msg
    monkeypatch.setattr(child_exit, "cpu_flags", lambda: frozenset())
    msg = child_exit.explain_exit(-4, "probe")
    assert "(CPU flags: unknown)" in msg and msg.endswith(cpu.reinstall_command()), msg
    msg = child_exit.explain_exit(-4, "latency run", llama_cpp=False)
    assert "the runtime ran an instruction" in msg and "reinstall" not in msg, msg

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse4_2 avx avx2 amx_tile\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu.cpu_flags(info) == {"fpu", "sse4_2", "avx", "avx2", "amx_tile"}
    assert cpu.cpu_flags(tmp_path / "missing") == frozenset()
    assert cpu.missing_portable(frozenset({"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2"})) == []


def test_the_llama_cpp_workers_are_the_targets():
    """run_child's preflight list names the GGUF target's worker and not the ONNX one."""
    from mka_edge.targets import get_target

    assert get_target("gguf").validation.worker in runtime_check.LLAMA_CPP_WORKERS
    assert get_target("onnx").validation.worker not in runtime_check.LLAMA_CPP_WORKERS


def test_preflight_passes_here_and_is_cached(fresh, monkeypatch):
    runtime_check.check_llama_cpp()
    entry = runtime_check.entry_path()
    assert entry.is_file() and entry.parent == fresh / "runtime_check", entry
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # nothing half-written beside it

    def no_child(*a, **kw):
        raise AssertionError("the preflight ran a child although its success is cached")

    monkeypatch.setattr(runtime_check.subprocess, "run", no_child)
    monkeypatch.setattr(runtime_check, "_passed", False)
    runtime_check.check_llama_cpp()  # a new process: the disk entry
    entry.unlink()
    runtime_check.check_llama_cpp()  # the same process: the module flag


def test_preflight_killed_by_sigill_raises_and_caches_nothing(fresh, monkeypatch):
    monkeypatch.setattr(runtime_check, "worker_command", lambda folder: [sys.executable, "-c", DIE_BY.format("SIGILL")])
    with pytest.raises(UserError) as exc:
        runtime_check.check_llama_cpp()
    msg = _one_line(exc)
    assert msg.startswith(f"{runtime_check.WHAT} was killed by SIGILL: llama.cpp ran an instruction"), msg
    assert msg.endswith(cpu.fitting_reinstall(cpu.cpu_flags())[1]), msg
    assert not runtime_check.entry_path().exists() and not runtime_check._passed
    assert not (fresh / "runtime_check").exists() or not any((fresh / "runtime_check").iterdir())


def test_preflight_names_bindings_that_cannot_load(fresh, tmp_path, monkeypatch):
    """The real worker, with a llama_cpp package whose library is missing, exits with its reason."""
    fake = tmp_path / "site" / "llama_cpp"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise OSError('libllama.so: cannot open shared object file')\n")
    monkeypatch.setenv("PYTHONPATH", str(fake.parent))
    with pytest.raises(UserError) as exc:
        runtime_check.check_llama_cpp()
    msg = _one_line(exc)
    assert msg == (
        "llama.cpp's bindings cannot load (OSError: libllama.so: cannot open shared object file); "
        f"reinstall: {cpu.reinstall_command()}"
    ), msg
    assert not runtime_check.entry_path().exists()


def test_the_cli_prints_the_sigill_line_once(tmp_path, tiny_dir):
    """Through the CLI: `plan` reaches llama.cpp's dry run, the preflight's child dies by SIGILL, and
    the user sees that one line and a non-zero exit, no traceback."""
    code = (
        "import sys; import mka_edge.runtime_check as rc; "
        f"rc.worker_command = lambda folder: [sys.executable, '-c', {DIE_BY.format('SIGILL')!r}]; "
        "from mka_edge.cli import main; sys.argv = ['mka-edge'] + sys.argv[1:]; main()"
    )
    args = ["plan", "--model", str(tiny_dir), "--profile", "raspberry-pi-zero-2w", "--context", "256"]
    env = dict(os.environ, MKA_EDGE_CACHE=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=600)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    sigill = [line for line in lines if "killed by SIGILL" in line]
    assert len(sigill) == 1 and sigill[0].startswith("error: "), r.stderr[-2000:]
    assert "--no-cache-dir --force-reinstall" in sigill[0]


# AMX tile instructions and AVX-512 (zmm registers, opmask registers, the upper 16 xmm/ymm registers
# and embedded broadcasts exist only with EVEX encoding), in objdump's AT&T syntax
AMX = re.compile(
    r"\b(tileloadd|tileloaddt1|tilestored|tdpbssd|tdpbsud|tdpbusd|tdpbuud|tdpbf16ps|ldtilecfg|sttilecfg"
    r"|tilezero|tilerelease)\b"
)
AVX512 = re.compile(r"%zmm\d|%k[0-7]\b|%[xy]mm(1[6-9]|2\d|3[01])\b|\{1to\d+\}")


def _ggml_cpu_libraries() -> list[Path]:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llama_cpp is not installed")
    lib = Path(next(iter(spec.submodule_search_locations))) / "lib"
    names = sorted(p for p in lib.glob("*ggml-cpu*") if ".so" in p.name or p.suffix == ".dylib")
    print(f"llama.cpp CPU backend libraries in {lib}: {[p.name for p in names]}")
    assert names, f"no libggml-cpu in {lib}: {sorted(p.name for p in lib.iterdir())}"
    # a wheel holds no symlinks: libggml-cpu.so, .so.0 and .so.0.25.3 are copies of one file
    by_content = {hashlib.sha256(p.read_bytes()).hexdigest(): p for p in reversed(names)}
    return sorted(by_content.values())


def test_installed_llama_cpp_has_no_amx_or_avx512():
    """The installed build is the portable one: its CPU backend holds no AMX and no AVX-512 code
    (llama.cpp picks kernels at compile time here: without GGML_BACKEND_DL there is one CPU backend
    and no runtime dispatch to other variants)."""
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) not found: cannot inspect the llama.cpp library")
    for path in _ggml_cpu_libraries():
        proc = subprocess.Popen([objdump, "-d", "--no-show-raw-insn", str(path)], stdout=subprocess.PIPE, text=True)
        amx, avx512 = [], []
        for line in proc.stdout:
            if AMX.search(line):
                amx.append(line.strip())
            elif AVX512.search(line):
                avx512.append(line.strip())
        assert proc.wait() == 0, f"objdump failed on {path}"
        assert not amx and not avx512, (
            f"{path.name} holds {len(amx)} AMX and {len(avx512)} AVX-512 instructions (first: {(amx + avx512)[0]!r}): "
            f"llama-cpp-python was not built portably; reinstall: {cpu.reinstall_command()}"
        )
