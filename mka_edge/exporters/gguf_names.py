"""HF -> GGUF tensor names: one place that the writer (gguf.py) and the importance matrix
(imatrix.py) both read, so neither imports the other."""

from __future__ import annotations

import gguf


def tensor_name_map(lm):
    """gguf-py's HF -> GGUF tensor-name map for this model's architecture and depth."""
    model_arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == lm.arch.gguf_arch)
    return gguf.get_tensor_name_map(model_arch, int(lm.model.config.num_hidden_layers))
