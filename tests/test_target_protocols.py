"""Target's public surface is four small protocols (issue 24 item 3): each method or constant
belongs to exactly one, and every registered target satisfies all four. No model runs."""

from __future__ import annotations

import typing

from mka_edge.target_protocols import PROTOCOLS
from mka_edge.targets import TARGETS, Target


def _members(proto) -> set[str]:
    own = set(vars(proto)) | set(vars(proto).get("__annotations__", {}))  # its own, not inherited
    return {m for m in own if not m.startswith("_")}


def test_the_protocols_partition_the_target_interface():
    public = {m for m in dir(Target) if not m.startswith("_")}
    public |= {m for m in typing.get_type_hints(Target) if not m.startswith("_")}
    seen: dict[str, str] = {}
    for proto in PROTOCOLS:
        for m in _members(proto):
            assert m not in seen, f"{m} is in {seen[m]} and {proto.__name__}"
            seen[m] = proto.__name__
    assert set(seen) == public, (sorted(public - set(seen)), sorted(set(seen) - public))


def test_every_registered_target_satisfies_every_protocol():
    assert TARGETS
    for t in TARGETS.values():
        for proto in PROTOCOLS:
            assert isinstance(t, proto), (t.name, proto.__name__)
