"""Attention-only removal as model data: which layers of a model have lost their attention
sub-block, and how that is written into a Hugging Face model so plain ``transformers`` still loads
and runs it (no remote code).

A layer without attention computes ``x + MLP(post_attention_norm(x))``.  In a stock llama block
that is exactly what happens when the attention's output projection (``o_proj`` weight and bias)
is zero: the attention adds nothing to the residual.  So a removed attention sub-block is kept in
the folder with a zero ``o_proj`` (transformers runs it and adds zeros), and the config lists the
layers under ``ATTR``; the GGUF exporter drops those blocks' attention tensors and writes the model
as llama.cpp's ``deci`` architecture (per-layer head counts, 0 for these layers), healing keeps
them frozen at zero, and the memory model counts KV cache only for layers that keep attention.

Layer indices are those of the model as it stands (after any whole-layer removal).  Layer 0 never
loses its attention: llama.cpp's ``deci`` reads the head size from layer 0.
"""

from __future__ import annotations

ATTR = "mka_edge_attention_removed"


def attention_removed(config) -> list[int]:
    """Sorted indices of the layers of this model whose attention sub-block was removed."""
    return sorted(int(i) for i in (getattr(config, ATTR, None) or []))


def set_attention_removed(config, layers) -> None:
    """Record the layers without attention on a config (written to config.json by save_pretrained)."""
    layers = sorted({int(i) for i in layers})
    if layers:
        setattr(config, ATTR, layers)
    elif hasattr(config, ATTR):
        delattr(config, ATTR)


def attention_layers(config) -> int:
    """How many layers keep attention (and so a KV cache)."""
    return int(config.num_hidden_layers) - len(attention_removed(config))
