"""The project's one measure of host memory use, for benchmarks and tests.

    ratio = (peak RSS of the process - its RSS right after imports) / float32 weight bytes

Why this measure: the imports (torch, transformers, llama.cpp) cost a fixed ~0.5-1 GB that no
model-size choice changes, and float32 bytes are what the CPU path holds one copy of; a ratio
of 1.0 means "one float32 copy of the model and nothing else".  The process's peak comes from
the kernel (VmHWM, reset per stage through /proc/self/clear_refs), so no short spike is missed;
child processes (llama.cpp's quantizer and validation, the ONNX builder) are sampled every 50 ms
and their peak reported beside the process's, never added to it.  (Not the kernel's RUSAGE_CHILDREN
peak: a child's ru_maxrss counts the parent's pages it shared between fork and exec, so it read the
parent's own peak, 7.1 GB, for a 1B export whose quantizer child held far less.)
"""

from __future__ import annotations

import re
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import psutil

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def rss_bytes() -> int:
    """Resident set size of this process now."""
    return psutil.Process().memory_info().rss


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
HEAP_LIMIT = 4 * 2**20  # allocations from 4 MiB on get their own mapping


def bound_heap() -> None:
    """Make every allocation of 4 MiB or more (every tensor worth counting) a mapping of its own,
    returned to the OS when freed.  Why: glibc raises its mmap threshold after a large block is
    freed (up to 32 MiB), so later tensors land in the heap, and freed heap stays resident: the
    cold README build held ~1 GB that no live object used.  Setting the threshold turns that
    adjustment off.  A no-op where libc is not glibc."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, HEAP_LIMIT)
    except (OSError, AttributeError):
        pass


def release_freed_memory() -> None:
    """Hand memory that Python and torch have freed back to the OS before a stage that needs room:
    glibc keeps freed heap pages (and raises its mmap threshold after large frees, so later large
    tensors land in the heap too), which showed as RSS that no live object held."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _vm_hwm() -> int | None:
    try:
        return int(re.search(r"VmHWM:\s+(\d+)\s+kB", _STATUS.read_text()).group(1)) * 1024
    except (OSError, AttributeError):
        return None


def _reset_hwm() -> bool:
    """Set the kernel's peak-RSS mark to the current RSS (Linux >= 4.0); False where it cannot."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


@dataclass
class MemoryUse:
    """Peak host memory of one stage, and the ratio the project's bounds are stated in."""

    baseline: int  # RSS right after imports (or at the start of the stage)
    peak: int  # peak RSS of this process during the stage
    children_peak: int = 0  # the most the stage's child processes held at once (sampled, or the
    #                         kernel's peak of the largest child that ended in the stage)
    weights_f32: int = 0  # float32 bytes of the model's weights
    source: str = "VmHWM"  # or "sampled" where the kernel's mark cannot be reset

    @property
    def ratio(self) -> float | None:
        return (self.peak - self.baseline) / self.weights_f32 if self.weights_f32 else None

    def as_dict(self) -> dict:
        return {
            "baseline_gb": round(self.baseline / 1e9, 3),
            "peak_gb": round(self.peak / 1e9, 3),
            "children_peak_gb": round(self.children_peak / 1e9, 3),
            "weights_f32_gb": round(self.weights_f32 / 1e9, 3),
            "ratio": None if self.ratio is None else round(self.ratio, 3),
            "source": self.source,
        }


@dataclass
class MemoryMeter:
    """``with MemoryMeter(weights_f32, baseline) as m: ...; m.use`` — the peak of the block.

    ``baseline`` defaults to the RSS at entry; pass the RSS measured right after imports to get the
    project's ratio for a whole command."""

    weights_f32: int = 0
    baseline: int | None = None
    interval: float = 0.05
    where: bool = False  # note the main thread's mka_edge frames at the sampled peak (diagnosis)
    use: MemoryUse | None = None
    peak_at: list[str] = field(default_factory=list)
    growth: list[tuple[float, float, str]] = field(default_factory=list)  # (s, GB, frame) per +50 MB, with ``where``
    _stop: threading.Event = field(default_factory=threading.Event)
    _peaks: dict = field(default_factory=lambda: {"self": 0, "children": 0})

    def _frames(self) -> list[str]:
        frame = sys._current_frames().get(self._main)
        stack = traceback.extract_stack(frame) if frame is not None else []
        return [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in stack if "mka_edge" in f.filename][-6:]

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(self.interval):
            try:
                rss = me.memory_info().rss
                if rss > self._peaks["self"] and self.where:
                    self.peak_at = self._frames()
                    if not self.growth or rss > self.growth[-1][1] * 1e9 + 50e6:
                        frames = self.peak_at
                        self.growth.append(
                            (round(time.perf_counter() - self._t0, 1), rss / 1e9, frames[-1] if frames else "?")
                        )
                self._peaks["self"] = max(self._peaks["self"], rss)
                kids = 0
                for child in me.children(recursive=True):
                    try:
                        kids += child.memory_info().rss
                    except psutil.Error:
                        pass
                self._peaks["children"] = max(self._peaks["children"], kids)
            except psutil.Error:
                pass

    def __enter__(self) -> MemoryMeter:
        self._kernel = _reset_hwm() and _vm_hwm() is not None
        start = rss_bytes()
        self._base = start if self.baseline is None else self.baseline
        self._peaks["self"] = start
        self._main = threading.get_ident()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        peak = max(_vm_hwm() or 0, self._peaks["self"]) if self._kernel else self._peaks["self"]
        children = self._peaks["children"]
        self.use = MemoryUse(self._base, peak, children, self.weights_f32, "VmHWM" if self._kernel else "sampled")
