"""Models larger than the device: placement by Hugging Face accelerate's big-model machinery.

With ``--max-memory`` a model loads with ``device_map="auto"``: accelerate fills the named GPUs,
then the CPU, then the disk (the weights stay in their safetensors files, or in a per-process
folder under the mka-edge cache), and its hooks bring each offloaded layer's weights to the
execution device for its forward pass.  This module holds what the rest of mka-edge needs on top:
the cap check before loading, real tensors out of offloaded modules (one module at a time), and
placing a fused block beside the block it replaces.  No scheduling of our own.
"""

from __future__ import annotations

import atexit
import copy
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from torch import nn

from ..cache import cache_root
from ..device import device_label, format_size, main_device
from ..errors import UserError

_ROOT: Path | None = None


def offload_root() -> Path:
    """This process's offload folder under the mka-edge cache, removed when the process exits."""
    global _ROOT
    if _ROOT is None or not _ROOT.is_dir():
        base = cache_root() / "offload"
        base.mkdir(parents=True, exist_ok=True)
        _ROOT = Path(tempfile.mkdtemp(prefix="run-", dir=base))
        atexit.register(shutil.rmtree, _ROOT, True)
    return _ROOT


def new_offload_dir(prefix: str) -> Path:
    """A fresh folder for one model's (or one fused block's) offloaded weights."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=offload_root()))


# ------------------------------------------------------------------ the cap check, before loading


def block_sizes(config, arch, dtype: torch.dtype) -> dict[str, int]:
    """Bytes of each decoder block at ``dtype``, from a meta-device model built from the config (no weights)."""
    from accelerate import init_empty_weights
    from accelerate.utils import compute_module_sizes
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(config, dtype=dtype)
    sizes = compute_module_sizes(meta, dtype=dtype)
    return {f"{arch.layers_path}.{i}": int(sizes[f"{arch.layers_path}.{i}"]) for i in range(len(arch.layers(meta)))}


def check_cap(config, arch, dtype: torch.dtype, max_memory: dict) -> None:
    """Refuse, in one line naming the smallest cap that works, a cap that cannot hold one decoder block.

    The main device (the first GPU named, else the CPU) runs every block, offloaded ones included,
    so it needs room for the largest; another device may be given 0 (keep weights off it) but a
    cap between 0 and one block is refused too, as almost surely a slip of the unit."""
    sizes = block_sizes(config, arch, dtype)
    name, need = max(sizes.items(), key=lambda kv: kv[1])
    main = main_device(max_memory)
    main_key = "cpu" if main.type == "cpu" else main.index
    for key, cap in max_memory.items():
        if cap >= need or (cap == 0 and key != main_key):
            continue
        label = device_label(key)
        tail = "" if key == main_key else ", or 0 to keep weights off it"
        raise UserError(
            f"--max-memory {label}={format_size(cap)} cannot hold one layer of this model ({name} takes "
            f"{format_size(need)} in {str(dtype).removeprefix('torch.')}); give {label} at least {format_size(need)}{tail}"
        )


# ------------------------------------------------------------------ real tensors from offloaded modules


def is_offloaded(model: nn.Module) -> bool:
    """Whether any weight of ``model`` lives off its execution device (CPU RAM under a GPU, or disk)."""
    from accelerate.utils import has_offloaded_params

    return any(has_offloaded_params(m) for m in model.modules())


def is_dispatched(model: nn.Module) -> bool:
    """Whether accelerate's hooks place ``model`` (several devices, or offload)."""
    return any(hasattr(m, "_hf_hook") for m in model.modules())


@contextmanager
def materialized(module: nn.Module, device: torch.device | str = "cpu"):
    """Within the block, every offloaded weight of ``module`` (and its submodules) is a real tensor on
    ``device``, brought in by the module's own accelerate hooks; outside it they go back to meta."""
    from accelerate.utils import align_module_device, has_offloaded_params

    with ExitStack() as stack:
        for m in module.modules():
            if has_offloaded_params(m):
                stack.enter_context(align_module_device(m, device))
        yield module


def _direct_tensors(module: nn.Module, with_non_persistent: bool = False):
    yield from module.named_parameters(recurse=False)
    for name, buf in module.named_buffers(recurse=False):
        if buf is not None and (with_non_persistent or name not in module._non_persistent_buffers_set):
            yield name, buf


