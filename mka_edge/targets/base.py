"""What a runtime target is, and the one table that lists them.

A target is everything that differs between runtimes (llama.cpp GGUF, onnxruntime ONNX): its quant
types, how its quant costs are sized and measured, its memory model, how it exports, reads back,
validates and packages an artifact.  The solver, the build and the report ask a target; none of
them branches on a format name.  A new target is one module that subclasses ``Target`` and
registers itself with ``@register`` (docs/architecture.md lists what it implements).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from ..errors import UserError
from ..records import ArtifactSummary, CacheCost, Efficiency, MeasuredCosts, QuantCost
from ..solver.cost_models import COST_MODELS, register_cost_model
from ..validate.formats import register_format, unregister_format

if TYPE_CHECKING:
    from ..solver.feasibility import ModelShape
    from ..solver.memory import MemoryPrediction, Shape
    from ..validate.formats import Format

TARGETS: dict[str, Target] = {}


def register(cls: type[Target]) -> type[Target]:
    """Class decorator: one line adds a target to the table, and to the tables the layers below
    read it from (the solver's cost models, validation's adapters)."""
    t = TARGETS[cls.name] = cls()
    register_cost_model(t)
    register_format(t.name, t.claims, t.artifact_kind, lambda: t.validation)
    return cls


def unregister(name: str) -> None:
    """Take a target out of every table (tests that register a made-up one)."""
    TARGETS.pop(name, None)
    COST_MODELS.pop(name, None)
    unregister_format(name)


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise UserError(f"unknown target format '{name}'; known: {', '.join(TARGETS)}") from None


def target_for_runtime(runtime: str) -> Target:
    for t in TARGETS.values():
        if t.runtime == runtime:
            return t
    raise UserError(f"unknown runtime '{runtime}'; known: {', '.join(t.runtime for t in TARGETS.values())}")


def runtimes() -> list[str]:
    return [t.runtime for t in TARGETS.values()]


def target_for_artifact(artifact: Path) -> Target:
    """The target whose artifacts look like this path (suffix or folder layout)."""
    artifact = Path(artifact)
    for t in TARGETS.values():
        if t.claims(artifact):
            return t
    if not artifact.exists():
        raise UserError(f"{artifact} does not exist")
    raise UserError(
        f"{artifact} is not an artifact of any known target ({'; '.join(t.artifact_kind for t in TARGETS.values())}); "
        "give one of those"
    )


@dataclass(frozen=True)
class ReportMemory:
    """The memory and speed facts the report states for a built artifact."""

    device: MemoryPrediction
    host: MemoryPrediction
    host_context: int
    host_run: str
    weight_bytes: float
    kv_full_bytes: float


class Target(ABC):
    """One runtime target.  Class attributes are its constants; methods its behaviour.  Its public
    surface is four protocols (``target_protocols``: CostModel for the planner, Exporter,
    ValidationFormat, Packager); a caller that needs one face names that one."""

    name: ClassVar[str]  # the format name (plan.json, manifest, --format)
    runtime: ClassVar[str]  # the profile's `runtime` field that selects this target
    runtime_label: ClassVar[str]  # the runtime as reports name it
    artifact_kind: ClassVar[str]  # what the artifact is, for messages
    default_quants: ClassVar[tuple[str, ...]]  # the types a plan considers unless told
    default_export_quant: ClassVar[str]
    sizes_are_exact: ClassVar[bool]  # cheap sizes are the bytes the exporter will write
    per_tensor_types: ClassVar[bool] = False  # the exporter writes a type per tensor (mixed plans, --mixed)
    memory_model: ClassVar[str]  # how predict_memory works, one line for the plan
    speed_calibration_file: ClassVar[str]
    export_options: ClassVar[tuple[str, ...]] = ()  # `mka-edge export` options that only this target takes

    # ---- quant types and their costs ----
    @abstractmethod
    def check_quants(self, quants: list[str] | None) -> list[str]:
        """Canonical names of the types a plan may consider (default: ``default_quants``); one
        line naming the known types for an unknown one."""

    @abstractmethod
    def type_sizes(self, ms: ModelShape, quants: list[str], measure: bool) -> dict[str, QuantCost]:
        """Cheap facts: bytes of each type on this shape, before any model is loaded."""

    @abstractmethod
    def quant_costs(
        self,
        lm,
        ms: ModelShape,
        sizes: dict[str, QuantCost],
        quants: list[str],
        *,
        measure: bool,
        progress: bool,
        calibrate_speed: bool,
        log,
        imatrix: bool = True,
    ) -> MeasuredCosts:
        """Measured (or prior) costs with KL, the sentence that says where they come from and, with
        ``calibrate_speed``, the decode efficiency timed on one of the measured files (None when the
        types asked for hold none this target times).  A target with ``probe_session`` also takes
        ``session=`` (the plan measures type by type)."""

    def probe_session(self, lm, *, progress: bool, imatrix: bool, plain_too: bool = True):
        """A context manager whose value is passed to ``quant_costs(session=)`` so that measuring
        one type at a time shares the set-up (the float base file, the reference); None here.
        ``plain_too`` False: a type an importance matrix helps is measured with one only."""
        return contextlib.nullcontext(None)

    def calibrate_speed(self, session, quants: list[str]) -> Efficiency | None:
        """This host's decode efficiency for the session's model, timed now (or recorded by an
        earlier plan), apart from any type's probe; None when the target times decode only inside
        its probe (a plan then measures every type, and ``quant_costs`` hands the efficiency back)."""
        return None

    def source_grids(self, lm) -> frozenset[str]:
        """Tensor types that may reproduce the loaded model's own quantization grid exactly."""
        return frozenset()

    # ---- memory and speed ----
    @abstractmethod
    def kv_bytes(self, shape: Shape, context: int, quant: str, kv_type: str) -> float: ...

    @abstractmethod
    def predict_memory(
        self,
        shape: Shape,
        cost: QuantCost,
        weight_bytes: float,
        repack_bytes: float,
        context: int,
        kv_type: str,
        overhead_mb: float,
    ) -> MemoryPrediction:
        """Peak resident memory on the device for a plan with these weights."""

    def cache_modes(self, kv_cache_type: str, flash_attention: bool, head_dim: int) -> list[str]:
        """The cache modes (kv_cache.CacheMode labels, or the runtime's own label) a plan may choose
        on this runtime, given the profile's / command line's pins and the model's head size.  A
        runtime without a choice returns one label."""
        return [self.kv_cache_label(kv_cache_type)]

    def cache_costs(
        self,
        lm,
        modes: list[str],
        *,
        context: int,
        measure: bool,
        progress: bool,
        log,
        timed: bool = True,
        session=None,
    ) -> list[CacheCost]:
        """What each mode costs on this model (KL added, speed kept); free for a single mode.
        ``timed`` False: KL only (``speed_measured`` False), each mode timed later by ``cache_speed``
        when a plan with it would be chosen."""
        return [CacheCost(m) for m in modes]

    def cache_speed(self, lm, mode: str, *, context: int, progress: bool, log, session=None) -> CacheCost:
        """``mode``'s cost with its decode speed measured (the share of the baseline mode's)."""
        return CacheCost(mode)

    def supports_attention_removal(self, arch) -> bool:
        """Whether this runtime can run a model with some layers' attention removed (llama.cpp's deci)."""
        return False

    def kv_cache_label(self, kv_type: str) -> str:
        """The KV cache type as the plan's budget records it."""
        return kv_type

    def validation_kv_type(self, kv_type: str) -> str | None:
        """The KV type a build's validation asks the runtime for (None: the runtime's own)."""
        return kv_type

    # ---- export, read back, validate ----
    @abstractmethod
    def artifact_name(self, tag: str) -> str: ...

    @abstractmethod
    def export(
        self,
        lm,
        out: Path,
        quant: str,
        *,
        context: int,
        progress: bool,
        imatrix: bool = False,
        made=None,
        tensor_types: dict | None = None,
    ) -> ArtifactSummary:
        """Write a loaded (merged) model as this target's artifact (``imatrix``: with an importance
        matrix, where the target's quantizer takes one; ``made``: what ``made_by_probe`` found;
        ``tensor_types``: a mixed plan's per-tensor types, for targets with ``per_tensor_types``)."""

    def made_by_probe(self, folder: Path, lm, quant: str, imatrix: bool):
        """An artifact of the unmerged ``lm`` the plan's probe already wrote in ``folder`` (a
        build's hand-over), which ``export(made=)`` moves instead of writing again; None: none."""
        return None

    def export_disk_bytes(self, config, quant: str, artifact_bytes: float, *, from_folder: bool) -> float:
        """Disk the export needs at its peak beside --out, the artifact included: by default a
        float32 save of the model (what a builder reads) unless ``from_folder`` (the model is read
        from its own folder), plus the artifact.  The build checks this before any work."""
        from ..exporters.gguf import f32_bytes

        return (0.0 if from_folder else f32_bytes(config)) + artifact_bytes

    @abstractmethod
    def export_spec(self, model: str | None, out: Path, quant: str, options: dict) -> ArtifactSummary:
        """`mka-edge export`: load ``model`` and export it with this target's own options."""

    @abstractmethod
    def summary(self, info: dict) -> ArtifactSummary:
        """The exporter's inspection dict as an ArtifactSummary."""

    @abstractmethod
    def claims(self, artifact: Path) -> bool:
        """Whether a path given to `validate` is this target's artifact."""

    @property
    @abstractmethod
    def validation(self) -> Format:
        """The validation adapter (worker, inspection, vocabulary check, report rows)."""

    def describe_export(self, s: ArtifactSummary) -> str:
        """The one line `mka-edge export` prints; a target says more of its own artifact if it likes."""
        types = ", ".join(f"{k} x{v}" for k, v in s.tensor_types.items())
        return f"wrote {s.path}: {s.file_bytes / 2**20:.1f} MiB, {s.block_count} layers, {s.quant} ({types})"

    # ---- the package ----
    @abstractmethod
    def report_memory(
        self,
        folder: Path,
        artifact: str,
        quant: str,
        summary: ArtifactSummary,
        plan,
        latency: dict,
        shape: Shape,
        kv_type: str,
    ) -> ReportMemory: ...

    @abstractmethod
    def artifact_line(self, artifact: str, quant: str, summary: ArtifactSummary, layers: int) -> str: ...

    @abstractmethod
    def card_facts(self, summary: ArtifactSummary) -> dict[str, str]:
        """Model-card lines: how it was made (how), format, size, provenance."""

    @abstractmethod
    def write_run_files(self, folder: Path, artifact: str, context: int, threads: int, cache: str = "") -> None:
        """RUN.md and whatever else the runtime needs to start the artifact (in the plan's cache mode)."""
