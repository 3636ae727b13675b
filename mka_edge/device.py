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


def resolve_dtype(name: str, device: torch.device, sixteen_bit: torch.dtype | None = None) -> torch.dtype:
    """float32 on the CPU (quality figures are measured there); bfloat16 on CUDA unless asked.
    ``sixteen_bit``: on the CPU, the checkpoint's own 16-bit type, for a model whose float32 copy
    does not fit the host (``host_need.check_load`` decides): computed as stored, never widened."""
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        return sixteen_bit or torch.float32
    if name not in table:
        raise UserError(f"unknown dtype '{name}': use auto, float32, bfloat16 or float16")
    return table[name]


# --max-memory: accelerate's ``max_memory`` (GPU index or "cpu" -> bytes), parsed and checked here,
# once, before any model loads.  The CLI records it for the process (every command that loads a
# model, the exporters and validation's reference included, then places weights by it).
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_EXAMPLE = 'e.g. --max-memory "cuda:0=20GiB,cpu=16GiB"'
_max_memory: dict | None = None


def parse_size(text: str, where: str = "size") -> int:
    """Bytes in ``20GiB``, ``500MB``, ``1.5GB`` (KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB of 1024)."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", text or "")
    if not m:
        raise UserError(f"{where}: '{text}' is not a size; write a number and a unit such as 20GiB, 500MB or 1.5GB")
    unit = m.group(2).lower()
    if not unit:
        raise UserError(f"{where}: '{text}' has no unit; write e.g. {text.strip()}GiB or {text.strip()}MB")
    if unit not in _UNITS:
        raise UserError(
            f"{where}: unknown unit '{m.group(2)}' in '{text}'; use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB"
        )
    return int(float(m.group(1)) * _UNITS[unit])


def format_size(n: int) -> str:
    """A size --max-memory accepts, rounded up (so it is at least ``n``): 145KiB, 14.3GiB."""
    import math

    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            v = n / scale
            return f"{math.ceil(v)}{unit}" if v >= 100 else f"{math.ceil(v * 10) / 10:g}{unit}"
    return f"{n}B"


def device_label(key) -> str:
    """How --max-memory names an accelerate device key: cuda:0, cpu."""
    return f"cuda:{key}" if isinstance(key, int) else str(key)


def parse_max_memory(text) -> dict | None:
    """``"cuda:0=20GiB,cpu=16GiB"`` -> accelerate's ``{0: 21474836480, "cpu": 17179869184}``.

    None or empty -> None (no cap: the model loads whole onto one device, as without the option).
    A dict (already parsed, or written by hand with accelerate's keys) is checked the same way.
    GPUs must exist; sizes need a unit; every error is one line."""
    if text is None:
        return None
    if isinstance(text, dict):
        if not text:
            return None
        items = [(device_label(k), v if isinstance(v, str) else f"{int(v)}B") for k, v in text.items()]
    else:
        text = str(text).strip()
        if not text:
            return None
        items = []
        for part in text.split(","):
            if "=" not in part:
                raise UserError(f"--max-memory: '{part.strip()}' is not DEVICE=SIZE; {_EXAMPLE}")
            name, size = part.split("=", 1)
            items.append((name.strip(), size.strip()))
    out: dict = {}
    for name, size in items:
        key = _device_key(name.lower())
        if key in out:
            raise UserError(f"--max-memory names {device_label(key)} twice; give each device once")
        out[key] = parse_size(size, f"--max-memory {device_label(key)}")
    gpus = sorted(k for k in out if isinstance(k, int))
    main = gpus[0] if gpus else "cpu"
    if out.get(main, 0) <= 0:
        raise UserError(
            f"--max-memory {device_label(main)}=0: the device that runs the model needs room for at least one layer"
        )
    return {k: out[k] for k in gpus + (["cpu"] if "cpu" in out else [])}


def _device_key(name: str):
    if name == "cpu":
        return "cpu"
    if name == "cuda" or name.startswith("cuda:") or name.isdigit():
        idx = name.split(":", 1)[1] if ":" in name else ("0" if name == "cuda" else name)
        if not idx.isdigit():
            raise UserError(f"--max-memory: '{name}' is not a device; use cpu, cuda or cuda:N ({_EXAMPLE})")
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if int(idx) >= n:
            have = f"GPUs cuda:0 to cuda:{n - 1}" if n > 1 else ("one GPU, cuda:0" if n == 1 else "no CUDA GPU")
            raise UserError(f"--max-memory names cuda:{idx} but torch sees {have}; name only devices that exist")
        return int(idx)
    raise UserError(f"--max-memory: unknown device '{name}'; use cpu, cuda or cuda:N ({_EXAMPLE})")


def main_device(max_memory: dict) -> torch.device:
    """Where a model placed by ``max_memory`` runs (accelerate's main device): its first GPU, else the CPU.
    Inputs go there; offloaded weights are brought there layer by layer."""
    gpus = sorted(k for k in max_memory if isinstance(k, int))
    return torch.device("cuda", gpus[0]) if gpus else torch.device("cpu")


def check_placement(device: str | None, max_memory: dict | None) -> None:
    """--device and --max-memory must agree: with a cap, the devices it names are the ones used."""
    if not max_memory:
        return
    name = (device or "auto").lower()
    gpus = [k for k in max_memory if isinstance(k, int)]
    if name == "cpu" and gpus:
        raise UserError(
            f"--device cpu but --max-memory gives room on {device_label(gpus[0])}; drop the GPU from --max-memory "
            "or use --device auto"
        )
    if name.startswith("cuda") and not gpus:
        raise UserError(
            f"--device {name} but --max-memory names no GPU, so the model would run on the CPU; add e.g. cuda:0=20GiB"
        )


def set_max_memory(max_memory: dict | None) -> None:
    """The process's cap (set by the CLI's --max-memory): what ``load_model`` uses unless told otherwise."""
    global _max_memory
    _max_memory = dict(max_memory) if max_memory else None


def current_max_memory() -> dict | None:
    return dict(_max_memory) if _max_memory else None
