"""Property-based fuzzing of the files users write: profiles, recipes and calibration text.  No
input may make a loader raise anything but the project's one error type (a one-line message
naming the file), whatever the YAML, the bytes or the JSONL hold."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mka_edge.calibration import load_texts
from mka_edge.errors import UserError
from mka_edge.models.recipes import load_recipe_file
from mka_edge.profiles import load_profile

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
values = st.recursive(
    scalars,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids, max_size=3),
    max_leaves=8,
)
PROFILE_FIELDS = [
    "name", "description", "memory_mb", "reserve_mb", "bandwidth_gbps", "runtime", "context_length", "threads",
    "min_tokens_per_s", "max_quality_loss", "kv_cache_type", "flash_attention", "heal_steps", "unified_memory",
]  # fmt: skip
GOOD_PROFILE = {
    "name": "x",
    "memory_mb": 8192,
    "reserve_mb": 4096,
    "bandwidth_gbps": 51.2,
    "runtime": "llama.cpp",
    "context_length": 4096,
    "threads": 4,
    "min_tokens_per_s": 10,
    "max_quality_loss": 0.5,
}


def _only_user_errors(load, path: Path) -> None:
    try:
        load(path)
    except UserError as exc:
        assert "\n" not in str(exc) and str(exc)
    # anything else propagates and fails the test with the input hypothesis found


@FUZZ
@given(st.dictionaries(st.sampled_from(PROFILE_FIELDS), values, max_size=len(PROFILE_FIELDS)))
def test_profile_loader_raises_only_user_errors_on_any_fields(tmp_path, fields):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({**GOOD_PROFILE, **fields}))
    _only_user_errors(load_profile, path)


@FUZZ
@given(st.binary(max_size=300) | st.text(alphabet=string.printable + "&*!|>{}[]", max_size=300).map(str.encode))
def test_profile_loader_raises_only_user_errors_on_any_bytes(tmp_path, raw):
    path = tmp_path / "p.yaml"
    path.write_bytes(raw)
    _only_user_errors(load_profile, path)


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(["name", "source", "architecture", "calibration", "llama_cpp", "heal"]), values, max_size=6
    ),
    st.dictionaries(st.sampled_from(["kind", "path", "hub_id", "distribution", "file"]), values, max_size=5),
)
def test_recipe_loader_raises_only_user_errors(tmp_path, fields, source):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**fields, "source": source}))
    _only_user_errors(load_recipe_file, path)
    path.write_bytes(yaml.safe_dump(fields).encode()[:40] + b"\xff\xfe{[")
    _only_user_errors(load_recipe_file, path)


@FUZZ
@given(st.binary(max_size=400), st.sampled_from(["c.txt", "c.jsonl", "c.jsonl.gz"]))
def test_calibration_loader_raises_only_user_errors_on_any_bytes(tmp_path, raw, name):
    path = tmp_path / name
    path.write_bytes(raw)
    _only_user_errors(load_texts, path)


@FUZZ
@given(st.lists(values, max_size=5))
def test_calibration_jsonl_without_text_is_a_user_error(tmp_path, rows):
    import json

    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    _only_user_errors(load_texts, path)


def test_hostile_yaml_is_refused_not_executed(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("!!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(UserError, match="cannot read profile"):
        load_profile(path)
    assert not Path("pwned").exists()
    bomb = "a: &a ['x','x','x','x','x','x','x','x','x']\n" + "".join(
        f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n" for p, c in zip("abcdefgh", "bcdefghi")
    )
    path.write_text(bomb)  # a billion laughs: safe_load shares the aliases; the schema refuses the fields
    with pytest.raises(UserError):
        load_profile(path)
