"""This CPU's instruction-set flags and the llama.cpp build that runs on it.

Why: llama-cpp-python compiles llama.cpp when it is installed.  A native build (GGML_NATIVE) uses
every instruction the build machine's CPU advertises, AMX and AVX-512 included, and a VM may
advertise those while its host refuses them: llama.cpp then dies by SIGILL in its first large
batch (issue 22).  The install therefore uses ``PORTABLE_CMAKE_ARGS`` (x86-64-v3); this module is
that string's one home (``tests/test_readme.py`` checks the README's and ``.ci/run``'s against it),
and it says which flags this CPU has, so an error can name them and the reinstall that fits.
"""

from __future__ import annotations

import platform
from pathlib import Path

from .versions import dist_version

# x86-64-v3: every x86-64 CPU with AVX2 (Intel Haswell, AMD Excavator and newer); no AVX-512, AMX or
# AVX-VNNI, which hosts (VMs) may advertise and refuse.  LLAVA_BUILD=OFF: the multimodal part is unused.
PORTABLE_CMAKE_ARGS = (
    "-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON "
    "-DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
)
# for a CPU older than the portable build: whatever this CPU itself has
NATIVE_CMAKE_ARGS = "-DLLAVA_BUILD=OFF -DGGML_NATIVE=ON"

# /proc/cpuinfo names of the instructions the portable build uses
PORTABLE_REQUIRES = ("sse4_2", "avx", "avx2", "fma", "f16c", "bmi2")
# the flags that decide which llama.cpp kernels a build may contain, as an error shows them
SHOWN_FLAGS = (
    "avx",
    "avx2",
    "fma",
    "f16c",
    "bmi2",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "avx_vnni",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The flags the kernel reports for the first CPU (``flags`` in /proc/cpuinfo); empty where
    that cannot be read (not Linux, a sandbox without /proc)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def flag_summary(flags: frozenset[str]) -> str:
    """``avx2 yes, avx512f no, ...`` over SHOWN_FLAGS, or ``unknown`` when no flags could be read."""
    if not flags:
        return "unknown"
    return ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in SHOWN_FLAGS)


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def missing_portable(flags: frozenset[str]) -> list[str]:
    """The flags the portable build needs that this CPU lacks; none where they cannot be known (no
    flags read) or do not apply (not x86: CMake ignores the x86 options there)."""
    if not flags or not _is_x86():
        return []
    return [f for f in PORTABLE_REQUIRES if f not in flags]


def reinstall_command(cmake_args: str = PORTABLE_CMAKE_ARGS) -> str:
    """The command that rebuilds the installed llama-cpp-python with ``cmake_args``.  --no-cache-dir:
    pip otherwise reuses the wheel it built before, for the other CPU."""
    version = dist_version("llama-cpp-python")
    pin = f"=={version}" if version else ""
    return f'CMAKE_ARGS="{cmake_args}" pip install --no-cache-dir --force-reinstall --no-deps llama-cpp-python{pin}'


def fitting_reinstall(flags: frozenset[str]) -> tuple[str, str]:
    """(how to say it, the reinstall command) for this CPU: the portable build, or, for a CPU too old
    for it, a native one."""
    missing = missing_portable(flags)
    if missing:
        return (
            f"this CPU is too old for the portable build (missing: {', '.join(missing)}): reinstall it natively",
            reinstall_command(NATIVE_CMAKE_ARGS),
        )
    return "reinstall it portably", reinstall_command(PORTABLE_CMAKE_ARGS)
