"""Importance matrix for llama.cpp's low-bit types, computed in PyTorch on the calibration set.

llama.cpp weighs each input column of a weight by the mean squared activation that reaches it
(what its ``llama-imatrix`` tool collects); we collect the same statistic with forward hooks on
every linear layer and hand it to llama.cpp's quantizer under the GGUF tensor names.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mka_edge.calibration import calibration_batch

from .gguf_names import tensor_name_map


@torch.no_grad()
def compute_imatrix(
    lm, out: Path, calibration: str | None = None, samples: int = 16, seq_len: int = 256, progress: bool = True
) -> dict[str, int]:

    config = lm.model.config
    tmap = tensor_name_map(lm)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for mod_name, mod in lm.model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        if mod_name == lm.arch.output_head and getattr(config, "tie_word_embeddings", False):
            continue  # the tied embedding is token_embd, which llama.cpp reads by rows
        gguf_name = tmap.get_name(f"{mod_name}.weight", try_suffixes=(".weight",))
        if gguf_name is None:
            continue

        def hook(_m, args, _out, key=gguf_name):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[key] = sums.get(key, 0) + (x * x).sum(0)
            counts[key] = counts.get(key, 0) + x.shape[0]

        hooks.append(mod.register_forward_hook(hook))
    batch, _ = calibration_batch(lm.tokenizer, calibration, samples, seq_len, seed=0)
    device = next(lm.model.parameters()).device
    try:
        for row in tqdm(batch, desc="importance matrix", disable=not progress, leave=False):
            lm.model(input_ids=row[None].to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    arrays = {k: (sums[k] / counts[k]).cpu().numpy().astype(np.float32) for k in sums}
    np.savez(out, **arrays)
    return {k: v.size for k, v in arrays.items()}
