"""What a plan can know before any model work: the model's shape from its config alone, the bytes
each candidate type gives it, and so whether any plan can fit the budget at all.

Why: a budget nothing fits used to be refused after the merge trajectory and the quant probe
(16 minutes on SmolLM2), although the answer depends on neither: the smallest footprint is the
largest K allowed with the smallest type.  Here it is decided in seconds, from exact sizes:

- GGUF: llama.cpp's quantizer, in a dry run on a data-less GGUF of the model's shape
  (``mka_edge.exporters.gguf.write_shape_gguf``), names the type it would give every tensor; bytes are rows
  x ggml row size from gguf-py's block table — exactly what the quantized file holds (a test checks
  them against the probe's real files).  Costs a second, even for an 8B model (meta device).
- ONNX: each type's nominal bytes per weight with a resident share of 1 (the measured shares are
  1.05-1.6), a lower bound, so a refusal from it says "at least".
- Layers merged away: the K largest, so the memory at K is never over-estimated.  Where a type's
  layers differ in size (llama.cpp's mixes give some layers more bits), the merge may remove
  smaller ones and the full plan's smallest footprint can be a little higher (SmolLM2 Q4_K_M at
  K=8: 233.4 MB here, 233.5 MB after the sleb trajectory); the refusal then says "at least".
"""

from __future__ import annotations

import json
import math
import tempfile
from collections import Counter
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gguf
import torch
from transformers import AutoModelForCausalLM

from mka_edge.exporters.gguf import write_shape_gguf
from mka_edge.exporters.llama_quantize import dry_run_types
from mka_edge.exporters.quant_types import quant_type

from ..cache import atomic_write_text, cache_root, entry_lock, stable_hash
from ..errors import UserError
from ..mka.layers import get_layers
from ..models.architectures import arch_for
from ..models.loading import load_config
from ..records import CacheCost, EditSet, QuantCost
from .memory import Shape
from .quant_probe import split_by_block
from .search import candidates, refuse_if_nothing_fits

SIZES_VERSION = 5  # 2: each tensor's type (tensor_map), for the precision order of solver/scope.py; 3: embd_bytes;
# 4: each tensor's weight count (tensor_params), for rule 2b of solver/scope.py; 5: Q4_K repacked


@dataclass
class ModelShape:
    """A model as far as the solver's early checks need it: config, architecture and parameter
    counts, from a meta-device instance (no weights read)."""

    config: Any
    arch: Any
    model: Any  # transformers CausalLM on the meta device
    block_params: list[int]
    other_params: int

    @property
    def n_layers(self) -> int:
        return len(self.block_params)

    @property
    def max_positions(self) -> int | None:
        return getattr(self.config, "max_position_embeddings", None)

    @property
    def shape(self) -> Shape:
        return Shape.from_config(self.config)


def read_shape(spec: str | None, trust_remote_code: bool = False) -> ModelShape:

    config = load_config(spec, trust_remote_code)
    arch = arch_for(config.model_type)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    blocks = [sum(p.numel() for p in layer.parameters()) for layer in get_layers(model, arch)]
    total = sum(p.numel() for p in model.parameters())
    return ModelShape(config, arch, model, blocks, total - sum(blocks))


