"""Pass/fail rules: each threshold comes from the command line, else from the profile, else is off."""

from __future__ import annotations

from dataclasses import dataclass

from .result import Check


@dataclass
class Thresholds:
    max_kld: float | None = None  # mean KL(reference || artifact), nats
    min_tokens_per_s: float | None = None  # generation tokens/s on this host

    def as_dict(self) -> dict:
        return {"max_kld": self.max_kld, "min_tokens_per_s": self.min_tokens_per_s}


def evaluate(th: Thresholds, kl: float | None, gen_tps: float | None) -> tuple[Check, ...]:
    """The checks ``th`` sets, against the measured KL and host decode speed (an unset threshold
    or an unmeasured value adds none)."""
    checks = []
    if th.max_kld is not None and kl is not None:
        checks.append(Check("mean KL <= max_kld", kl, th.max_kld, kl <= th.max_kld))
    if th.min_tokens_per_s is not None and gen_tps is not None:
        checks.append(
            Check(
                "generation tokens/s (host) >= min_tokens_per_s",
                gen_tps,
                th.min_tokens_per_s,
                gen_tps >= th.min_tokens_per_s,
            )
        )
    return tuple(checks)
