"""Device profiles: schema, loading and validation.

A profile is data about a device (memory, bandwidth, runtime) plus the bar an artifact must
clear there (quality loss, tokens/s).  Errors name the file and the field, because profiles are
the file users are most likely to write themselves.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .cache import check_plain_name
from .errors import UserError
from .precedence import resolved  # noqa: F401  (the rule's callers import it from here too)
from .targets import Target, runtimes, target_for_runtime

KV_CHOICES = ("auto", "f16", "f32", "q8_0", "q4_0")  # auto: the plan chooses (kv_cache.py)


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    memory_mb: int  # total device memory (RAM, or unified memory)
    reserve_mb: int  # kept for the OS and other apps
    bandwidth_gbps: float  # peak memory bandwidth, GB/s
    runtime: str  # llama.cpp | onnxruntime
    context_length: int
    threads: int
    min_tokens_per_s: float  # generation speed the device must reach
    max_quality_loss: float  # mean KL(reference || artifact) in nats
    kv_cache_type: str = "auto"  # auto (the plan chooses the cache mode) or a type pinned for K and V
    flash_attention: bool = True  # the device's runtime may run flash attention
    heal_steps: int = 0  # default healing steps for `build` on this device (0: none)
    unified_memory: bool = False  # GPU and CPU share the memory (Jetson, Apple silicon)
    path: str = ""

    @property
    def target(self) -> Target:
        """The runtime target this device runs (mka_edge/targets/)."""
        return target_for_runtime(self.runtime)

    @property
    def format(self) -> str:
        return self.target.name

    @property
    def budget_mb(self) -> int:
        return self.memory_mb - self.reserve_mb

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["format"], d["budget_mb"] = self.format, self.budget_mb
        return d


_REQUIRED = {
    f.name: f.type
    for f in fields(Profile)
    if f.name not in ("path", "kv_cache_type", "flash_attention", "unified_memory", "description", "heal_steps")
}


def _profile_dir() -> Path:
    return Path(str(resources.files("mka_edge._profiles")))


def known_profiles() -> list[str]:
    return sorted(p.stem for p in _profile_dir().glob("*.yaml"))


def _check(data: dict, where: str) -> Profile:
    if not all(isinstance(k, str) for k in data):
        raise UserError(f"profile {where}: every field name must be text (got {sorted(map(repr, data))[:3]})")
    for key in _REQUIRED:
        if key not in data:
            raise UserError(f"profile {where}: missing field '{key}'")
    unknown = set(data) - {f.name for f in fields(Profile)}
    if unknown:
        raise UserError(f"profile {where}: unknown field(s) {', '.join(sorted(unknown))}")
    for key in ("name", "runtime", "description"):
        if key in data and not isinstance(data[key], str):
            raise UserError(f"profile {where}: field '{key}' must be text (got {data[key]!r})")
    check_plain_name(data["name"], f"profile {where}")
    for key in ("memory_mb", "reserve_mb", "context_length", "threads"):
        v = data[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 0 or (key != "reserve_mb" and v == 0):
            raise UserError(f"profile {where}: field '{key}' must be a positive integer (got {data[key]!r})")
    for key in ("bandwidth_gbps", "min_tokens_per_s", "max_quality_loss"):
        v = data[key]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < float("inf"):
            raise UserError(f"profile {where}: field '{key}' must be a non-negative number (got {data[key]!r})")
    if data["reserve_mb"] >= data["memory_mb"]:
        raise UserError(
            f"profile {where}: field 'reserve_mb' ({data['reserve_mb']}) leaves no memory of 'memory_mb' ({data['memory_mb']})"
        )
    if data["runtime"] not in runtimes():
        raise UserError(
            f"profile {where}: field 'runtime' must be one of {', '.join(runtimes())} (got {data['runtime']!r})"
        )
    kv = data.get("kv_cache_type", "auto")
    if not isinstance(kv, str) or kv not in KV_CHOICES:
        raise UserError(f"profile {where}: field 'kv_cache_type' must be one of {', '.join(KV_CHOICES)} (got {kv!r})")
    if not isinstance(data.get("flash_attention", True), bool) or not isinstance(
        data.get("unified_memory", False), bool
    ):
        raise UserError(f"profile {where}: fields 'flash_attention' and 'unified_memory' must be true or false")
    if (
        not isinstance(data.get("heal_steps", 0), int)
        or isinstance(data.get("heal_steps"), bool)
        or data.get("heal_steps", 0) < 0
    ):
        raise UserError(
            f"profile {where}: field 'heal_steps' must be a non-negative integer (got {data.get('heal_steps')!r})"
        )
    data = dict(data)
    data.setdefault("description", "")
    for key in ("bandwidth_gbps", "min_tokens_per_s", "max_quality_loss"):
        data[key] = float(data[key])
    return Profile(**data, path=where)


def load_profile(name_or_path: str) -> Profile:
    p = Path(name_or_path)
    if p.suffix not in (".yaml", ".yml"):
        p = _profile_dir() / f"{name_or_path}.yaml"
        if not p.is_file():
            raise UserError(
                f"unknown profile '{name_or_path}'; known: {', '.join(known_profiles()) or 'none'} (or pass a .yaml path)"
            )
    elif not p.is_file():
        raise UserError(f"profile file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as exc:
        raise UserError(f"cannot read profile {p}: {(str(exc).splitlines() or [type(exc).__name__])[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"profile {p} is not a YAML mapping")
    data.setdefault("name", p.stem)
    try:
        return _check(data, str(p))
    except UserError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError, OverflowError) as exc:  # a hostile or odd value
        raise UserError(
            f"profile {p} is malformed ({type(exc).__name__}: {str(exc)[:120]}); see profiles/README.md"
        ) from None
