"""The quality bar, checked as soon as it can be: a build whose plan is predicted to miss the
profile's bar is refused before any merge, export or validation, with the figures of the best plan
and what would let it pass (issue 23).  Without it, the user learnt in the last minute of a
25-45 minute build ("no plan met the quality bar") what the plan knew in its first.

Two moments, one rule:

* a lower bound (``at_least``), before the merge curves are measured: every edit at zero KL (the
  most any merge can give) plus each type's measured KL, or its prior, or its precision-order
  bound.  Above 3B parameters the types' KL are priors, so this runs before any weight loads.
* the plan itself: its best candidate's predicted KL.

Pure functions over candidates; the caller decides whether the user asked to build anyway."""

from __future__ import annotations

import math

from ..errors import UserError
from .search import Candidate


def best_feasible(cands: list[Candidate]) -> Candidate | None:
    """The plan the solver would choose among ``cands``: fits memory and speed, least KL, then
    fewest removals (a bound's free merges tie on KL), then least memory."""
    ok = [c for c in cands if c.fits_memory and c.fits_speed]
    return min(ok, key=lambda c: (round(c.kl, 9), c.k, c.memory_mb)) if ok else None


def bar_missed_line(best: Candidate, bar: float, profile: str, *, at_least: bool, heals: bool) -> str:
    """The one line of a refused build: the best plan's figures, then every way to make it pass.
    A bound (``at_least``) names the weight type and the fewest removals it needs to fit, since
    its merges and cache are not measured yet."""
    needed = math.ceil(best.kl * 1.05 * 1000) / 1000  # the measured KL of a built file varies by a few %
    ways = [f"accept it with --max-quality-loss {needed:g}"]
    if not at_least and best.k > 0 and not heals:
        ways.append("heal the merged model (--heal-steps 200)")
    ways += ["choose a profile with a larger budget (or --budget-mb)", "use a smaller model"]
    if at_least:
        what = f"{best.quant}{'+imatrix' if best.imatrix else ''}" + (f" with K={best.k} removed" if best.k else "")
        head = (
            f"no plan that fits {profile} can meet the quality bar of {bar:g}: even with every merge free, "
            f"the best ({what}) is predicted to lose at least {best.kl:.3f} nats"
        )
    else:
        head = (
            f"the best plan that fits {profile} ({best.label}, {best.memory_mb:.0f} MB) is predicted to lose "
            f"{best.kl:.3f} nats, over the quality bar of {bar:g}"
        )
    return head + "; " + ", ".join(ways[:-1]) + f" or {ways[-1]}; --build-anyway builds it regardless"


def refuse_if_bar_missed(
    cands: list[Candidate], bar: float, profile: str, *, at_least: bool, heals: bool = False
) -> None:
    """Raise the one-line refusal when no feasible candidate is predicted within ``bar`` (nothing
    feasible at all is search.choose's refusal, not this one)."""
    best = best_feasible(cands)
    if best is not None and best.kl > bar:
        raise UserError(bar_missed_line(best, bar, profile, at_least=at_least, heals=heals))
