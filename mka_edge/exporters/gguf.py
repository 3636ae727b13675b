"""Hugging Face model (merged or not) -> GGUF for llama.cpp.

gguf-py writes the F32/F16 file (hyper-parameters, tokenizer, provenance, tensors under
llama.cpp's names with the q/k layout its rope expects); every other type is made from that
file by llama.cpp's own quantizer, so the tensor-type choices (mixes, fallbacks for rows that
are not a multiple of 256) are exactly llama.cpp's.  Nothing appears at ``out`` unless the whole
export succeeded.
"""

from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from contextlib import ExitStack
from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from mka_edge.cache import clean_stale, temp_sibling_prefix
from mka_edge.errors import UserError
from mka_edge.killpoints import failpoint, killpoint
from mka_edge.merge_log import MergeLog, provenance, read_merge_log
from mka_edge.models.loading import load_config, load_model, storage_dtype
from mka_edge.models.recipes import recipe_behind

from .gguf_deci import drops_tensor, gguf_arch_name, per_layer_heads
from .gguf_inspect import inspect_gguf
from .gguf_names import tensor_name_map
from .gguf_tokenizer import copy_tokenizer_fields, write_hf_tokenizer
from .imatrix import imatrix_for, imatrix_provenance
from .llama_quantize import quantize, tensor_pattern
from .paths import ensure_writable_parent
from .quant_types import QuantType, quant_type


def _permute_for_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF keeps the two rotary halves of each head apart; llama.cpp's rope wants them interleaved."""
    shape = w.shape
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).transpose(1, 2).reshape(shape)


def _rope(config) -> tuple[float, dict]:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    return theta, params


def _llama3_rope_factors(params: dict, theta: float, head_dim: int) -> np.ndarray:
    """Per-frequency divisors for Llama 3 rope scaling, which llama.cpp reads from ``rope_freqs``."""
    factor = float(params["factor"])
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    old_ctx = float(params.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim):
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _tokenizer_gguf(lm, merge_log: MergeLog | None) -> Path | None:
    """The GGUF whose tokenizer this model still uses, if it came from one."""
    for src in (lm.source, (merge_log.source if merge_log is not None else None) or {}):
        if src.get("kind") == "gguf" and src.get("path") and Path(src["path"]).is_file():
            return Path(src["path"])
    return None


def _hparams(writer, config, n_vocab: int) -> None:
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    per_layer = per_layer_heads(config, int(n_head), int(n_kv))  # deci: 0 heads where attention was removed
    writer.add_head_count(per_layer[0] if per_layer else int(n_head))
    writer.add_head_count_kv(per_layer[1] if per_layer else int(n_kv))
    writer.add_rope_dimension_count(int(head_dim))
    if head_dim * n_head != config.hidden_size:
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(n_vocab))
    theta, params = _rope(config)
    writer.add_rope_freq_base(theta)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
    elif kind not in ("default", "llama3", None):
        raise UserError(
            f"rope scaling '{kind}' is not supported by the GGUF exporter yet (supported: none, linear, llama3)"
        )


def _model_name(lm, merge_log: MergeLog | None) -> str:
    """general.name: the source model's name (never a local path, which would make two otherwise
    identical builds differ), with the merge noted."""
    spec = str(((merge_log.source if merge_log is not None else None) or lm.source).get("spec") or "model")
    name = Path(spec).name if ("/" in spec and Path(spec).exists()) or spec.endswith((".gguf", ".yaml")) else spec
    name = name.removesuffix(".gguf").removesuffix(".yaml")
    k = int(merge_log.merge_layers if merge_log is not None else 0)
    return f"{name}-merged-K{k}" if k else name


TENSOR_TYPES_KEY = "mka_edge.tensor_types"  # a mixed plan's allocation, JSON {tensor: ggml type}


def _provenance(writer, lm, merge_log: MergeLog | None, tensor_types: dict | None = None) -> None:
    """merge_log.provenance as ``mka_edge.*`` metadata (read back by gguf_inspect); a mixed plan's
    per-tensor types as ``mka_edge.tensor_types`` (llama.cpp's quantizer copies every key)."""
    if tensor_types:
        writer.add_string(TENSOR_TYPES_KEY, json.dumps(tensor_types, sort_keys=True, separators=(",", ":")))
    prov = provenance(lm, merge_log)
    writer.add_string("mka_edge.version", prov["mka_edge"])
    writer.add_string("mka_edge.method", prov["method"])
    writer.add_uint32("mka_edge.merge_layers", prov["merge_layers"])
    writer.add_uint32("mka_edge.layers_before", prov["layers_before"])
    writer.add_string("mka_edge.layer_map", json.dumps(prov["layer_map"], separators=(",", ":")))
    writer.add_string("mka_edge.source", prov["source"])
    writer.add_string("mka_edge.source_sha256", prov["source_sha256"])