def named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, CPU tensor) of every ``state_dict`` entry, in its order.  A model placed by accelerate
    gives real tensors made one module at a time (offloaded ones brought in by its hooks), never a
    second copy of the whole model; a model on the CPU gives its own tensors (no copy)."""
    if not is_dispatched(model):
        for name, t in model.state_dict().items():
            yield name, t.to("cpu")
        return
    for prefix, module in model.named_modules(remove_duplicate=False):
        if not any(True for _ in _direct_tensors(module)):
            continue
        with materialized(module, "cpu"):
            got = [(f"{prefix}.{n}" if prefix else n, t.detach().to("cpu")) for n, t in _direct_tensors(module)]
        yield from got


class SourceTensors(Mapping):
    """A lazy name -> CPU tensor map over modules of another (offloaded) model: what the hooks of a
    merged model read its weights from, so saving it streams from the working model one tensor at
    a time."""

    def __init__(self, model: nn.Module) -> None:
        self._where: dict[str, tuple[nn.Module, str]] = {}
        for prefix, module in model.named_modules(remove_duplicate=False):
            for n, _ in _direct_tensors(module, with_non_persistent=True):
                self._where[f"{prefix}.{n}" if prefix else n] = (module, n)

    def __getitem__(self, key: str) -> torch.Tensor:
        module, n = self._where[key]
        with materialized(module, "cpu"):
            return getattr(module, n).detach().to("cpu").clone()

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def lazy_from(new: nn.Module, source: nn.Module) -> nn.Module:
    """Make ``new`` (built on the meta device, same tensor names as ``source``) read its weights from
    ``source`` through accelerate's offload hooks.  Buffers are copied (small); parameters are read
    when used or saved (``save_pretrained`` saves an offloaded model shard by shard)."""
    from accelerate.hooks import attach_align_device_hook
    from accelerate.utils import set_module_tensor_to_device

    tensors = SourceTensors(source)
    for name, _ in list(new.named_buffers()):
        if name in tensors:
            set_module_tensor_to_device(new, name, "cpu", value=tensors[name])
    attach_align_device_hook(new, execution_device=torch.device("cpu"), offload=True, weights_map=tensors)
    new.hf_device_map = {"": "disk"}  # tells save_pretrained the weights are offloaded
    return new


# ------------------------------------------------------------------ fused blocks


def _home(block: nn.Module) -> tuple[str, torch.device]:
    """Where ``block``'s weights live: ("resident", device), ("cpu", execution device) when they
    wait in CPU RAM, or ("disk", execution device)."""
    from accelerate.utils import has_offloaded_params
    from accelerate.utils.offload import OffloadedWeightsLoader, PrefixedDataset

    for m in block.modules():
        if has_offloaded_params(m):
            hook = m._hf_hook
            exec_dev = torch.device(hook.execution_device if hook.execution_device is not None else "cpu")
            wm = hook.weights_map
            name = next(iter(n for n, _ in m.named_parameters(recurse=False)), None)
            if exec_dev.type != "cpu" and isinstance(wm, PrefixedDataset) and name is not None:
                loader = wm.dataset
                key = wm.prefix + name
                if not isinstance(loader, OffloadedWeightsLoader) or key in loader.state_dict:
                    return "cpu", exec_dev
            return "disk", exec_dev
    p = next(iter(block.parameters()), None)
    return "resident", (p.device if p is not None else torch.device("cpu"))


def _copy_without_hooks(block: nn.Module) -> nn.Module:
    """``copy.deepcopy`` of a block without its accelerate hooks (and their weights maps)."""
    saved = []
    for m in block.modules():
        if "_hf_hook" in m.__dict__:
            saved.append(
                (m, {k: m.__dict__.pop(k) for k in ("_hf_hook", "_old_forward", "forward") if k in m.__dict__})
            )
    try:
        return copy.deepcopy(block)
    finally:
        for m, attrs in saved:
            m.__dict__.update(attrs)


@torch.no_grad()
def realize_offloaded(originals, items: list[tuple[int, float]], names) -> nn.Module:
    """The fused block sum_i c_i * theta_i when the model is placed by accelerate: each source
    block's weights are brought in by its hooks, one source at a time, and the new block goes
    where the block it replaces (the first source) lives: resident on its device, in CPU RAM or
    on disk, run on the same execution device."""
    from accelerate import cpu_offload, disk_offload
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module
    from accelerate.utils import offload_state_dict

    base = originals[items[0][0]]
    where, dev = _home(base)
    acc_dev = dev if where == "resident" else torch.device("cpu")
    new = _copy_without_hooks(base)
    dtypes = {n: p.dtype for n, p in new.named_parameters()}
    acc = {
        n: torch.zeros(p.shape, dtype=torch.float32, device=acc_dev) for n, p in new.named_parameters() if n in names
    }
    for idx, c in items:
        with materialized(originals[idx], acc_dev):
            params = dict(originals[idx].named_parameters())
            for n in acc:
                acc[n] += c * params[n].to(acc_dev, torch.float32)
    state = {n: a.to(dtypes[n]) for n, a in acc.items()}
    del acc
    if where == "resident":
        params = dict(new.named_parameters())
        for n, t in state.items():
            params[n].copy_(t)
        add_hook_to_module(new, AlignDevicesHook(execution_device=dev, place_submodules=True))
        return new
    if where == "cpu":
        return cpu_offload(new, execution_device=dev, state_dict=state)
    folder = new_offload_dir("fused-")
    offload_state_dict(str(folder), state)
    del state
    disk_offload(new, str(folder), execution_device=dev)
    weakref.finalize(new, shutil.rmtree, str(folder), True)
    return new
