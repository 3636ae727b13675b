"""Merge trajectories, cached by content hash.

An iterative merge to K_max passes through every smaller K, so it runs once per (model,
calibration, settings, method, alpha rule) and every later command (merge, benchmark, solver)
reads the K it needs from the cache. Snapshots are compositions, a few bytes per layer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from .. import __version__
from ..cache import atomic_write_text, cache_root, entry_lock, stable_hash
from ..killpoints import killpoint
from .context import MergeContext
from .method_table import AUTO_POOL, by_bytes, uses_alpha
from .methods import METHODS

ALGO_VERSION = 2  # bump when a method's decisions change, to invalidate cached trajectories


class _Clock:
    """Progress bar proxy that also notes when each step finished."""

    def __init__(self, bar, t0: float) -> None:
        self.bar, self.t0, self.times = bar, t0, []

    def update(self, n: int = 1) -> None:
        self.times.append(time.perf_counter() - self.t0)
        self.bar.update(n)


def _key(ctx: MergeContext, method: str, alpha: str) -> str:
    key = {
        "model": ctx.lm.fingerprint,
        "settings": ctx.settings.key(),
        "method": method,
        "alpha": alpha if uses_alpha(method) else None,
        "algo": ALGO_VERSION,
        "device": ctx.device.type,
        "dtype": str(ctx.model.dtype),
    }
    if by_bytes(method):  # only these read it (so the other methods' keys, and caches, are unchanged)
        key["ref_context"] = ctx.settings.ref_context
    return stable_hash(key)


def _decode(steps: list[dict]) -> list[dict]:
    for s in steps:
        s["composition"] = [{int(i): w for i, w in c.items()} for c in s["composition"]]
    return steps


def trajectory(
    ctx: MergeContext,
    method: str,
    k_max: int,
    alpha: str = "calibrated",
    use_cache: bool = True,
    progress: bool = True,
    enough: Callable[[dict], bool] | None = None,
) -> dict:
    """{'method', 'alpha', 'steps': [...], 'seconds', 'cached'} reaching ``k_max``, or fewer steps
    when ``enough(step)`` (asked after each step, cached ones included) says no more are needed:
    the run stops there, so nothing beyond is computed.  The cache keeps the longest run made."""
    if method == "auto":
        return _auto(ctx, k_max, alpha, use_cache, progress)
    path = cache_root() / "trajectories" / f"{method}-{_key(ctx, method, alpha)}.json"
    hit = _from_cache(path, k_max, enough) if use_cache else None
    if hit is not None:
        return hit
    with entry_lock(path, f"the {method} trajectory"):
        hit = _from_cache(path, k_max, enough) if use_cache else None  # made while this one waited?
        if hit is not None:
            return hit
        cached = _decode(json.loads(path.read_text())["steps"]) if use_cache and path.is_file() else []
        return _run(ctx, method, k_max, alpha, progress, enough, path, cached)


def _from_cache(path: Path, k_max: int, enough) -> dict | None:
    """The cached run when it reaches k_max (or ``enough``), else None."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    cached = _decode(data["steps"])
    stop = next((i + 1 for i, st in enumerate(cached[:k_max]) if enough and enough(st)), None)
    if stop or len(cached) >= k_max:
        data["steps"] = cached[: stop or k_max]
        data["cached"] = True
        return data
    return None


def _run(ctx, method, k_max, alpha, progress, enough, path: Path, cached: list) -> dict:
    t0 = time.perf_counter()
    steps: list[dict] = []
    unit = "unit" if by_bytes(method) else "layer"
    with tqdm(total=k_max, desc=f"merge {method}", disable=not progress, unit=unit) as bar:
        clock = _Clock(bar, t0)
        run = METHODS[method](ctx, k_max, alpha, clock)
        for step in run:
            steps.append(step)
            killpoint(f"trajectory:step-{len(steps)}")
            if enough is not None and enough(step):
                break
        run.close()
    for step, t in zip(steps, clock.times):
        step["elapsed_s"] = round(t, 3)  # wall time from the start of the trajectory to this K
    ctx.reset()  # also gives back the attention of the layers a run took it from
    data = {
        "method": method,
        "alpha": alpha,
        "steps": steps,
        "seconds": round(time.perf_counter() - t0, 3),
        "mka_edge": __version__,
        "cached": False,
    }
    if len(steps) > len(cached):
        atomic_write_text(path, json.dumps(data))
    return data


def _auto(ctx: MergeContext, k_max: int, alpha: str, use_cache: bool, progress: bool) -> dict:
    """Per K, the plan with the least calibration KL among the methods in AUTO_POOL."""
    runs = {m: trajectory(ctx, m, k_max, alpha, use_cache, progress) for m in AUTO_POOL}
    steps = []
    for k in range(1, k_max + 1):
        options = {m: r["steps"][k - 1] for m, r in runs.items()}
        best = min(options, key=lambda m: options[m]["calib_kl"])
        step = dict(options[best])
        step["chosen_from"] = {m: round(o["calib_kl"], 6) for m, o in options.items()}
        step["method"] = best
        steps.append(step)
    return {
        "method": "auto",
        "alpha": alpha,
        "steps": steps,
        "seconds": round(sum(r["seconds"] for r in runs.values()), 3),
        "cached": all(r["cached"] for r in runs.values()),
    }
