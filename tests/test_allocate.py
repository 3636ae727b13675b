"""Issue 25: the per-tensor allocation under a byte budget (pure arithmetic, no model)."""

from __future__ import annotations

import itertools
import random

import pytest

from mka_edge.solver.allocate import Allocation, Option, allocate


def _brute(options, budget):
    names = list(options)
    best = None
    for combo in itertools.product(*(options[n] for n in names)):
        b = sum(o.bytes for o in combo)
        if b <= budget:
            kl = sum(o.kl for o in combo)
            if best is None or kl < best:
                best = kl
    return best


def _instance(rng, n_tensors=5):
    out = {}
    for i in range(n_tensors):
        size = rng.choice([100, 200, 400])
        sens = rng.uniform(0.1, 3.0)
        # bits 2..8: bytes ~ bits, KL ~ sens * 4^-bits (each bit quarters the squared error)
        out[f"t{i}"] = [Option(f"b{b}", size * b, sens * 4.0 ** (-b) + rng.uniform(0, 1e-4)) for b in range(2, 9)]
    return out


def test_allocation_fits_and_is_near_the_exhaustive_optimum():
    rng = random.Random(0)
    for _ in range(30):
        opts = _instance(rng)
        lo = sum(min(o.bytes for o in v) for v in opts.values())
        hi = sum(max(o.bytes for o in v) for v in opts.values())
        budget = rng.uniform(lo, hi)
        got = allocate(opts, budget)
        best = _brute(opts, budget)
        assert got.bytes <= budget
        assert got.kl == pytest.approx(sum(next(o.kl for o in opts[n] if o.type == t) for n, t in got.types.items()))
        assert got.kl == pytest.approx(best, rel=1e-9)  # exact at this resolution (bytes in whole steps)


def test_mixed_never_loses_to_the_best_uniform_type_that_fits():
    rng = random.Random(1)
    for _ in range(20):
        opts = _instance(rng, 8)
        types = [o.type for o in next(iter(opts.values()))]
        for t in types:
            uniform = [next(o for o in v if o.type == t) for v in opts.values()]
            budget = sum(o.bytes for o in uniform) + rng.uniform(0, 150)
            got = allocate(opts, budget)
            assert got.kl <= sum(o.kl for o in uniform) + 1e-12


def test_an_impossible_budget_is_none_and_a_generous_one_takes_the_best_of_each():
    opts = {"a": [Option("lo", 10, 1.0), Option("hi", 20, 0.1)], "b": [Option("lo", 10, 2.0), Option("hi", 30, 0.5)]}
    assert allocate(opts, 19) is None
    assert allocate(opts, 1000) == Allocation({"a": "hi", "b": "hi"}, 50, 0.6)
    # 10 more bytes on a buy 0.9 nats (the better rate), 20 more on b buy 1.5: a price per byte takes
    # a's upgrade and then has no room for b's; the exact program takes b's
    tight = allocate(opts, 40)
    assert tight.types == {"a": "lo", "b": "hi"} and tight.summary() == "1 tensors at lo, 1 tensors at hi"


def test_several_budgets_from_one_program_equal_one_program_each():
    rng = random.Random(2)
    from mka_edge.solver.allocate import allocate_at

    for _ in range(10):
        opts = _instance(rng, 6)
        lo = sum(min(o.bytes for o in v) for v in opts.values())
        hi = sum(max(o.bytes for o in v) for v in opts.values())
        budgets = sorted(rng.uniform(lo - 50, hi) for _ in range(4))
        many = allocate_at(opts, budgets)
        for b, got in zip(budgets, many):
            one = allocate(opts, b)
            if one is None:
                assert got is None
                continue
            assert got.bytes <= b
            assert got.kl == pytest.approx(_brute(opts, b), rel=1e-9)
