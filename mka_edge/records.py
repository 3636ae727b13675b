"""Typed records for the data that crosses modules: what a quant type costs, what an exported
artifact holds, and the plan.  Each is frozen and round-trips through JSON (``to_json`` /
``from_json``) so a plan can be printed, diffed, saved and executed later.

The merge log and its steps live beside the merge (``merge_log.py``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, NamedTuple

from .errors import UserError
from .kv_cache import BASELINE_CACHE

PLAN_SCHEMA = 2  # 2: cache mode, imatrix and attention removal in the choice


class Efficiency(NamedTuple):
    """A model's decode efficiency on this host for one target, and the sentence saying where it
    comes from (calibrated here, or which prior).  A measured fact the planner is handed back by
    whatever measured it, not one it reads from a file the measurement wrote."""

    value: float
    source: str


class MeasuredCosts(NamedTuple):
    """A target's answer to ``quant_costs``: the types' costs, the sentence saying where their KL
    comes from, and the decode efficiency timed while measuring them (None when none was timed)."""

    costs: dict[str, QuantCost]
    source: str
    efficiency: Efficiency | None = None


@dataclass(frozen=True)
class QuantCost:
    """What one quant type costs on one model for one target: bytes per transformer layer and
    outside the layers, the part llama.cpp repacks, and (when measured or from a prior) the KL it
    adds on the unmerged model.  ``kl`` is None for sizes alone (the early feasibility check)."""

    quant: str
    target: str
    per_layer: tuple[float, ...]
    other: float
    repack_per_layer: tuple[float, ...] = ()
    kl: float | None = None
    tensor_types: dict = field(default_factory=dict)
    resident_ratio: float | None = None  # ONNX: share of the weights onnxruntime keeps resident
    extra: dict = field(default_factory=dict)  # measured side facts (top1, ppl, peak RSS, source...)

    @property
    def total_bytes(self) -> float:
        return sum(self.per_layer) + self.other

    def weight_bytes(self, kept_layers: list[int] | int) -> tuple[float, float]:
        """(weight bytes, repacked-copy bytes) of a model keeping these original layers (or this
        many, at the mean layer size)."""
        per = self.per_layer
        rep = self.repack_per_layer or (0.0,) * len(per)
        if isinstance(kept_layers, int):
            return self.other + kept_layers * (sum(per) / len(per)), kept_layers * (sum(rep) / len(rep))
        return self.other + sum(per[i] for i in kept_layers), float(sum(rep[i] for i in kept_layers))

    def to_json(self) -> dict:
        """The cache's form (the quant probes have always written these keys)."""
        d = {
            "per_layer": list(self.per_layer),
            "repack_per_layer": list(self.repack_per_layer),
            "other": self.other,
            "tensor_types": dict(self.tensor_types),
            **self.extra,
        }
        if self.kl is not None:
            d["kl"] = self.kl
        if self.resident_ratio is not None:
            d["resident_ratio"] = self.resident_ratio
        return d

    @classmethod
    def from_json(cls, quant: str, target: str, d: dict) -> QuantCost:
        known = {"per_layer", "repack_per_layer", "other", "kl", "tensor_types", "resident_ratio", "format"}
        return cls(
            quant,
            target,
            tuple(d["per_layer"]),
            float(d["other"]),
            tuple(d.get("repack_per_layer") or ()),
            d.get("kl"),
            dict(d.get("tensor_types") or {}),
            d.get("resident_ratio"),
            {k: v for k, v in d.items() if k not in known},
        )

    def with_kl(self, kl: float, **extra) -> QuantCost:
        return QuantCost(
            self.quant,
            self.target,
            self.per_layer,
            self.other,
            self.repack_per_layer,
            kl,
            self.tensor_types,
            self.resident_ratio,
            {**self.extra, **extra},
        )

    def plan_json(self) -> dict:
        """The entry plan.json keeps for this type."""
        d = {"kl": self.kl, "bytes": self.total_bytes, "tensor_types": dict(self.tensor_types)}
        if self.resident_ratio is not None:
            d["resident_ratio"] = self.resident_ratio
        for key in ("imatrix", "kl_plain", "kl_imatrix", "embd_bytes"):  # GGUF: imatrix or not; embedding bytes
            if key in self.extra:
                d[key] = self.extra[key]
        return d


