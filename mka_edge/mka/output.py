"""Turning a composition into a saved Hugging Face model directory with its merge log."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from ..cache import atomic_dir
from .context import MergeContext
from .fusion import Composition, describe, realize
from .layers import temporary_stack


def build_model(ctx: MergeContext, comp: Composition):
    """A standalone model (new config, its own tensors) whose blocks follow ``comp``."""
    layers = realize(ctx.originals, comp, ctx.names)
    with temporary_stack(ctx.model, ctx.arch, layers):
        state = {k: v.detach().clone() for k, v in ctx.model.state_dict().items()}
    config = copy.deepcopy(ctx.model.config)
    config.num_hidden_layers = len(comp)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[min(c)] for c in comp]
    with torch.device("meta"):
        new = AutoModelForCausalLM.from_config(config, dtype=ctx.model.dtype)
    new.load_state_dict(state, strict=False, assign=True)
    new.tie_weights()
    missing = [n for n, p in new.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"merged model lacks tensors: {missing[:5]}")
    return new.eval()


def save_merged(model, tokenizer, log: dict, out: Path) -> Path:
    """Write config, safetensors, tokenizer and merge_log.json; nothing appears at ``out`` on failure."""
    with atomic_dir(Path(out)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "merge_log.json").write_text(json.dumps(log, indent=2))
    return Path(out)


def layer_map(comp: Composition) -> list[dict]:
    return describe(comp)