def _bytes_by_type(shapes: dict[str, tuple[int, ...]], types: dict[str, str]) -> dict:
    """{'per_layer', 'repack_per_layer', 'other', 'tensor_types'}: the quant probe's size fields."""

    sized = []
    for name, shape in shapes.items():
        ggml = gguf.GGMLQuantizationType[types.get(name, "f32").upper()]
        block, size = gguf.GGML_QUANT_SIZES[ggml]
        rows = shape[0] if len(shape) == 2 else None  # torch order: ne[1] first
        sized.append((name, ggml.name, rows, math.prod(shape[:-1]) * (shape[-1] // block) * size))
    out = split_by_block(sized)
    out["tensor_types"] = dict(Counter(t for _, t, _, _ in sized).most_common())  # as inspect_gguf reports them
    out["tensor_map"] = {name: t for name, t, _, _ in sized}
    out["tensor_params"] = {name: math.prod(shape) for name, shape in shapes.items()}
    # the token embedding's bytes: with an output matrix of its own (untied), llama.cpp only
    # gathers a row of it per token, so the speed model does not count it as read
    out["embd_bytes"] = float(sum(b for name, _, _, b in sized if name == "token_embd.weight"))
    return out


def gguf_type_sizes(ms: ModelShape, quants: list[str]) -> dict[str, dict]:
    """Bytes per layer and outside the layers for each GGUF type, from llama.cpp's dry run.
    Cached by the model's config and the types."""

    key = stable_hash(
        {
            "config": ms.config.to_json_string(use_diff=False),
            "quants": quants,
            "llama_cpp": version("llama-cpp-python"),
            "v": SIZES_VERSION,
        }
    )
    path = cache_root() / "type_sizes" / f"{key[:20]}.json"
    if path.is_file():
        return json.loads(path.read_text())
    with entry_lock(path, "the quant types' sizes (llama.cpp's dry run)"):
        if path.is_file():  # written while this process waited?
            return json.loads(path.read_text())
        with tempfile.TemporaryDirectory(prefix="mka-edge-shape-") as tmp:
            src = Path(tmp) / "shape-f32.gguf"
            shapes = write_shape_gguf(SimpleNamespace(model=ms.model, arch=ms.arch), src)
            ftypes = {q: quant_type(q).ftype for q in quants}
            chosen = dry_run_types(src, sorted(set(ftypes.values())))
        out = {q: _bytes_by_type(shapes, chosen[ftypes[q]]) for q in quants}
        atomic_write_text(path, json.dumps(out))
    return out


def smallest_kept(per_layer: list[float], k: int) -> list[int]:
    """The layers kept when the K largest go: the least memory any merge to K can reach."""
    order = sorted(range(len(per_layer)), key=lambda i: per_layer[i])
    return sorted(order[: len(per_layer) - k])


def check_any_fits(
    ms: ModelShape,
    sizes: dict[str, QuantCost],
    *,
    k_max: int,
    context: int,
    modes: list[str],
    budget_mb: float,
    overhead_mb: float,
    exact: bool,
    forbidden: str = "",
) -> None:
    """Refuse, before any model work, a budget that no (K <= k_max, type) pair can meet."""

    ref = next(iter(sizes.values())).per_layer
    kept = [smallest_kept(ref, k) for k in range(k_max + 1)]
    cands = candidates(
        ms.shape,
        [EditSet("", k, tuple(kept[k])) for k in range(k_max + 1)],
        sizes,
        [CacheCost(m) for m in modes],
        context=context,
        budget_mb=budget_mb,
        bandwidth_gbps=1.0,
        efficiency=1.0,
        min_tps=0.0,
        max_kl=float("inf"),
        overhead_mb=overhead_mb,
    )
    # Where llama.cpp's mix gives layers different types (Q4_K_M: more bits in some layers), which
    # layers a merge removes changes the bytes: the K largest give a bound the merge may not reach.
    uniform = all(len(set(e.per_layer)) <= 1 and len(set(e.repack_per_layer)) <= 1 for e in sizes.values())
    refuse_if_nothing_fits(cands, budget_mb, context, at_least=not (exact and uniform), forbidden=forbidden)


def check_shape(ms: ModelShape, *, context: int, k_max: int | None) -> None:
    """The plan's inputs against the model's shape: one line each, before any model work."""
    if ms.max_positions and context > ms.max_positions:
        raise UserError(
            f"--context {context} is beyond the model's {ms.max_positions} positions; use at most {ms.max_positions}"
        )
    if k_max is not None and not 0 <= k_max < ms.n_layers:
        raise UserError(
            f"--max-merge {k_max} must be between 0 and {ms.n_layers - 1}: the model has {ms.n_layers} layers"
        )