# The float file gguf-py writes for llama.cpp's quantizer.  The quantizer reads F32, F16 and BF16
# alike, for every type; F32 doubles the intermediate's size (32 GB for an 8B model) and buys
# nothing when the weights are stored in 16 bits, so it is used only when asked, when the model's
# own weights are 32-bit and its F32 file stays small (then the intermediate is exact and the
# artifact identical to one made from the float32 weights), or when F32 is the output.
INTERMEDIATES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
F32_INTERMEDIATE_MAX_BYTES = 2 * 1024**3
_FILE_TYPES = {
    "F32": gguf.LlamaFileType.ALL_F32,
    "F16": gguf.LlamaFileType.MOSTLY_F16,
    "BF16": gguf.LlamaFileType.MOSTLY_BF16,
}
_GGML_TYPES = {"F32": None, "F16": None, "BF16": gguf.GGMLQuantizationType.BF16}


def intermediate_type(config, quant: str, asked: str | None = None) -> str:
    """F32, F16 or BF16: what the float GGUF handed to llama.cpp's quantizer holds (see INTERMEDIATES)."""
    if quant in ("F32", "F16", "BF16"):
        return quant  # the float file is the artifact
    if asked:
        asked = asked.upper()
        if asked not in INTERMEDIATES:
            raise UserError(f"--intermediate must be one of {', '.join(INTERMEDIATES)} (or auto), not '{asked}'")
        return asked
    stored = storage_dtype(config)
    if stored in (torch.bfloat16, torch.float16):
        return "BF16" if stored == torch.bfloat16 else "F16"
    return "F32" if f32_bytes(config) <= F32_INTERMEDIATE_MAX_BYTES else "BF16"


def f32_bytes(config) -> int:
    """Bytes of the model's weights at float32, from its config alone (a meta-device instance: no
    weight is read or allocated); tied tensors count once."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return 4 * sum(p.numel() for p in model.parameters())


def _named_tensors(lm, tensors=None):
    """(GGUF name, HF name, tensor) of every tensor the GGUF holds, in file order: the tied output
    projection and rotary buffers are left out (llama.cpp reuses token_embd / computes them), and
    so are the attention tensors of layers without attention (deci: see gguf_deci).
    ``tensors`` is an iterable of (HF name, tensor); default: the model's, streamed one at a time."""
    tmap = tensor_name_map(lm)
    config = lm.model.config
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in tensors if tensors is not None else lm.named_tensors():
        if tied and hf_name == f"{lm.arch.output_head}.weight":
            continue  # llama.cpp reuses token_embd when output.weight is absent
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"no GGUF name for tensor {hf_name}; the exporter does not know this layout")
        if drops_tensor(config, name):
            continue
        yield name, hf_name, tensor


def _rope_freqs(config) -> np.ndarray | None:
    theta, params = _rope(config)
    if params.get("rope_type") != "llama3":
        return None
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return _llama3_rope_factors(params, theta, head_dim)


def _gguf_array(lm, hf_name: str, tensor: torch.Tensor, float_type: str) -> np.ndarray:
    """One tensor as the array the file holds: q/k rows permuted for llama.cpp's rope, 2-D weights
    in ``float_type`` (BF16 as its raw 16-bit patterns), 1-D tensors (norms, biases) in F32."""
    config, arch = lm.model.config, lm.arch
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    t = tensor.detach().cpu()
    if arch.rotary_permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        t = _permute_for_rope(t, n_head)
    elif arch.rotary_permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        t = _permute_for_rope(t, n_kv)
    if t.ndim < 2 or float_type == "F32":
        return np.ascontiguousarray(t.to(torch.float32).numpy())
    t = t.to(INTERMEDIATES[float_type]).contiguous()
    return t.view(torch.int16).numpy() if float_type == "BF16" else t.numpy()


