"""What a heal trains.  ``all``: every parameter (the measured default: 60 steps took SmolLM2
K=6 from KL 0.97 to 0.69).  ``changed``: only the layers a merge touched — a fused layer, and the
two layers on each side of a removed one — since the rest still compute what they were trained
to.  ``lora``: low-rank adapters on every linear layer of every block, merged back afterwards,
so the healed folder is a plain model and optimizer state stays small on large models.
``qlora``: the same adapters over a 4-bit NF4 copy of those linears (``heal/nf4.py``), trained
against the teacher's cached top-k log-probs (``heal/teacher.py``); the adapters are then merged
into the original 16-bit weights.  What lets an 8B heal fit a 24 GB GPU.

Layers whose attention was removed (``models.attention_removal``: zero ``o_proj``, listed in the
config) keep it removed whatever trains: their attention parameters (q, k, v, o, biases and the
norm feeding them) never train and LoRA adapts none of those linears, so their ``o_proj`` stays
exactly zero and a GGUF that drops those blocks computes what the healed model computes."""

from __future__ import annotations

from peft import LoraConfig, get_peft_model

from ..errors import UserError
from ..heal_modes import MODES
from ..mka.attention import attention_modules, attention_param_names
from ..models.architectures import ArchSpec, arch_for
from ..models.attention_removal import attention_removed
from .nf4 import quantize_linears


def changed_layers(
    layer_map: list[dict], n_layers: int, n_original: int | None = None, no_attention: list[int] = ()
) -> list[int]:
    """Indices (in the merged model) of fused layers and of the layers beside every gap left by a
    removed layer, with their neighbours.  A removed first layer touches the new first layer; a
    removed last layer (``n_original`` says there was one) the new last layer.  A layer that lost
    its attention (``no_attention``, merged numbering) counts as changed, with its neighbours."""
    touched: set[int] = {j for i in no_attention for j in (i - 1, i, i + 1)}
    if layer_map and min(layer_map[0]["sources"]) > 0:
        touched.add(0)
    if layer_map and n_original is not None and max(layer_map[-1]["sources"]) < n_original - 1:
        touched.add(len(layer_map) - 1)
    prev_last = None
    for i, entry in enumerate(layer_map):
        src = sorted(entry["sources"])
        if len(src) > 1 or any(abs(w - 1.0) > 1e-9 for w in entry.get("weights", [1.0])):
            touched.update({i - 1, i, i + 1})
        if prev_last is not None and src[0] > prev_last + 1:  # a removed layer sat between i-1 and i
            touched.update({i - 1, i})
        prev_last = src[-1]
    return sorted(t for t in touched if 0 <= t < n_layers)


def select(
    model,
    mode: str,
    layer_map: list[dict] | None,
    lora_rank: int = 16,
    n_original: int | None = None,
    arch: ArchSpec | None = None,
) -> tuple[object, list[str]]:
    """Return the model to train (wrapped for LoRA) and a description of what trains.  Module names
    come from ``arch`` (default: the table entry for the model's config), not from this file."""
    if mode not in MODES:
        raise UserError(f"unknown --train '{mode}'; choose one of {', '.join(MODES)}")
    no_attn = attention_removed(model.config)
    if mode != "all" or no_attn:
        arch = arch or arch_for(model.config.model_type)
    layers = arch.layers(model) if arch is not None else None
    kept = f"; attention of layers {no_attn} stays removed (frozen at zero)" if no_attn else ""
    if mode in ("lora", "qlora"):
        targets = list(arch.lora_targets)
        prefix = arch.layers_path
        skip = [f"{prefix}.{i}.{name}" for i in no_attn for name in attention_modules(layers[i], arch, targets)]
        base = ""
        if mode == "qlora":
            dtype = next(model.parameters()).dtype
            n = quantize_linears(model, targets, skip, dtype)
            base = f" over an NF4 base ({n / 1e6:.1f}M weights in 4 bits, computing in {str(dtype).removeprefix('torch.')})"
        cfg = LoraConfig(
            r=lora_rank,
            lora_alpha=2 * lora_rank,
            lora_dropout=0.0,
            target_modules=targets,
            exclude_modules=skip or None,
            bias="none",
            task_type="CAUSAL_LM",
        )
        wrapped = get_peft_model(model, cfg)
        return wrapped, [f"LoRA rank {lora_rank} on {', '.join(targets)}{base}{kept}"]
    for p in model.parameters():
        p.requires_grad_(mode == "all")
    if mode == "all":
        _freeze_removed_attention(layers, no_attn, arch)
        return model, ["all parameters" + kept]
    if not layer_map:
        raise UserError(
            "--train changed needs the merge's layer map (merge_log.json beside the model); use --train all or lora"
        )
    idx = changed_layers(layer_map, len(layers), n_original, no_attn)
    if not idx:
        raise UserError("the merge changed no layer (K=0?); nothing to heal with --train changed; use --train all")
    for i in idx:
        for p in layers[i].parameters():
            p.requires_grad_(True)
    _freeze_removed_attention(layers, no_attn, arch)
    return model, [f"layers {idx} (changed by the merge, with neighbours){kept}"]


def _freeze_removed_attention(layers, no_attn: list[int], arch: ArchSpec) -> None:
    """The attention parameters of the layers without attention never train (their o_proj stays zero)."""
    for i in no_attn:
        params = dict(layers[i].named_parameters())
        for name in attention_param_names(layers[i], arch):
            params[name].requires_grad_(False)
