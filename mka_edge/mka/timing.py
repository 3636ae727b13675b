"""Wall-clock accounting per phase, so the benchmark can report where merge time goes."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class PhaseTimer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    @contextmanager
    def phase(self, name: str, device: torch.device | None = None):
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if device is not None and device.type == "cuda":
                torch.cuda.synchronize(device)
            self.seconds[name] += time.perf_counter() - t0
            self.counts[name] += 1

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {k: {"seconds": round(v, 4), "calls": self.counts[k]} for k, v in self.seconds.items()}
