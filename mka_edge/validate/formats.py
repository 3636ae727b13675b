"""The validation adapter a target provides (``Format``) and the checks every adapter shares.
Each target's own adapter lives in its module (mka_edge/targets/)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..versions import dist_version as _installed


def dist_version(dist: str) -> str:
    return _installed(dist) or "unknown"


def compare_tokens(ours: list[str], lm, n: int) -> None:
    theirs = lm.tokenizer.convert_ids_to_tokens(list(range(n)))
    bad = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if b is not None and a != b), None)
    if bad is not None:
        raise UserError(
            f"artifact token {bad} is {ours[bad]!r} but the reference's is {theirs[bad]!r}: "
            f"different vocabularies; validate against the model the artifact was made from (--reference)"
        )


def check_count(n_vocab: int | None, lm) -> int:
    ref_n = int(lm.model.config.vocab_size)
    if n_vocab is not None and int(n_vocab) != ref_n:
        raise UserError(
            f"artifact vocabulary ({n_vocab} tokens) differs from the reference's ({ref_n}); "
            f"validate against the model the artifact was made from (--reference)"
        )
    return min(ref_n, 4096)


@dataclass(frozen=True)
class Format:
    name: str
    worker: str
    runtime_name: str
    runtime_version: Callable[[], str]
    inspect: Callable[[Path], dict]
    check_vocab: Callable[[Path, dict, object], None]
    cache_mode: Callable[[str | None, str | None, dict], str]  # (KV type, flash attention, info) -> what runs
    artifact_rows: Callable[[dict], list]
    default_out: Callable[[Path], Path]
