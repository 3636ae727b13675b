"""Predicted generation tokens/s on a device from its memory bandwidth.

Decoding one token reads every weight once (the tied embedding included, as the output
projection) plus the KV cache so far, so tokens/s ~ efficiency x bandwidth / bytes per token.
The efficiency is calibrated on this host, per runtime: measured tokens/s x bytes per token / the host's
measured copy bandwidth.  Device figures are predictions from the device's published peak
bandwidth and are labelled so; host figures are never passed off as device figures.
"""

from __future__ import annotations

import json
import platform
import time

import numpy as np

from ..cache import atomic_write_text, cache_root
from .cost_models import cost_model

DEFAULT_EFFICIENCY = 0.5  # used until a host measurement exists


def host_bandwidth_gbps(mb: int = 64, repeats: int = 5) -> float:
    """Sustained copy bandwidth of this host (read + write bytes / time), numpy, best of N.
    64 MB buffers are past any CPU cache and cost 128 MB, not the half GB that 256 MB ones put
    at the plan's memory peak."""
    a = np.ones(mb * 2**20 // 8, dtype=np.float64)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.nbytes / best / 1e9


def bytes_per_token(weight_bytes: float, kv_bytes_full: float, tied: bool, embd_bytes: float = 0.0) -> float:
    """Weights read once per token (an untied embedding is only gathered) + half the full KV cache
    (the average over a generation that fills the context)."""
    return weight_bytes - (0.0 if tied else embd_bytes) + 0.5 * kv_bytes_full


def _calibration_file(target: str):
    return cache_root() / cost_model(target).speed_calibration_file


def calibrate(measured_tps: float, bytes_tok: float, target: str, host_gbps: float | None = None) -> dict:
    host_gbps = host_gbps or host_bandwidth_gbps()
    eff = measured_tps * bytes_tok / (host_gbps * 1e9)
    rec = {
        "efficiency": eff,
        "host_copy_gbps": host_gbps,
        "measured_tps": measured_tps,
        "bytes_per_token": bytes_tok,
        "host": platform.node(),
        "time": time.time(),
    }
    atomic_write_text(_calibration_file(target), json.dumps(rec))
    return rec


def efficiency(target: str) -> tuple[float, str]:
    """Per target: llama.cpp and onnxruntime use the same bandwidth very differently."""
    path = _calibration_file(target)
    if path.is_file():
        rec = json.loads(path.read_text())
        return float(rec["efficiency"]), f"calibrated on this host ({rec['measured_tps']:.1f} tok/s measured)"
    return DEFAULT_EFFICIENCY, "default (no host measurement yet)"


def predict_tps(bandwidth_gbps: float, bytes_tok: float, eff: float) -> float:
    return eff * bandwidth_gbps * 1e9 / bytes_tok
