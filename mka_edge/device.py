"""Choosing where the tensor work runs."""

from __future__ import annotations

import torch

from .errors import UserError


def resolve_device(name: str = "auto") -> torch.device:
    """Map ``auto|cpu|cuda[:N]`` to a torch device, refusing CUDA when there is none."""
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but no CUDA GPU is visible to torch; use --device cpu or auto")
        return torch.device(name)
    raise UserError(f"unknown device '{name}': use auto, cpu or cuda")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """float32 on the CPU (quality figures are measured there); bfloat16 on CUDA unless asked."""
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in table:
        raise UserError(f"unknown dtype '{name}': use auto, float32, bfloat16 or float16")
    return table[name]
