"""GGUF of a model whose layers have lost their attention sub-block: llama.cpp's ``deci``
architecture, written by the same streaming writer as a plain llama (``gguf.py``).

llama.cpp's ``deci`` (Llama-3_1-Nemotron) reads the head counts per layer
(``deci.attention.head_count`` / ``head_count_kv`` arrays).  A layer with both 0 holds no
``blk.N.attn_*`` tensor (not even ``attn_norm``) and computes ``x + FFN(ffn_norm(x))``, which is
what the Hugging Face model (zero ``o_proj``, see ``models/attention_removal.py``) computes.  Layer 0
must keep its attention: llama.cpp takes the head size from layer 0's head count.  Everything else
(tokenizer, rope, norms, tied output, tensor names) is the llama layout under the ``deci`` key prefix.
llama.cpp's own converter is not used: it does not handle every vocabulary (SmolLM2's) for ``deci``.
"""

from __future__ import annotations

from mka_edge.errors import UserError
from mka_edge.models.attention_removal import attention_removed


def gguf_arch_name(config, spec) -> str:
    """The llama.cpp architecture this model is written as: the spec's own, or its attention-free
    variant when some layers have lost their attention (UserError when that cannot be written)."""
    removed = attention_removed(config)
    if not removed:
        return spec.gguf_arch
    if spec.gguf_attention_free_arch is None:
        raise UserError(
            f"layers {removed} have no attention, and llama.cpp has no architecture for a {spec.name} model "
            "without attention in some layers; GGUF export supports that for llama models only"
        )
    if removed[0] == 0:
        raise UserError(
            "layer 0 has no attention; llama.cpp's deci architecture reads the head size from layer 0, "
            "so a GGUF needs layer 0 to keep its attention"
        )
    if removed[-1] >= int(config.num_hidden_layers):
        raise UserError(
            f"config lists layer {removed[-1]} without attention, but the model has "
            f"{config.num_hidden_layers} layers; the config is inconsistent"
        )
    return spec.gguf_attention_free_arch


def per_layer_heads(config, n_head: int, n_kv: int) -> tuple[list[int], list[int]] | None:
    """(head counts, KV head counts) per layer, 0 for layers without attention; None when every
    layer keeps its attention (the scalar keys then say it all)."""
    removed = set(attention_removed(config))
    if not removed:
        return None
    layers = range(int(config.num_hidden_layers))
    return [0 if i in removed else n_head for i in layers], [0 if i in removed else n_kv for i in layers]


def drops_tensor(config, gguf_name: str) -> bool:
    """Whether a tensor (by its GGUF name) belongs to a removed attention sub-block: ``blk.N.attn_*``
    (norm, q, k, v, output, their biases) of a layer without attention, absent from a deci file."""
    if not gguf_name.startswith("blk."):
        return False
    layer, _, rest = gguf_name[4:].partition(".")
    return rest.startswith("attn_") and layer.isdigit() and int(layer) in set(attention_removed(config))
