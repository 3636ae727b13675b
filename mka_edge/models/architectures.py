"""Per-architecture tables: the only place that knows tensor names and which weights a block holds.

The merge reads these tables instead of branching on the architecture, so supporting a new
decoder family means adding one entry here (mergekit keeps the same knowledge as data).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:
    from torch import nn

_ATTN = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight")
_MLP = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")
_QKV_BIAS = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")
_LINEARS = tuple(w.split(".")[-2] for w in _ATTN + _MLP)  # q_proj ... down_proj: every linear of a block


@dataclass(frozen=True)
class ArchSpec:
    name: str
    layers_path: str  # attribute path from the CausalLM to the ModuleList of blocks
    layer_prefix: str  # state-dict prefix of block i, with {i}
    block_weights: tuple[str, ...]  # every weight a block always holds (relative names)
    norms: tuple[str, ...]  # the subset of block_weights that are norms
    biases: tuple[str, ...] = ()  # biases the architecture always has
    optional_biases: dict[str, tuple[str, ...]] = field(default_factory=dict)  # config flag -> biases
    rotary_permute_qk: bool = True  # llama.cpp wants q/k permuted for its rope layout
    gguf_arch: str = "llama"
    gguf_attention_free_arch: str | None = None  # llama.cpp architecture for layers without attention (deci)
    attn_module: str = "self_attn"  # attribute of a block holding its attention (carries layer_idx)
    mlp_module: str = "mlp"  # attribute of a block holding its feed-forward
    output_head: str = "lm_head"  # module name of the output projection (dropped when tied)
    lora_targets: tuple[str, ...] = _LINEARS  # linear-module names LoRA adapts in every block

    def layers(self, model) -> nn.ModuleList:
        """The ModuleList of blocks of ``model`` (the CausalLM), found by following ``layers_path``."""
        obj = model
        for part in self.layers_path.split("."):
            obj = getattr(obj, part)
        return obj

    def block_params(self, config) -> tuple[str, ...]:
        """All parameter names of one block for this config (weights, norms, biases)."""
        names = list(self.block_weights) + list(self.biases)
        for flag, extra in self.optional_biases.items():
            if getattr(config, flag, False):
                names.extend(extra)
        return tuple(names)


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec(
        name="llama",
        layers_path="model.layers",
        layer_prefix="model.layers.{i}.",
        block_weights=_ATTN + _MLP + _NORMS,
        norms=_NORMS,
        optional_biases={
            "attention_bias": _QKV_BIAS + ("self_attn.o_proj.bias",),
            "mlp_bias": ("mlp.gate_proj.bias", "mlp.up_proj.bias", "mlp.down_proj.bias"),
        },
        gguf_arch="llama",
        gguf_attention_free_arch="deci",
    ),
    "mistral": ArchSpec(
        name="mistral",
        layers_path="model.layers",
        layer_prefix="model.layers.{i}.",
        block_weights=_ATTN + _MLP + _NORMS,
        norms=_NORMS,
        gguf_arch="llama",
    ),
    "qwen2": ArchSpec(
        name="qwen2",
        layers_path="model.layers",
        layer_prefix="model.layers.{i}.",
        block_weights=_ATTN + _MLP + _NORMS,
        norms=_NORMS,
        biases=_QKV_BIAS,
        rotary_permute_qk=False,
        gguf_arch="qwen2",
    ),
}


def arch_for(model_type: str) -> ArchSpec:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UserError(
            f"unsupported architecture '{model_type}': mka-edge supports {', '.join(sorted(ARCHITECTURES))}"
        ) from None
