"""Importance matrix for llama.cpp's quantizer, computed in PyTorch on the calibration set.

llama.cpp weighs each input column of a weight by the mean squared activation that reaches it
(what its ``llama-imatrix`` tool collects); we collect the same statistic with forward hooks on
every linear layer and hand it to llama.cpp's quantizer under the GGUF tensor names.

``imatrix_for`` computes it once per (weights, block stack, calibration tokens, sample settings)
and keeps it in the cache: a plan's probe and the build's export of the same model share it, and a
merged model gets its own (its fingerprint and its stack differ from the unmerged model's).
The cached file is an ``.npz`` of {GGUF tensor name: float32 column means} plus ``__meta__``
(JSON: dataset, chunks, ...) that the quantizer child writes into the GGUF as llama.cpp's
``quantize.imatrix.*`` provenance.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mka_edge.cache import cache_root, entry_lock, stable_hash
from mka_edge.calibration import calibration_batch

from .gguf_names import tensor_name_map

IMATRIX_VERSION = 1
DEFAULT_SAMPLES = 16
DEFAULT_SEQ_LEN = 256
META_KEY = "__meta__"  # not a tensor: the child skips names that start with "__"


@torch.no_grad()
def _imatrix_arrays(lm, batch: torch.Tensor, progress: bool) -> dict[str, np.ndarray]:
    """{GGUF name: mean squared input activation per column} over the rows of ``batch``."""
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
    device = lm.input_device  # not next(parameters()): that is meta under disk offload
    try:
        for row in tqdm(batch, desc="importance matrix", disable=not progress, leave=False):
            lm.model(input_ids=row[None].to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {k: (sums[k] / counts[k]).cpu().numpy().astype(np.float32) for k in sums}


def compute_imatrix(
    lm,
    out: Path,
    calibration: str | None = None,
    samples: int = DEFAULT_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    progress: bool = True,
) -> dict[str, int]:
    """Compute the matrix (uncached) into ``out`` (.npz); returns {GGUF name: columns}."""
    batch, spec = calibration_batch(lm.tokenizer, calibration, samples, seq_len, seed=0)
    arrays = _imatrix_arrays(lm, batch, progress)
    _save(Path(out), arrays, _meta(spec, arrays, ""))
    return {k: v.size for k, v in arrays.items()}


def stack_signature(lm) -> list:
    """What ``lm.fingerprint`` does not cover: the block stack as it is in memory.  The fingerprint
    is the weights' identity as loaded; a merge applied in place (the planner's MergeContext swaps
    fused blocks into the loaded model) keeps it.  Per live block: its parameter names and a
    checksum of the first few thousand values of its first resident weight (offloaded weights are
    on the meta device and count by name only)."""
    sig = []
    for layer in lm.arch.layers(lm.model):
        names, check = [], None
        for name, p in layer.named_parameters():
            names.append(name)
            if check is None and p.dim() >= 2 and p.device.type != "meta":
                head = p.detach().reshape(-1)[:4096].double()
                check = [f"{float(head.sum()):.10g}", f"{float(head.abs().sum()):.10g}"]
        sig.append([stable_hash(names), check])
    return sig


def _dataset_label(spec) -> str:
    """The calibration source as provenance: the packaged name, or a user file's name (never a
    local path, which would make two otherwise identical artifacts differ)."""
    src = str(spec.source)
    return src if src.startswith("packaged:") else Path(src).name


def imatrix_key(
    lm, calibration: str | None = None, samples: int = DEFAULT_SAMPLES, seq_len: int = DEFAULT_SEQ_LEN
) -> tuple[str, torch.Tensor, object]:
    """(cache key, token batch, TextSpec): the key covers the weights (fingerprint), the live stack,
    the compute dtype, and the calibration tokens themselves (text content, tokenizer, samples,
    sequence length and seed all change them)."""
    batch, spec = calibration_batch(lm.tokenizer, calibration, samples, seq_len, seed=0)
    tokens = hashlib.sha256(batch.to(torch.int64).numpy().tobytes()).hexdigest()[:20]
    dtype = str(getattr(lm.model, "dtype", ""))
    key = stable_hash(
        {
            "v": IMATRIX_VERSION,
            "model": lm.fingerprint,
            "stack": stack_signature(lm),
            "dtype": dtype,
            "tokens": tokens,
            "samples": samples,
            "seq_len": seq_len,
        }
    )
    return key, batch, spec


def imatrix_for(
    lm,
    calibration: str | None = None,
    samples: int = DEFAULT_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    progress: bool = True,
) -> Path:
    """The cached importance matrix of ``lm`` on ``calibration`` (default: the packaged text),
    computed on first use (``samples`` windows of ``seq_len`` tokens, one forward pass each)."""
    return ensure_imatrix(lm, imatrix_key(lm, calibration, samples, seq_len), progress)


def ensure_imatrix(lm, keyed: tuple, progress: bool = True) -> Path:
    """``imatrix_for`` with the key already made by ``imatrix_key`` (the text is tokenized once)."""
    key, batch, spec = keyed
    path = cache_root() / "imatrix" / f"imatrix-{key}.npz"
    if path.is_file():
        return path
    with entry_lock(path, "the importance matrix"):  # a plan's probe and a build's export share it
        if not path.is_file():  # written while this process waited?
            arrays = _imatrix_arrays(lm, batch, progress)
            _save(path, arrays, _meta(spec, arrays, key))
    return path


def _meta(spec, arrays: dict, key: str) -> dict:
    return {
        "dataset": _dataset_label(spec),
        "chunks": int(spec.samples),
        "seq_len": int(spec.seq_len),
        "entries": len(arrays),
        "key": key,
        "version": IMATRIX_VERSION,
    }


def _save(path: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write the .npz atomically: a killed run leaves no half entry at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600; the cache is for users to share
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays, **{META_KEY: np.array(json.dumps(meta))})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_imatrix(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """({GGUF name: column means}, meta) of a matrix file (meta empty for a file without one)."""
    with np.load(path) as data:
        meta = json.loads(str(data[META_KEY])) if META_KEY in data.files else {}
        arrays = {n: data[n] for n in data.files if not n.startswith("__")}
    return arrays, meta


def imatrix_provenance(path: Path) -> dict:
    """What the quantizer records as llama.cpp's ``quantize.imatrix.*`` keys for this file."""
    arrays, meta = read_imatrix(path)
    return {
        "file": Path(path).name,
        "dataset": meta.get("dataset", ""),
        "entries_count": len(arrays),
        "chunks_count": int(meta.get("chunks", 0)),
    }
