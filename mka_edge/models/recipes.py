"""Model recipes: small YAML files naming where a model's weights come from and its defaults."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..cache import check_plain_name
from ..errors import UserError
from ..merge_log import read_merge_log
from ..heal_modes import MODES as HEAL_MODES

DEFAULT_MODEL = "smollm2-135m"
_KINDS = ("pip-gguf", "hub", "hf-dir", "gguf")
FIELDS = ("name", "description", "source", "architecture", "num_layers", "llama_cpp", "calibration", "heal")
_SOURCE_FIELDS = {"pip-gguf": ("distribution", "file"), "hub": ("hub_id",), "hf-dir": ("path",), "gguf": ("path",)}


def _recipe_dir() -> Path:
    return Path(str(resources.files("mka_edge._recipes")))


def known_recipes() -> list[str]:
    return sorted(p.stem for p in _recipe_dir().glob("*.yaml"))


def load_recipe_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as exc:
        raise UserError(f"cannot read recipe {path}: {exc}".splitlines()[0]) from None
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise UserError(f"recipe {path} is not a YAML mapping of field names")
    src = data.get("source")
    if not isinstance(src, dict) or not isinstance(src.get("kind"), str) or src.get("kind") not in _KINDS:
        raise UserError(f"recipe {path}: field 'source.kind' must be one of {', '.join(_KINDS)}")
    for key in _SOURCE_FIELDS[src["kind"]]:
        if not isinstance(src.get(key), str) or not src[key]:
            raise UserError(f"recipe {path}: a '{src['kind']}' source needs the text field 'source.{key}'")
    if not isinstance(data.get("name", ""), str):
        raise UserError(f"recipe {path}: field 'name' must be text")
    unknown = set(data) - set(FIELDS)
    if unknown:  # a typo, or a field this version does not read (an output folder is --out's alone)
        raise UserError(
            f"recipe {path}: unknown field(s) {', '.join(sorted(unknown))}; a recipe has {', '.join(FIELDS)}"
        )
    for key in ("calibration", "llama_cpp"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise UserError(f"recipe {path}: field '{key}' must be a mapping")
    _check_heal(data.get("heal"), path)
    data.setdefault("name", Path(path).stem)
    check_plain_name(data["name"], f"recipe {path}")
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
    if heal.get("train") not in (None, *HEAL_MODES):
        raise UserError(
            f"recipe {path}: field 'heal.train' must be {', '.join(HEAL_MODES[:-1])} or {HEAL_MODES[-1]} (got {heal['train']!r})"
        )


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