def _tensor_infos(writer, lm, float_type: str) -> tuple[int, np.ndarray | None]:
    """Declare every tensor (name, shape, type) before any data is written, from shapes alone;
    returns how many were declared, and the rope factors tensor (written last) if any."""
    shapes = ((n, h, t.shape, t.ndim) for n, h, t in _named_tensors(lm, lm.model.state_dict().items()))
    for name, _, shape, ndim in shapes:
        shape = tuple(int(d) for d in shape)
        if ndim < 2 or float_type == "F32":
            writer.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
        elif float_type == "F16":
            writer.add_tensor_info(name, shape, np.dtype(np.float16), int(np.prod(shape)) * 2)
        else:
            writer.add_tensor_info(
                name, shape, np.dtype(np.int16), int(np.prod(shape)) * 2, raw_dtype=_GGML_TYPES[float_type]
            )
    freqs = _rope_freqs(lm.model.config)
    if freqs is not None:
        writer.add_tensor_info("rope_freqs.weight", freqs.shape, freqs.dtype, freqs.nbytes)
    return sum(len(t) for t in writer.tensors), freqs


def _write_tensors(writer, lm, float_type: str, count: int, freqs: np.ndarray | None, progress: bool) -> None:
    """Stream the ``count`` declared tensors into the file in declaration order: one converted
    tensor in memory at a time."""
    bar = tqdm(total=count, desc="writing GGUF", unit="tensor", disable=not progress, leave=False)
    with bar:
        for i, (_, hf_name, tensor) in enumerate(_named_tensors(lm)):
            writer.write_tensor_data(_gguf_array(lm, hf_name, tensor, float_type))
            bar.update(1)
            if i == count // 2:
                killpoint("gguf:mid-write")
                failpoint("gguf:mid-write")
        if freqs is not None:
            writer.write_tensor_data(freqs)
            bar.update(1)


def write_shape_gguf(lm, path: Path) -> dict[str, tuple[int, ...]]:
    """An F32 GGUF with the model's hyper-parameters and tensor table but no tensor data (a sparse
    file of the right length): enough for llama.cpp's quantizer to work out, in a dry run, which
    type it would give every tensor.  ``lm.model`` may live on the meta device, so this costs
    nothing even for an 8B model.  Returns {GGUF name: numpy-order shape}."""

    config = lm.model.config
    writer = gguf.GGUFWriter(str(path), gguf_arch_name(config, lm.arch))
    shapes: dict[str, tuple[int, ...]] = {}
    try:
        writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _hparams(writer, config, int(config.vocab_size))
        entries = [(name, tuple(t.shape)) for name, _, t in _named_tensors(lm, lm.model.state_dict().items())]
        freqs = _rope_freqs(config)
        if freqs is not None:
            entries.append(("rope_freqs.weight", freqs.shape))
        data_bytes = 0
        for name, shape in entries:
            nbytes = int(np.prod(shape)) * 4
            writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes)
            data_bytes += gguf.GGUFWriter.ggml_pad(nbytes, writer.data_alignment)
            shapes[name] = shape
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        fout = writer.fout[0]
        fout.flush()
        start = gguf.GGUFWriter.ggml_pad(fout.tell(), writer.data_alignment)
        fout.truncate(start + data_bytes)  # holes, not bytes: the data is never read
    finally:
        writer.close()
    return shapes


