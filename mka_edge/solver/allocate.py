"""Per-tensor bit allocation under a byte budget (issue 25): each tensor takes one of its options
(a ggml type, its exact bytes, its predicted KL), the sum of bytes at most the budget, the sum of
predicted KL least.

A multiple-choice knapsack.  The field's tools relax it (llama.cpp PR #15550's ``--target-bpw``
uses a Lagrangian price per byte, mlx-lm's ``dynamic_quant`` a greedy pass); both can miss the
optimum by a whole upgrade, because a price picks the best KL saved *per byte* and a budget can
leave room for the larger upgrade only.  A model has a few hundred tensors and a handful of
types, so this module solves it exactly up to a byte resolution instead: dynamic programming over
the budget in ``RESOLUTION`` steps, each tensor's bytes rounded up to a step (so the choice always
fits), then a greedy pass spends what the rounding left.  Options off a tensor's lower convex
hull are kept: unlike a price, the program can use them.

Pure arithmetic, no I/O: the options come from ``tensor_sensitivity`` (errors calibrated against
llama.cpp KL measurements) and the bytes from the quantizer's own tensor sizes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Option:
    """One type for one tensor: what it costs in bytes and in predicted KL (nats)."""

    type: str
    bytes: int
    kl: float


@dataclass(frozen=True)
class Allocation:
    """The chosen type of every tensor, and the totals the choice is judged by."""

    types: dict[str, str]
    bytes: int
    kl: float

    def counts(self) -> dict[str, int]:
        """How many tensors take each type, most first ("34 at Q6_K, 12 at Q3_K, ...")."""
        out: dict[str, int] = {}
        for t in self.types.values():
            out[t] = out.get(t, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def summary(self) -> str:
        return ", ".join(f"{n} tensors at {t}" for t, n in self.counts().items())


RESOLUTION = 50_000  # budget steps: the rounding costs at most one step per tensor


def allocate(options: dict[str, list[Option]], budget_bytes: float) -> Allocation | None:
    """The least predicted KL with every tensor at one of its options and at most
    ``budget_bytes`` in all; None when even each tensor's smallest option does not fit."""
    return allocate_at(options, [budget_bytes])[0]


def allocate_at(options: dict[str, list[Option]], budgets: list[float]) -> list[Allocation | None]:
    """``allocate`` at several budgets from one dynamic program: its table holds the least KL
    within every budget up to the largest, so each further budget is only a walk back (a plan
    allocates once per edit set and reads off one budget per cache mode)."""
    import numpy as np

    if not options:
        return [Allocation({}, 0, 0.0) for _ in budgets]
    names = list(options)
    least = sum(min(o.bytes for o in options[n]) for n in names)
    top = max(budgets)
    if least > top:
        return [None for _ in budgets]
    unit = max(1, int(np.ceil(top / RESOLUTION)))
    cap = int(top // unit)
    best = np.zeros(cap + 1)  # least KL of the tensors so far within b units
    picks = []
    for n in names:
        new = np.full(cap + 1, np.inf)
        arg = np.full(cap + 1, -1, dtype=np.int16)
        for i, o in enumerate(options[n]):
            w = -(-o.bytes // unit)  # rounded up: a choice made in units fits in bytes
            if w > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[w:] = best[: cap + 1 - w] + o.kl
            better = cand < new
            new[better], arg[better] = cand[better], i
        best = new
        picks.append(arg)
    out: list[Allocation | None] = []
    for budget in budgets:
        if least > budget:
            out.append(None)
            continue
        b = int(budget // unit)
        if not np.isfinite(best[b]):  # the rounding left no room: the smallest options, then spend
            pick = {n: min(options[n], key=lambda o: (o.bytes, o.kl)) for n in names}
        else:
            pick = {}
            for n, arg in zip(reversed(names), reversed(picks)):
                o = options[n][int(arg[b])]
                pick[n] = o
                b -= -(-o.bytes // unit)
        pick = _spend({n: options[n] for n in names}, pick, budget)
        out.append(
            Allocation(
                {n: pick[n].type for n in names}, sum(o.bytes for o in pick.values()), sum(o.kl for o in pick.values())
            )
        )
    return out


def _spend(options: dict[str, list[Option]], pick: dict[str, Option], budget_bytes: float) -> dict[str, Option]:
    """Greedy upgrades, best KL saved per byte first, while they fit (what the rounding left)."""
    pick = dict(pick)
    left = budget_bytes - sum(o.bytes for o in pick.values())
    while True:
        best, best_rate = None, 0.0
        for name, opts in options.items():
            cur = pick[name]
            for o in opts:
                extra = o.bytes - cur.bytes
                if extra <= 0 or extra > left or o.kl >= cur.kl:
                    continue
                rate = (cur.kl - o.kl) / extra
                if rate > best_rate:
                    best, best_rate = (name, o), rate
        if best is None:
            return pick
        name, o = best
        left -= o.bytes - pick[name].bytes
        pick[name] = o
