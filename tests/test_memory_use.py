"""The project's host-memory measure (mka_edge/memory_use.py): the kernel's peak of a stage, the
ratio to the float32 weights, and child processes reported beside the process, never added."""

from __future__ import annotations

import mmap
import subprocess
import sys

import numpy as np
import pytest

from mka_edge.memory_use import MemoryMeter, MemoryUse, rss_bytes

MB = 1_000_000
SIZE = 200 * MB
# a child that holds SIZE touched bytes (b"x" * n writes every page) for a while
HOLD = f"import time; b = b'x' * {SIZE}; time.sleep(0.5)"

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the measure reads /proc")


def _transient() -> None:
    """SIZE bytes made resident and freed: a mapping of its own, written page by page, so that the
    allocator cannot serve it from heap pages an earlier test left resident."""
    buf = mmap.mmap(-1, SIZE)
    a = np.frombuffer(buf, dtype=np.uint8)
    a[::4096] = 1  # touch every page
    assert int(a[::4096].sum()) == SIZE // 4096 + (SIZE % 4096 > 0)
    del a
    buf.close()


def test_peak_sees_a_transient_allocation():
    with MemoryMeter() as m:
        _transient()
    use = m.use
    assert use.source == "VmHWM"  # the kernel's mark, reset at entry: a spike between samples counts
    assert use.peak - use.baseline >= 0.9 * SIZE, use
    assert rss_bytes() < use.peak - 0.75 * SIZE, (rss_bytes(), use)  # freed: RSS at exit is back down


def test_peak_is_reset_per_stage():
    _transient()  # before the block: the process's high-water mark now includes it
    with MemoryMeter() as m:
        pass
    assert m.use.peak - m.use.baseline < 0.25 * SIZE, m.use


def test_ratio_is_peak_over_baseline_per_float32_bytes():
    base = rss_bytes()
    weights = 400 * MB
    with MemoryMeter(weights_f32=weights, baseline=base) as m:
        _transient()
    use = m.use
    assert use.baseline == base and use.weights_f32 == weights
    assert use.ratio == pytest.approx((use.peak - base) / weights)
    assert 0.45 <= use.ratio < 1.0, use  # 200 MB over 400 MB of weights, plus a little
    assert MemoryUse(1 * MB, 3 * MB, weights_f32=4 * MB).ratio == 0.5
    assert MemoryUse(1 * MB, 3 * MB).ratio is None  # no weights, no ratio


def test_child_memory_is_beside_the_peak_not_in_it():
    with MemoryMeter() as m:
        subprocess.run([sys.executable, "-c", HOLD], check=True, timeout=30)
    use = m.use
    assert use.children_peak >= 0.9 * SIZE, use
    assert use.peak - use.baseline < 0.25 * SIZE, use


def test_as_dict_fields():
    use = MemoryUse(500 * MB, 1_500 * MB, children_peak=250 * MB, weights_f32=2_000 * MB)
    assert use.as_dict() == {
        "baseline_gb": 0.5,
        "peak_gb": 1.5,
        "children_peak_gb": 0.25,
        "weights_f32_gb": 2.0,
        "ratio": 0.5,
        "source": "VmHWM",
    }
