"""Attention-only removal inside the merge engine: running a block without its attention, the
stack of a plan that removed some attention sub-blocks, the blocks a merged folder saves, and the
reference bytes each removal unit saves.

The model representation (``models.attention_removal``) is a zero attention output projection
(``o_proj``) plus the config attribute: transformers then computes ``x + 0 + MLP(norm(x))``.  The
engine computes the same without running the attention: ``WithoutAttention`` runs the block's own
forward with its attention swapped for a module returning zeros, so the residual adds exactly 0
and the rest of the block (norms, MLP, accelerate's hooks) runs as it is; the logits agree bit
for bit with the zero-``o_proj`` model (tests/test_attention_removal.py).

Plans keep the attention-removed layers as a set of *original* layer indices beside the
composition (only single-source entries, i.e. layers kept as they are, can lose their attention).
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Iterable

import torch
from torch import nn

from .fusion import Composition, realize

ATTN_OUT = "o_proj"  # the attention output projection zeroed in a saved model (llama, mistral, qwen2)
ATTN_NORM = "input_layernorm"  # the norm that only feeds the attention (llama.cpp's deci drops it too)
F16_BYTES = 2  # the reference element size of weights and of the KV cache
REF_CONTEXT = 4096  # default reference context for the KV cache bytes of a removal unit


class _ZeroAttention(nn.Module):
    """Stands in for an attention module: adds nothing to the residual, holds no cache."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return torch.zeros_like(hidden_states), None


_ZERO = _ZeroAttention()


class WithoutAttention(nn.Module):
    """A view of ``block`` that runs it without its attention sub-block (``x + MLP(norm(x))``).

    The block is held, not registered: the view is for running a candidate stack (the engine, the
    held-out quality), never for saving; a saved model zeroes ``o_proj`` instead (``saved_block``).
    Other attributes (``attention_type``, ...) are read from the block."""

    def __init__(self, block: nn.Module, attn_module: str) -> None:
        super().__init__()
        object.__setattr__(self, "block", block)
        object.__setattr__(self, "attn_module", attn_module)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            block = self.__dict__.get("block")
            if block is None:
                raise
            return getattr(block, name)

    def forward(self, *args, **kwargs):
        block, name = self.block, self.attn_module
        saved = block._modules[name]
        block._modules[name] = _ZERO
        try:
            return block(*args, **kwargs)
        finally:
            block._modules[name] = saved


def has_attention(layer: nn.Module) -> bool:
    return not isinstance(layer, WithoutAttention)


def without_attention(layer: nn.Module, arch) -> nn.Module:
    return layer if isinstance(layer, WithoutAttention) else WithoutAttention(layer, arch.attn_module)


def single_source(entry: dict[int, float]) -> int | None:
    """The original layer a composition entry is, when it is one layer kept as it is."""
    if len(entry) == 1:
        ((i, w),) = entry.items()
        if w == 1.0:
            return int(i)
    return None


def positions(comp: Composition, attn_removed: Collection[int]) -> list[int]:
    """Indices in the stack ``comp`` (new numbering) of the layers whose attention is removed
    (``attn_removed``: original indices)."""
    gone = {int(i) for i in attn_removed}
    return [j for j, c in enumerate(comp) if single_source(c) in gone]


def stack(originals, comp: Composition, names, arch, attn_removed: Collection[int] = ()) -> list[nn.Module]:
    """The blocks of ``comp`` with the layers in ``attn_removed`` (original indices) run without attention."""
    layers = realize(originals, comp, names)
    for j in positions(comp, attn_removed):
        layers[j] = without_attention(layers[j], arch)
    return layers


def saved_block(block: nn.Module, arch) -> nn.Module:
    """A shallow view of ``block`` whose attention output projection is a real zero tensor (weight
    and bias), for building a saved model: its other tensors are the block's own (no copy, and an
    offloaded block's weights are still read through its hooks)."""
    view = copy.copy(block)
    view._modules = dict(block._modules)
    attn = copy.copy(block._modules[arch.attn_module])
    attn._modules = dict(attn._modules)
    zero = nn.Module()  # a fresh module: no accelerate hook that would read the real weights back in
    for name, p in attn._modules[ATTN_OUT]._parameters.items():
        if p is not None:
            dev = p.device if p.device.type != "meta" else torch.device("cpu")
            zero.register_parameter(name, nn.Parameter(torch.zeros(p.shape, dtype=p.dtype, device=dev), False))
    attn._modules[ATTN_OUT] = zero
    view._modules[arch.attn_module] = attn
    return view


def attention_param_names(block: nn.Module, arch) -> list[str]:
    """The block's parameters that belong to its attention sub-block: the attention module's
    (q, k, v, o and their biases) and the norm that only feeds it."""
    prefix = f"{arch.attn_module}."
    return [n for n, _ in block.named_parameters() if n.startswith(prefix) or n.split(".")[0] == ATTN_NORM]


def attention_modules(block: nn.Module, arch, targets: Iterable[str]) -> list[str]:
    """Names (relative to the block) of the modules among ``targets`` (last name parts, e.g. the
    LoRA targets) that sit in the attention sub-block."""
    want = set(targets)
    prefix = f"{arch.attn_module}."
    return [n for n, _ in block.named_modules() if n.startswith(prefix) and n.split(".")[-1] in want]


def kv_bytes(config, ref_context: int) -> int:
    """f16 K and V cache bytes of one attention layer at ``ref_context`` tokens."""
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
    n_kv = getattr(config, "num_key_value_heads", None) or heads
    return 2 * F16_BYTES * int(n_kv) * int(head_dim) * int(ref_context)


def unit_bytes(block: nn.Module, arch, config, ref_context: int) -> tuple[int, int]:
    """(attention unit, rest of the layer) reference bytes of one original block: F16 weights
    (2 bytes a parameter) and, with the attention, its f16 KV cache at ``ref_context`` tokens.
    Removing a whole layer that still has attention saves their sum; removing its attention saves
    the first; removing a layer whose attention is gone saves the second (MLP and its norm)."""
    params = dict(block.named_parameters())
    attn = set(attention_param_names(block, arch))
    attn_w = sum(params[n].numel() for n in attn)
    rest_w = sum(p.numel() for n, p in params.items() if n not in attn)
    return F16_BYTES * attn_w + kv_bytes(config, ref_context), F16_BYTES * rest_w