def write_float_gguf(
    lm,
    path: Path,
    float_type: str,
    merge_log: MergeLog | None = None,
    pre_tokenizer: str | None = None,
    progress: bool = False,
    tensor_types: dict[str, str] | None = None,
) -> dict:
    """Write an F32, F16 or BF16 GGUF of a loaded model to ``path`` (caller handles atomicity),
    streaming the tensors: the writer holds one converted tensor at a time, never a model copy."""
    if float_type not in INTERMEDIATES:
        raise ValueError(f"float GGUF type must be one of {sorted(INTERMEDIATES)}, not {float_type}")

    config = lm.model.config
    writer = gguf.GGUFWriter(str(path), gguf_arch_name(config, lm.arch))  # llama, or deci without some attention
    try:
        writer.add_name(_model_name(lm, merge_log))
        writer.add_file_type(int(_FILE_TYPES[float_type]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        src_gguf = _tokenizer_gguf(lm, merge_log)
        if src_gguf is not None:
            n_vocab = copy_tokenizer_fields(src_gguf, writer)
            tok_info = {"carried_over_from": str(src_gguf), "n_vocab": n_vocab}
        else:
            # the model's own folder (a hub model's snapshot included); never the current directory
            folder = Path(lm.source["model_dir"]) if lm.source.get("model_dir") else None
            if folder is None or not folder.is_dir():
                raise UserError(
                    "GGUF export needs the model's tokenizer files and this model has no folder; "
                    "pass a local directory, a hub id or a recipe"
                )
            # a merged or healed folder has no recipe of its own: the hint comes from its source's
            recipe = lm.recipe or recipe_behind(str(folder))
            pre = pre_tokenizer or (recipe.get("llama_cpp") or {}).get("pre_tokenizer")
            tok_info = write_hf_tokenizer(folder, lm.tokenizer, writer, int(config.vocab_size), pre)
            n_vocab = tok_info["n_vocab"]
        if n_vocab != int(config.vocab_size):
            raise UserError(f"tokenizer has {n_vocab} tokens but the model's embedding has {config.vocab_size} rows")
        _hparams(writer, config, n_vocab)
        _provenance(writer, lm, merge_log, tensor_types)
        count, freqs = _tensor_infos(writer, lm, float_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        _write_tensors(writer, lm, float_type, count, freqs, progress)
    finally:
        writer.close()
    return tok_info


def check_out_file(out: Path) -> Path:
    out = Path(out)
    if out.suffix.lower() != ".gguf":
        raise UserError(f"--out {out} must end in .gguf")
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file name ending in .gguf")
    return ensure_writable_parent(out)


def export_loaded(
    lm,
    out: Path,
    quant: str | QuantType,
    *,
    pre_tokenizer: str | None = None,
    threads: int | None = None,
    imatrix_texts=None,
    intermediate: str | None = None,
    imatrix: bool = False,
    progress: bool = True,
    tensor_types: dict[str, str] | None = None,
) -> dict:
    """Export a loaded model; returns the summary of the file written (types read back from it).
    ``tensor_types``: a mixed plan's {tensor name: ggml type} (quant MIXED), written in one
    quantize call as llama.cpp's per-tensor overrides and recorded in ``mka_edge.tensor_types``.
    ``intermediate`` (F32, F16, BF16; default by ``intermediate_type``) is the float file handed
    to llama.cpp's quantizer.  ``imatrix``: quantize with the model's importance matrix (cached,
    see ``imatrix_for``; calibration text ``imatrix_texts``, default the packaged one) when the
    type takes one; types that need one always get it, types that ignore one never do."""
    q = quant if isinstance(quant, QuantType) else quant_type(quant)
    if q.per_tensor and not tensor_types:
        raise UserError(
            f"{q.name} is a mixed plan's type: it needs the plan's per-tensor types (build a plan with --mixed)"
        )
    out = check_out_file(out)
    merge_log = read_merge_log(lm.source.get("model_dir"))
    threads = threads or max(1, os.cpu_count() or 1)
    matrix = None
    if not q.direct and (q.needs_imatrix or (imatrix and q.imatrix_helps)):
        matrix = imatrix_for(lm, imatrix_texts, progress=progress)  # before the slow write: cached after
    clean_stale(out)  # a killed export's scratch folder
    try:
        return _export_to(lm, out, q, merge_log, pre_tokenizer, threads, intermediate, matrix, progress, tensor_types)
    except OSError as exc:
        float_type = intermediate_type(lm.model.config, q.name, intermediate)
        need = f32_bytes(lm.model.config) * {"F32": 4, "F16": 2, "BF16": 2}[float_type] / 4 * (1 if q.direct else 2)
        # a full disk shows as ENOSPC, or as a short write without an errno ("8192 requested and 32 written")
        if exc.errno != errno.ENOSPC and not _free_mb(out.parent) * 2**20 < need:
            raise
        raise UserError(
            f"no space left on the disk of {out.parent} while writing the GGUF: the export needs about "
            f"{need / 2**20:.0f} MB free there ({float_type} intermediate{'' if q.direct else ' + the quantized file'}); "
            f"{_free_mb(out.parent):.0f} MB are free; nothing was left at --out; free space or choose another --out"
        ) from None


def adopt_quantized(made: Path, out: Path, facts: dict) -> dict:
    """Move a file the quant probe already wrote of this same unmerged model (same float base, same
    quantizer, same importance matrix: the bytes ``export_loaded`` would write) to ``out`` instead
    of writing it again, and summarise it as ``export_loaded`` does; ``facts`` is what the probe
    recorded of its making (quant, tokenizer, intermediate, imatrix provenance).  A 1.5B model's
    IQ4_XS export is about 140 s on two cores, which a plan that merges nothing never needs."""
    import shutil

    out = check_out_file(out)
    clean_stale(out)
    with tempfile.TemporaryDirectory(prefix=temp_sibling_prefix(out), dir=out.parent) as tmpdir:
        final_tmp = Path(tmpdir) / "quantized.gguf"
        shutil.move(str(made), final_tmp)  # a copy where the probe's folder is on another disk
        summary = _rename_into(final_tmp, out)
    return {**summary, **facts, "path": str(out), "reused_from_probe": True}


def _rename_into(final_tmp: Path, out: Path) -> dict:
    """The finished file's summary, then its one atomic rename to ``out`` (the kill points around
    it are what tests/test_interruption.py stops at)."""
    summary = inspect_gguf(final_tmp)
    killpoint(f"before-rename:{out.name}")
    os.replace(final_tmp, out)
    killpoint(f"after-rename:{out.name}")
    return summary


def _free_mb(folder: Path) -> float:
    import shutil

    try:
        return shutil.disk_usage(folder).free / 2**20
    except OSError:
        return float("nan")


def _check_written(path: Path, tensor_types: dict[str, str]) -> None:
    """A mixed plan's file holds every 2-D weight at its planned type: a name that matched no
    tensor (a plan for another model, an edited plan.json) would leave that tensor at the Q8_0
    carrier, over the planned bytes, so it is refused here, before the file is kept."""
    written = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors if len(t.shape) == 2}
    wrong = [n for n, t in written.items() if tensor_types.get(n, "").upper() != t]
    if wrong or set(tensor_types) - set(written):
        missing = sorted(set(tensor_types) - set(written))
        raise UserError(
            f"the mixed plan's tensor types do not match this model ({len(wrong)} tensors written at another type, "
            f"e.g. {(wrong or missing)[0]}; {len(missing)} planned tensors absent); plan again for this model"
        )


def _export_to(
    lm, out: Path, q: QuantType, merge_log, pre_tokenizer, threads, intermediate, matrix, progress, tensor_types=None
) -> dict:
    """export_loaded's write: scratch folder beside ``out``, float GGUF, quantizer, rename."""
    with ExitStack() as stack:
        tmpdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=temp_sibling_prefix(out), dir=out.parent)))
        float_type = intermediate_type(lm.model.config, q.name, intermediate)
        base = tmpdir / f"base-{float_type.lower()}.gguf"
        tok_info = write_float_gguf(lm, base, float_type, merge_log, pre_tokenizer, progress, tensor_types)
        if q.direct:
            final_tmp = base
        else:
            final_tmp = tmpdir / "quantized.gguf"
            overrides = {tensor_pattern(n): t for n, t in (tensor_types or {}).items()} or None
            quantize(base, final_tmp, q.ftype, threads, matrix, progress=progress, overrides=overrides)
            if tensor_types:
                _check_written(final_tmp, tensor_types)
        summary = _rename_into(final_tmp, out)
    summary["path"] = str(out)
    summary["quant"] = q.name
    summary["tokenizer"] = tok_info
    summary["intermediate"] = float_type
    summary["imatrix"] = imatrix_provenance(matrix) if matrix is not None else None
    return summary


