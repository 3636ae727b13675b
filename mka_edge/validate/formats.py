"""Per-format parts of validation: reading the artifact back, checking its vocabulary against the
reference, the worker that runs it, and the rows that describe it in the report."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

from ..errors import UserError


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def _compare_tokens(ours: list[str], lm, n: int) -> None:
    theirs = lm.tokenizer.convert_ids_to_tokens(list(range(n)))
    bad = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if b is not None and a != b), None)
    if bad is not None:
        raise UserError(f"artifact token {bad} is {ours[bad]!r} but the reference's is {theirs[bad]!r}: "
                        f"different vocabularies; validate against the model the artifact was made from (--reference)")


def _check_count(n_vocab: int | None, lm) -> int:
    ref_n = int(lm.model.config.vocab_size)
    if n_vocab is not None and int(n_vocab) != ref_n:
        raise UserError(f"artifact vocabulary ({n_vocab} tokens) differs from the reference's ({ref_n}); "
                        f"validate against the model the artifact was made from (--reference)")
    return min(ref_n, 4096)


# ---- GGUF (llama.cpp) ----

def _gguf_inspect(path: Path) -> dict:
    from exporters.gguf_inspect import inspect_gguf

    return inspect_gguf(path)


def _gguf_vocab(artifact: Path, info: dict, lm) -> None:
    from exporters.gguf_inspect import gguf_tokens

    n = _check_count(info["n_vocab"], lm)
    _compare_tokens(gguf_tokens(artifact, n), lm, n)


def _gguf_rows(art: dict) -> list[tuple[str, str]]:
    types = ", ".join(f"{k} {v}" for k, v in art["tensor_types"].items())
    return [("file size", f"{art['file_bytes'] / 2**20:.1f} MiB"),
            ("bits per weight (tensor types written)", f"{art['bits_per_weight']:.2f} ({types})")]


# ---- ONNX (onnxruntime / onnxruntime-genai) ----

def _onnx_inspect(path: Path) -> dict:
    from exporters.onnx_inspect import inspect_onnx

    info = inspect_onnx(path)
    info["model_path"] = info["path"]            # the worker takes the export folder
    return info


def _onnx_vocab(artifact: Path, info: dict, lm) -> None:
    n = _check_count(info["n_vocab"], lm)
    tok_file = Path(info["path"]) / "tokenizer.json"
    if not tok_file.is_file():
        raise UserError(f"{info['path']} has no tokenizer.json; re-export the model")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_file))
    _compare_tokens([tok.id_to_token(i) for i in range(n)], lm, n)


def _onnx_kv(kv_type: str | None, info: dict) -> str:
    """onnxruntime-genai keeps the KV cache in the model's I/O type; it is not a runtime choice."""
    return "f16" if info.get("quant") == "fp16" else "f32"


def _onnx_rows(art: dict) -> list[tuple[str, str]]:
    ops = ", ".join(f"{k} x{v}" for k, v in art["quantized_ops"].items()) or "none (float weights)"
    return [("model files", f"{art['model_bytes'] / 2**20:.1f} MiB (weights {art['weight_bytes'] / 2**20:.1f} MiB)"),
            ("quant type (quantized ops)", f"{art.get('quant') or 'unknown'} ({ops})")]


@dataclass(frozen=True)
class Format:
    name: str
    worker: str
    runtime_name: str
    runtime_version: Callable[[], str]
    inspect: Callable[[Path], dict]
    check_vocab: Callable[[Path, dict, object], None]
    kv_type: Callable[[str | None, dict], str]
    artifact_rows: Callable[[dict], list]
    default_out: Callable[[Path], Path]


GGUF = Format("gguf", "mka_edge.validate.gguf_worker", "llama.cpp (llama-cpp-python)",
              lambda: _version("llama-cpp-python"), _gguf_inspect, _gguf_vocab, lambda kv, info: kv or "f16", _gguf_rows,
              lambda p: p.with_name(f"{p.stem}-validation"))
ONNX = Format("onnx", "mka_edge.validate.onnx_worker", "onnxruntime (CPU provider) + onnxruntime-genai",
              lambda: f"{_version('onnxruntime')} / genai {_version('onnxruntime-genai')}", _onnx_inspect, _onnx_vocab,
              _onnx_kv, _onnx_rows,
              lambda p: (p if p.is_dir() else p.parent).with_name(f"{(p if p.is_dir() else p.parent).name}-validation"))


def adapter_for(artifact: Path) -> Format:
    if artifact.suffix.lower() == ".gguf":
        return GGUF
    if artifact.is_dir() or artifact.suffix.lower() == ".onnx":
        return ONNX
    if not artifact.exists():
        raise UserError(f"{artifact} does not exist")
    raise UserError(f"{artifact} is neither a .gguf file nor an ONNX export (folder or .onnx); give one of those")
