"""What a validation returns: typed records for its checks and its result.

The runtime's own measurements (``accuracy`` and ``latency``: what the worker reported, plus the
MMLU interval) stay the mappings ``validation.json`` has always written; the record types what
its callers decide on (passed, which check failed, the KL and decode speed) so that a build, the
``validate`` command and the report read fields, not keys.  ``to_json`` is ``validation.json``,
key for key as before this record existed; ``result[key]`` reads that view, for scripts and
benches written against the file's keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Check:
    """One threshold against one measured value."""

    check: str
    value: float
    limit: float
    passed: bool

    def as_dict(self) -> dict:
        return {"check": self.check, "value": self.value, "limit": self.limit, "passed": self.passed}

    def line(self) -> str:
        return f"{self.check}: {self.value:.4g} vs {self.limit:.4g}"


@dataclass(frozen=True)
class ValidationResult:
    """One artifact run in its runtime against its reference (``validate.core.validate_artifact``)."""

    version: str  # mka-edge's, as "mka_edge" in the file
    format: str
    artifact: dict
    reference: dict
    runtime: dict
    host: dict
    accuracy: dict
    latency: dict
    profile: str | None
    thresholds: dict
    checks: tuple[Check, ...]
    out: Path | None = None

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def kl(self) -> float:
        """Mean KL(reference || artifact) on the held-out text, nats."""
        return float(self.accuracy["kl"])

    @property
    def gen_tps(self) -> float:
        """Median generation tokens/s on this host."""
        return float(self.latency["gen_tps"]["median"])

    def failures(self) -> str:
        """The failed checks in one line ("" when all passed)."""
        return "; ".join(c.line() for c in self.checks if not c.passed)

    def to_json(self) -> dict:
        d = {
            "mka_edge": self.version,
            "format": self.format,
            "artifact": self.artifact,
            "reference": self.reference,
            "runtime": self.runtime,
            "host": self.host,
            "accuracy": self.accuracy,
            "latency": self.latency,
            "profile": self.profile,
            "thresholds": self.thresholds,
            "checks": [c.as_dict() for c in self.checks],
            "passed": self.passed,
        }
        return d | ({"out": str(self.out)} if self.out is not None else {})

    def __getitem__(self, key: str) -> Any:
        return self.to_json()[key]
