"""Pass/fail rules: each threshold comes from the command line, else from the profile, else is off."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Thresholds:
    max_kld: float | None = None  # mean KL(reference || artifact), nats
    min_tokens_per_s: float | None = None  # generation tokens/s on this host

    def as_dict(self) -> dict:
        return {"max_kld": self.max_kld, "min_tokens_per_s": self.min_tokens_per_s}


def evaluate(th: Thresholds, kl: float | None, gen_tps: float | None) -> list[dict]:
    checks = []
    if th.max_kld is not None and kl is not None:
        checks.append({"check": "mean KL <= max_kld", "value": kl, "limit": th.max_kld, "passed": kl <= th.max_kld})
    if th.min_tokens_per_s is not None and gen_tps is not None:
        checks.append(
            {
                "check": "generation tokens/s (host) >= min_tokens_per_s",
                "value": gen_tps,
                "limit": th.min_tokens_per_s,
                "passed": gen_tps >= th.min_tokens_per_s,
            }
        )
    return checks
