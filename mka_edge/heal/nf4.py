"""QLoRA's frozen base: a loaded student's block linears swapped, one at a time, for
bitsandbytes NF4 layers (4-bit NormalFloat, 64-weight blocks, double-quantized scales: about
4.13 bits a weight), so an 8B student holds ~4 GB of block weights instead of ~14 GB in bf16.

Why in place and not ``from_pretrained(quantization_config=...)``: the heal measures the unhealed
model in its 16 bits first (the "before" figure is the model a build would otherwise export, not
its 4-bit copy), and swapping layer by layer never holds more than one extra layer.  The
embeddings, norms and output head stay in 16 bits, as in QLoRA.  The adapters trained on this base
are merged back into the *original* 16-bit weights, not into the 4-bit ones (``heal.distill``):
the export quantizes once, from the weights the merge made.
"""

from __future__ import annotations

import torch

from ..errors import UserError


def bitsandbytes():
    """The bitsandbytes module, or one line saying how to get it."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserError("--train qlora needs bitsandbytes: pip install bitsandbytes (or use --train lora)") from None
    return bnb


def nf4_bytes(weight) -> int:
    """Bytes bitsandbytes holds for one quantized weight: codes, 8-bit scales and their scales."""
    qs = weight.quant_state
    held = weight.numel() * weight.element_size() + qs.absmax.numel() * qs.absmax.element_size()
    if qs.nested:
        held += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
    return held


def quantize_linears(model, names: list[str], skip: list[str], compute_dtype: torch.dtype) -> int:
    """Swap every ``nn.Linear`` whose attribute name is in ``names`` (the arch's LoRA targets) for
    an NF4 ``Linear4bit`` on the same device, except the modules named in ``skip`` (full names:
    the attention of layers whose attention was removed, zero and frozen).  Returns the number of
    weights quantized."""
    bnb = bitsandbytes()
    skipped = set(skip)
    done = 0
    # names only: a list of the modules themselves would keep every 16-bit Linear alive to the end
    todo = [
        (parent_name, name)
        for parent_name, parent in model.named_modules()
        for name, child in parent.named_children()
        if name in names
        and isinstance(child, torch.nn.Linear)
        and (f"{parent_name}.{name}" if parent_name else name) not in skipped
    ]
    for parent_name, name in todo:
        parent = model.get_submodule(parent_name)
        child = getattr(parent, name)
        q = bnb.nn.Linear4bit(
            child.in_features,
            child.out_features,
            bias=child.bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=True,
            quant_type="nf4",
            device="meta",
        )
        w = child.weight.data
        q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True)
        if child.bias is not None:
            q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
        # bitsandbytes repacks a CPU weight in place for AVX512-BF16 inference at the first eval-mode
        # forward, after which training takes a path with no autograd kernel: an eval_every measure
        # would break the steps after it
        q.support_avx512bf16_for_cpu = False
        q = q.to(w.device)  # quantizes here
        setattr(parent, name, q)
        done += w.numel()
        del child, w, q
    # peft then wraps these as the plain nn.Linear subclass they are (the model is not flagged
    # "loaded in 4 bit"): training works, but its merge_and_unload would write into the packed
    # codes, so heal.distill merges the adapters into a fresh 16-bit load instead
    return done
