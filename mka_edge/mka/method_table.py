"""The merge methods as data: one row per method, read by the CLI's choices and help, the
trajectory cache key (does alpha change the result?) and ``auto``'s pool.  Kept free of torch so
the CLI can build its options without loading it; ``methods.METHODS`` maps each name to its
function and checks at import that both tables name the same methods.  Adding a method: a row here
and a generator in ``methods.py``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodRow:
    name: str
    uses_alpha: bool  # fuses layers, so the alpha rule changes its result (and cache key)
    in_auto: bool  # one of the methods `auto` picks from, per K, by calibration KL
    summary: str
    # chooses by calibration KL per reference byte saved; its steps are removal units (an attention
    # sub-block or a layer), not layers, and the reference context is part of its cache keys
    by_bytes: bool = False


# the method whose steps remove attention sub-blocks as well as layers: the plan's attention curve
ATTENTION_METHOD = "sleb-attn"

# auto's pool is taken in this order (ties in calibration KL go to the first)
TABLE: tuple[MethodRow, ...] = (
    MethodRow("mka-guided", True, True, "protected first/last layer, loss-guided choice among the most similar pairs"),
    MethodRow(
        "sleb",
        False,
        False,
        "exhaustive greedy removal: every layer scored on calibration KL, the least-cost one removed",
    ),
    MethodRow(
        "sleb-fast",
        False,
        True,
        "sleb at a fraction of the cost: the least block-influence third of the layers screened on the first "
        "quarter of every calibration sequence, the best 3 confirmed on sleb's full loss",
    ),
    MethodRow(
        "sleb-attn",
        False,
        False,
        "greedy removal of attention sub-blocks or whole layers (--k counts these units), the least calibration "
        "KL per byte saved (F16 weights + f16 KV cache at the reference context) first; sleb-fast's screen "
        "and confirmation",
        by_bytes=True,
    ),
    MethodRow("shortgpt", False, True, "remove the K layers of lowest Block Influence"),
    MethodRow("angular", False, True, "cut the block of K layers of least angular distance (Gromov et al.)"),
    MethodRow("drop-last", False, True, "remove the last K layers"),
    MethodRow("mka", True, False, "the literal paper method: iterative, most similar adjacent pair, alpha rule"),
    MethodRow("mka-oneshot", True, False, "similarity once; the K most similar pairs fused in order"),
)
ROWS = {row.name: row for row in TABLE}
AUTO_POOL = tuple(row.name for row in TABLE if row.in_auto)
ALL_METHODS = ("auto",) + tuple(ROWS)


def uses_alpha(method: str) -> bool:
    return ROWS[method].uses_alpha if method in ROWS else False


def by_bytes(method: str) -> bool:
    """Whether ``method`` removes units chosen by KL per reference byte (its K counts units)."""
    return ROWS[method].by_bytes if method in ROWS else False