def export_gguf(
    model: str | None,
    out: Path,
    quant: str,
    *,
    pre_tokenizer: str | None = None,
    threads: int | None = None,
    calibration: str | None = None,
    intermediate: str | None = None,
    imatrix: bool = False,
    progress: bool = True,
) -> dict:
    """`mka-edge export --format gguf`: load ``model`` (recipe, directory, GGUF, hub id) and export it.
    ``imatrix``: quantize with an importance matrix from ``calibration`` (see ``export_loaded``).

    The weights load as stored (the writer converts one tensor at a time: converting while loading
    kept the whole memory-mapped checkpoint resident beside the converted model, 1.5x the float32
    bytes for a 1B float32 folder exported to BF16), in float32 when an importance matrix is
    computed first."""

    q = quant_type(quant)  # a bad name fails before the slow load
    if q.per_tensor:
        raise UserError(f"--quant {q.name} is a mixed plan's type; build a plan with --mixed (mka-edge build --mixed)")
    check_out_file(out)
    config = load_config(model)
    float_type = intermediate_type(config, q.name, intermediate)
    with_matrix = q.needs_imatrix or (imatrix and q.imatrix_helps)
    lm = load_model(model, "cpu", torch.float32 if with_matrix else storage_dtype(config))
    return export_loaded(
        lm,
        out,
        q,
        pre_tokenizer=pre_tokenizer,
        threads=threads,
        imatrix_texts=calibration,
        intermediate=float_type,
        imatrix=imatrix,
        progress=progress,
    )
