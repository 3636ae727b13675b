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


# Every target's validation adapter, by name: (claims an artifact path?, what its artifacts are, the
# adapter when asked).  Filled by targets.base.register, read by validate_artifact: validation sits
# below the targets and does not import them.
_ADAPTERS: dict[str, tuple[Callable[[Path], bool], str, Callable[[], Format]]] = {}


def register_format(name: str, claims: Callable[[Path], bool], kind: str, adapter: Callable[[], Format]) -> None:
    _ADAPTERS[name] = (claims, kind, adapter)


def unregister_format(name: str) -> None:
    _ADAPTERS.pop(name, None)


def format_for_artifact(artifact: str | Path) -> Format:
    """The adapter of the target whose artifacts look like this path (suffix or folder layout)."""
    artifact = Path(artifact)
    for claims, _, adapter in _ADAPTERS.values():
        if claims(artifact):
            return adapter()
    if not artifact.exists():
        raise UserError(f"{artifact} does not exist")
    raise UserError(
        f"{artifact} is not an artifact of any known target ({'; '.join(k for _, k, _ in _ADAPTERS.values())}); "
        "give one of those"
    )
