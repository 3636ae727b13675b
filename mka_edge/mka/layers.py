"""Access to a model's block list, and running part of the stack from a cached hidden state.

Why: candidate fusions change one place in the stack, so their loss can be measured by
running from the hidden state that enters that place instead of re-running the whole model.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def _resolve(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def base_model(model, arch):
    """The decoder without its LM head (runs the blocks; cheaper when logits are not needed)."""
    parent = arch.layers_path.rpartition(".")[0]
    return _resolve(model, parent) if parent else model


def get_layers(model, arch) -> nn.ModuleList:
    return arch.layers(model)


def set_layers(model, arch, layers: list[nn.Module]) -> None:
    """Install ``layers`` as the model's block stack and keep config and cache indices consistent."""
    parent_path, _, attr = arch.layers_path.rpartition(".")
    parent = _resolve(model, parent_path) if parent_path else model
    setattr(parent, attr, nn.ModuleList(layers))
    model.config.num_hidden_layers = len(layers)
    for i, layer in enumerate(layers):
        attn = getattr(layer, arch.attn_module, None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = i


@contextmanager
def temporary_stack(model, arch, layers: list[nn.Module]):
    """Run the model with a different block stack, restoring the original afterwards."""
    parent_path, _, attr = arch.layers_path.rpartition(".")
    parent = _resolve(model, parent_path) if parent_path else model
    saved, saved_n = getattr(parent, attr), model.config.num_hidden_layers
    setattr(parent, attr, nn.ModuleList(layers))
    model.config.num_hidden_layers = len(layers)
    try:
        yield
    finally:
        setattr(parent, attr, saved)
        model.config.num_hidden_layers = saved_n


@torch.no_grad()
def layer_inputs(model, arch, input_ids: torch.Tensor | None, hidden: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Hidden state entering each block (and, last, leaving the final block) for ``input_ids``, or
    for ``hidden`` fed in place of the embeddings.

    All on the device of the input: with a model spread over several GPUs by accelerate each
    block runs on its own, and the states are fed back into the stack from there."""
    layers = get_layers(model, arch)
    captured: list[torch.Tensor] = []
    home = (input_ids if input_ids is not None else hidden).device

    def hook(_mod, args, kwargs):
        hs = args[0] if args else kwargs["hidden_states"]
        captured.append(hs.detach().to(home))

    def out_hook(_mod, _args, output):
        captured.append((output[0] if isinstance(output, tuple) else output).detach().to(home))

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
    handles.append(layers[-1].register_forward_hook(out_hook))
    try:
        feed = {"input_ids": input_ids} if input_ids is not None else {"inputs_embeds": hidden}
        base_model(model, arch)(**feed, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return captured
