"""Turning a composition into a saved Hugging Face model directory with its merge log."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from ..cache import atomic_dir
from ..models.attention_removal import attention_removed, set_attention_removed
from ..models.loading import shard_size
from ..models.offload import is_dispatched, is_offloaded, lazy_from
from .attention import positions, saved_block
from .context import MergeContext
from .fusion import Composition, describe, realize
from .layers import temporary_stack

OFFLOADED_SHARD = "2GB"


def attention_free(ctx: MergeContext, comp: Composition, attn_removed=()) -> list[int]:
    """Layers of the stack ``comp`` (its numbering) without attention: the original layers in
    ``attn_removed`` and any the source model had already lost (its config lists them)."""
    return positions(comp, set(attention_removed(ctx.model.config)) | {int(i) for i in attn_removed})


def build_model(ctx: MergeContext, comp: Composition, attn_removed=()):
    """A standalone model (new config, its own tensors) whose blocks follow ``comp``, the original
    layers in ``attn_removed`` (and any the source had lost) without attention: their ``o_proj``
    zero (new tensors; the working model's are untouched) and the config listing them in the new
    numbering (``models.attention_removal``).

    When the working model is placed by accelerate (--max-memory), the new one holds no copy: its
    weights are read from the working model's blocks (and the fused ones) through accelerate's
    hooks, one tensor at a time, when it is saved (``save_merged``), so saving needs no room for
    the model on any device (only a shard's worth of CPU RAM)."""
    layers = realize(ctx.originals, comp, ctx.names)
    no_attn = attention_free(ctx, comp, attn_removed)
    for j in no_attn:
        layers[j] = saved_block(layers[j], ctx.arch)
    config = copy.deepcopy(ctx.model.config)
    config.num_hidden_layers = len(comp)
    set_attention_removed(config, no_attn)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[min(c)] for c in comp]
    with torch.device("meta"):
        new = AutoModelForCausalLM.from_config(config, dtype=ctx.model.dtype)
    if is_dispatched(ctx.model):  # placed by accelerate (--max-memory): no second copy, on any device
        new.tie_weights()
        with temporary_stack(ctx.model, ctx.arch, layers):
            lazy_from(new, ctx.model)
        return new.eval()
    with temporary_stack(ctx.model, ctx.arch, layers):
        # shared, not cloned: the new model is only saved (never trained or changed), and a clone
        # held a second copy of the whole model at the merge's peak
        state = {k: v.detach() for k, v in ctx.model.state_dict().items()}
    new.load_state_dict(state, strict=False, assign=True)
    new.tie_weights()
    missing = [n for n, p in new.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"merged model lacks tensors: {missing[:5]}")
    return new.eval()


def save_merged(model, tokenizer, log: dict, out: Path, extra: dict[str, str] | None = None) -> Path:
    """Write config, safetensors, tokenizer and merge_log.json (and the ``extra`` text files, e.g. a
    heal's log, so they are in the folder when it appears); nothing appears at ``out`` on failure."""
    # an offloaded model is saved shard by shard, each shard whole in CPU RAM first: keep them small
    shards = {"max_shard_size": OFFLOADED_SHARD if is_offloaded(model) else shard_size(model)}
    with atomic_dir(Path(out)) as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded modules")
        model.save_pretrained(tmp, safe_serialization=True, **shards)
        tokenizer.save_pretrained(tmp)
        (tmp / "merge_log.json").write_text(json.dumps(log, indent=2))
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
    return Path(out)


def layer_map(comp: Composition) -> list[dict]:
    return describe(comp)