@dataclass(frozen=True)
class EditSet:
    """One point of a merge curve: the model after ``k`` steps of ``method``'s trajectory (layers
    removed or fused, attention sub-blocks removed), with its held-out KL against the original.
    ``kept``: original layers still there; ``attn_removed``: those of them without attention."""

    method: str
    k: int
    kept: tuple[int, ...]
    attn_removed: tuple[int, ...] = ()
    kl: float = 0.0

    @property
    def layers(self) -> int:
        return len(self.kept)

    @property
    def attn_layers(self) -> int:
        return len(self.kept) - len(self.attn_removed)


@dataclass(frozen=True)
class CacheCost:
    """A cache mode (kv_cache.CacheMode label) and what it costs on this model: KL added to the
    baseline mode's, and the share of the baseline's decode speed it keeps at the plan's context."""

    mode: str
    kl: float = 0.0
    speed_factor: float = 1.0
    # False: not timed: no plan with it ranked first (the factor is then 1.0, its optimistic bound), or a
    # model too large to probe (the factor is then the conservative prior, planning.prior_cache_speeds)
    speed_measured: bool = True
    # False: KL not measured (no plan with it ranked first); ``kl`` is then its lower bound CACHE_KL_FLOOR
    kl_measured: bool = True


# The least cost of a cache mode other than the baseline (f16 cache, no flash attention): a lossy or
# reordered cache is never counted as free.  A measured difference below it is noise (on a
# random-weight model a q8_0 cache can measure below the f16 one).  The floor makes it a true lower
# bound of every mode not yet measured, so measuring a mode only when it ranks first
# (solver/scope.py rule 4) picks what measuring every mode picks, ties included.
CACHE_KL_FLOOR = 1e-6


@dataclass(frozen=True)
class ArtifactSummary:
    """What an exported artifact holds, with the same field names for every target (the exporters'
    own inspection dicts stay in ``raw``: validation.json keeps them as they were)."""

    target: str
    path: str
    quant: str | None
    block_count: int
    file_bytes: int  # everything on disk (the .gguf file; the ONNX folder's model files)
    weight_bytes: int  # tensor / initializer bytes
    bits_per_weight: float | None
    tensor_types: dict  # GGUF: tensor types written; ONNX: quantized ops
    raw: dict = field(default_factory=dict, compare=False)
    # a mixed plan's artifact: {"cells": [[layer, kind, type]], "outside": {kind: type}, "kind_bytes": {...}}
    allocation: dict | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> ArtifactSummary:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


@dataclass(frozen=True)
class Budget:
    """What the plan must fit: resolved once from the profile and the command line."""

    memory_mb: float
    context: int
    kv_cache_type: str
    min_tokens_per_s: float
    max_quality_loss: float


@dataclass(frozen=True)
class Choice:
    method: str
    alpha: str
    k: int
    quant: str
    layers_after: int
    kept_layers: list
    predicted: dict
    cache: str = BASELINE_CACHE  # kv_cache.CacheMode label: K type / V type, +fa with flash attention
    imatrix: bool = False  # the weight type quantized with an importance matrix
    attn_removed: list = field(default_factory=list)  # original layers kept without attention
    # a mixed plan (quant MIXED): each 2-D weight's ggml type, named as in the edited model (blocks
    # numbered from 0 after a merge; ``kept_layers[i]`` is the original of block i)
    tensor_types: dict | None = None


