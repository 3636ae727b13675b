"""Profile schema: shipped profiles load; a user's file with a bad field is named in the error."""

from __future__ import annotations

import pytest

from mka_edge.errors import UserError
from mka_edge.profiles import known_profiles, load_profile


def test_shipped_profiles_load():
    names = known_profiles()
    assert "laptop-8gb" in names
    for n in names:
        p = load_profile(n)
        assert p.budget_mb > 0 and p.format in ("gguf", "onnx") and p.max_quality_loss > 0


def test_unknown_profile_lists_known_ones():
    with pytest.raises(UserError, match="unknown profile 'toaster'.*laptop-8gb"):
        load_profile("toaster")


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"memory_mb": "lots"}, "field 'memory_mb' must be a positive integer"),
        ({"runtime": "tflite"}, "field 'runtime' must be one of"),
        ({"reserve_mb": 9000}, "field 'reserve_mb'"),
        ({"kv_cache_type": "f8"}, "field 'kv_cache_type'"),
        ({"colour": "red"}, "unknown field(s) colour"),
    ],
)
def test_bad_user_profile_names_file_and_field(tmp_path, change, needle):
    import yaml

    data = yaml.safe_load(open(load_profile("laptop-8gb").path))
    data.update(change)
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError) as exc:
        load_profile(str(path))
    assert str(path) in str(exc.value) and needle in str(exc.value)


def test_missing_field(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: x\nmemory_mb: 1000\n")
    with pytest.raises(UserError, match="missing field 'reserve_mb'"):
        load_profile(str(path))
