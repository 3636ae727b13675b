"""Model recipes: small YAML files naming where a model's weights come from and its defaults."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError
from ..merge_log import read_merge_log

DEFAULT_MODEL = "smollm2-135m"
_KINDS = ("pip-gguf", "hub", "hf-dir", "gguf")


def _recipe_dir() -> Path:
    return Path(str(resources.files("mka_edge._recipes")))


def known_recipes() -> list[str]:
    return sorted(p.stem for p in _recipe_dir().glob("*.yaml"))


def load_recipe_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"cannot read recipe {path}: {exc}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise UserError(f"recipe {path} is not a YAML mapping")
    src = data.get("source")
    if not isinstance(src, dict) or src.get("kind") not in _KINDS:
        raise UserError(f"recipe {path}: field 'source.kind' must be one of {', '.join(_KINDS)}")
    _check_heal(data.get("heal"), path)
    data.setdefault("name", Path(path).stem)
    data.setdefault("calibration", {})
    data["_path"] = str(path)
    return data


HEAL_FIELDS = {"steps": int, "train": str, "lr": float, "lora_rank": int}


def _check_heal(heal: Any, path: Path) -> None:
    """``heal:`` holds the model's healing defaults (steps, train, lr, lora_rank)."""
    if heal is None:
        return
    if not isinstance(heal, dict) or set(heal) - set(HEAL_FIELDS):
        raise UserError(f"recipe {path}: field 'heal' must be a mapping of {', '.join(HEAL_FIELDS)}")
    for key, typ in HEAL_FIELDS.items():
        v = heal.get(key)
        if v is not None and not (isinstance(v, typ) or (typ is float and isinstance(v, int))) or isinstance(v, bool):
            raise UserError(f"recipe {path}: field 'heal.{key}' must be {typ.__name__} (got {v!r})")
    if heal.get("train") not in (None, "all", "changed", "lora"):
        raise UserError(f"recipe {path}: field 'heal.train' must be all, changed or lora (got {heal['train']!r})")


def recipe_behind(spec: str | None) -> dict[str, Any]:
    """The recipe a model comes from: ``spec``'s own (the default model when None), or for a
    merged or healed folder the recipe its merge_log.json names as source; {} when there is none.
    Reads no weights, and never fails: the command's own model loading reports a bad spec."""

    spec = spec or DEFAULT_MODEL
    try:
        log = read_merge_log(spec)
    except UserError:
        return {}
    if log is not None:
        spec = log.source.get("spec")
        if not spec:
            return {}
    try:
        return find_recipe(str(spec)) or {}
    except UserError:
        return {}


def find_recipe(name: str) -> dict[str, Any] | None:
    """A recipe by name (``smollm2-135m``) or by path to a YAML file; None if it is neither."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return load_recipe_file(p)
    if len(p.parts) != 1:  # a path (a folder, a .gguf): never a recipe name; `dir/x` must not find `dir/x.yaml`
        return None
    candidate = _recipe_dir() / f"{name}.yaml"
    if candidate.is_file():
        return load_recipe_file(candidate)
    return None