def is_a(v: Any, kind: type | tuple) -> bool:
    """``isinstance`` as a JSON reader needs it: true and false are not numbers unless bool is asked for."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return isinstance(v, kinds) and (bool in kinds or not isinstance(v, bool))


def _checked(d: dict, key: str, kind: type | tuple, where: str, *, optional: bool = False, minimum=None):
    """``d[key]`` if it has the type a plan gives it, else one line naming the field (plan.json is
    a file a user may get from elsewhere)."""
    v = d.get(key)
    if v is None and optional:
        return None
    if not is_a(v, kind) or (minimum is not None and v < minimum):
        want = {int: "a non-negative integer", str: "text", bool: "true or false"}.get(kind, "a number")
        raise UserError(f"{where}: field '{key}' must be {want} (got {v!r}); plan again")
    return v


@dataclass(frozen=True)
class Ranked:
    """One plan of the list a build tries, best first: what it edits, its weight and cache types,
    and the KL it was predicted to lose (plan.json's ``ranked``)."""

    method: str
    k: int
    quant: str
    imatrix: bool = False
    cache: str = BASELINE_CACHE
    attn_layers: int | None = None  # layers keeping attention (None: all)
    kl: float | None = None
    tensor_types: dict | None = None  # a mixed plan's allocation (tensor name in the edited model -> ggml type)

    @classmethod
    def from_json(cls, d: Any, default_method: str, where: str = "plan") -> Ranked:
        if not isinstance(d, dict):
            raise UserError(f"{where}: 'ranked' must be a list of plans (got {d!r}); plan again")
        types = d.get("tensor_types")
        if types is not None and not (
            isinstance(types, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in types.items())
        ):
            raise UserError(f"{where}: field 'tensor_types' must map tensor names to ggml types; plan again")
        return cls(
            method=d.get("method") or default_method,
            k=_checked(d, "k", int, where, minimum=0),
            quant=_checked(d, "quant", str, where),
            imatrix=bool(_checked(d, "imatrix", bool, where, optional=True)),
            cache=_checked(d, "cache", str, where, optional=True) or BASELINE_CACHE,
            attn_layers=_checked(d, "attn_layers", int, where, optional=True, minimum=0),
            kl=_checked(d, "kl", (int, float), where, optional=True),
            tensor_types=types,
        )

    @property
    def merge_key(self) -> tuple[str, int]:
        """Two plans with the same key share one merged folder."""
        return self.method, self.k


@dataclass(frozen=True)
class Attempt:
    """One plan a build tried: what it was predicted and measured to lose, and whether it passed
    (manifest.json and report.md list them)."""

    method: str
    k: int
    quant: str
    imatrix: bool
    cache: str
    attn_layers: int | None
    predicted_kl: float | None
    measured_kl: float
    passed: bool
    heal: dict | None = None  # steps, train, held-out KL before and after

    def to_json(self) -> dict:
        d = asdict(self)
        if d["heal"] is None:
            del d["heal"]
        return d


@dataclass(frozen=True)
class Plan:
    """A plan: the choice, the facts it was made from and the reason, as plan.json holds it.
    ``build --plan`` executes one; its model and profile fingerprints must match the run's."""

    mka_edge: str
    profile: dict
    model: dict
    format: str
    budget: Budget
    choice: Choice
    reason: str
    alternatives: list
    pareto: list
    models: dict
    curve: dict
    heal: dict | None
    quant_costs: dict
    candidates: list
    ranked: list[Ranked]
    settings: dict = field(default_factory=dict)  # the inputs that reproduce it (method, quants, k_max...)
    cache_costs: dict = field(default_factory=dict)  # cache mode -> {'kl', 'speed_factor'}
    scope: dict = field(default_factory=dict)  # types and cache modes measured, and those skipped with why
    schema: int = PLAN_SCHEMA

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict, where: str = "plan") -> Plan:
        try:
            if d.get("schema", PLAN_SCHEMA) != PLAN_SCHEMA:
                raise UserError(
                    f"{where} has plan schema {d.get('schema')}; this mka-edge reads {PLAN_SCHEMA}: plan again"
                )
            data: dict[str, Any] = {f.name: d[f.name] for f in fields(cls) if f.name in d}
            data["budget"] = Budget(**d["budget"])
            data["choice"] = Choice(**d["choice"])
            if not isinstance(d["ranked"], list):
                raise UserError(f"{where}: 'ranked' must be a list of plans; plan again")
            data["ranked"] = [Ranked.from_json(e, data["choice"].method, where) for e in d["ranked"]]
            return cls(**data)
        except (KeyError, TypeError, AttributeError) as exc:
            raise UserError(
                f"{where} is not an mka-edge plan ({type(exc).__name__}: {exc}); write one with `mka-edge plan --out`"
            ) from None
