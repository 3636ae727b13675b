"""The cost models the solver asks, by target name: each runtime target registers itself here
(``targets.base.register``), so the solver reads a target's memory model, KV bytes and speed
calibration file without importing the targets, which sit above it (targets use the solver's
probes; docs/architecture.md, "Import direction").  Like gguf-py's self-registering types: the
table lives at the bottom, the entries come from above."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from ..errors import UserError

if TYPE_CHECKING:
    from ..records import QuantCost
    from .memory import MemoryPrediction, Shape


class CostModel(Protocol):
    """What the solver needs of a target: bytes in memory, KV bytes, where its speed calibration is."""

    name: str
    speed_calibration_file: str

    def predict_memory(
        self,
        shape: Shape,
        cost: QuantCost,
        weight_bytes: float,
        repack_bytes: float,
        context: int,
        kv_type: str,
        overhead_mb: float,
    ) -> MemoryPrediction: ...

    def kv_bytes(self, shape: Shape, context: int, quant: str, kv_type: str) -> float: ...


COST_MODELS: dict[str, CostModel] = {}


def register_cost_model(model: CostModel) -> None:
    COST_MODELS[model.name] = model


def cost_model(name: str) -> CostModel:
    try:
        return COST_MODELS[name]
    except KeyError:
        known = ", ".join(COST_MODELS) or "none registered: import mka_edge.targets first"
        raise UserError(f"unknown target format '{name}'; known: {known}") from None
