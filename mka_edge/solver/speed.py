"""Predicted generation tokens/s on a device from its memory bandwidth.

Decoding one token reads every weight once (the tied embedding included, as the output
projection) plus the KV cache so far, so tokens/s ~ efficiency x bandwidth / bytes per token.
The efficiency is calibrated on this host, per runtime and per model: measured tokens/s x bytes
per token / the host's measured copy bandwidth.  Per model, because a small model spends more of a
token on fixed overheads than a large one (one file per target holds a record per model
fingerprint).  A model not calibrated here (one too large to probe) gets a labelled conservative
prior: the lowest efficiency calibrated on this host, never above ``DEFAULT_EFFICIENCY``.  Device
figures are predictions from the device's published peak bandwidth and are labelled so; host
figures are never passed off as device figures.
"""

from __future__ import annotations

import json
import platform
import time

import numpy as np

from ..cache import atomic_write_text, cache_root, entry_lock
from ..records import Efficiency
from .cost_models import cost_model

# The prior's ceiling: below every efficiency measured so far (llama.cpp on 2-core hosts, SmolLM2 and
# Qwen2.5-1.5B-shaped models: 0.54-0.61, docs/results.md), so a prior never promises more speed
DEFAULT_EFFICIENCY = 0.5


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


def _records(target: str) -> dict[str, dict]:
    """The calibrations on this host for ``target``, by model fingerprint (a file from before the
    per-model records holds one flat record: its model is unknown, so it only bounds the prior)."""
    path = _calibration_file(target)
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return data.get("models", {}) if "models" in data else {"(unknown model)": data}


def calibrate(
    measured_tps: float, bytes_tok: float, target: str, model: str, host_gbps: float | None = None
) -> Efficiency:
    """``model``'s decode efficiency on this host for ``target``, from one measured decode speed;
    recorded beside other models' (later plans, and the bound before a model loads, read it)."""
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
    path = _calibration_file(target)
    with entry_lock(path, "the host's speed calibrations"):  # read, add, write: one writer at a time
        records = {k: v for k, v in _records(target).items() if k != "(unknown model)"}
        records[model] = rec
        atomic_write_text(path, json.dumps({"models": records}, indent=1))
    return _as_efficiency(rec)


def _as_efficiency(rec: dict) -> Efficiency:
    return Efficiency(
        float(rec["efficiency"]), f"calibrated on this host for this model ({rec['measured_tps']:.1f} tok/s measured)"
    )


def calibrated(target: str, model: str) -> bool:
    """Whether ``model``'s decode speed has been measured on this host for ``target``."""
    return model in _records(target)


def efficiency(target: str, model: str | None) -> Efficiency:
    """Per target (llama.cpp and onnxruntime use the same bandwidth very differently) and per model:
    the model's own calibration, else the labelled conservative prior (module docstring).
    ``model`` None (a check before the model loads, whose fingerprint is not known yet): the
    highest efficiency it could have, so that a refusal made from it stays sound."""
    records = _records(target)
    if model is None:
        top = max([DEFAULT_EFFICIENCY, *(float(r["efficiency"]) for r in records.values())])
        return Efficiency(top, "upper bound before the model loads: the highest calibration on this host")
    if model in records:
        return _as_efficiency(records[model])
    if records:
        low = min(float(r["efficiency"]) for r in records.values())
        return Efficiency(
            min(low, DEFAULT_EFFICIENCY),
            (
                f"conservative prior: this model's decode not measured here; the lowest of {len(records)} "
                f"calibration(s) on this host, at most {DEFAULT_EFFICIENCY}"
            ),
        )
    return Efficiency(DEFAULT_EFFICIENCY, "conservative prior: no decode measured on this host yet")


def predict_tps(bandwidth_gbps: float, bytes_tok: float, eff: float) -> float:
    return eff * bandwidth_gbps * 1e9 / bytes_tok
