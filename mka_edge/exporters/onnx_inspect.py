"""Read an ONNX export back without running it: integrity first (a truncated or missing weights
file is refused before onnxruntime sees it), then what was written — weight bytes by kind,
quantized MatMul bit widths, layer count, vocabulary and provenance."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from mka_edge.errors import UserError

# Written next to the model by the exporter (onnx.py); read back here.
PROVENANCE_FILE = "mka_edge.json"

_DTYPE_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}


def resolve(path: str | Path) -> tuple[Path, Path]:
    """(export folder, decoder .onnx file) for a folder or a .onnx file inside one."""
    p = Path(path)
    if not p.exists():
        raise UserError(
            f"{p} does not exist; give an ONNX export folder (from `mka-edge export --format onnx`) or its model.onnx"
        )
    folder = p if p.is_dir() else p.parent
    cfg = folder / "genai_config.json"
    if p.is_dir():
        name = "model.onnx"
        if cfg.is_file():
            try:
                name = json.loads(cfg.read_text())["model"]["decoder"]["filename"]
            except (ValueError, KeyError):
                raise UserError(f"{cfg} is not a valid onnxruntime-genai config; re-export the model") from None
        model = folder / name
        if not model.is_file():
            raise UserError(f"{folder} holds no {name}; give an ONNX export folder")
    else:
        model = p
    if model.suffix != ".onnx":
        raise UserError(f"{model} is not an .onnx file")
    return folder, model


def _numel(dims) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def initializer_nbytes(init) -> int:
    """Bytes of one initializer: its external-data length, else its embedded data."""

    if init.data_location == onnx.TensorProto.EXTERNAL:
        return int({e.key: e.value for e in init.external_data}.get("length", 0))
    return len(init.raw_data) if init.raw_data else _numel(init.dims) * _DTYPE_BYTES.get(init.data_type, 4)


def inspect_onnx(path: str | Path) -> dict:

    folder, model_file = resolve(path)
    try:
        model = onnx.load(str(model_file), load_external_data=False)
    except (DecodeError, ValueError, OSError) as exc:
        raise UserError(
            f"{model_file} fails to load as ONNX ({str(exc)[:120] or type(exc).__name__}); re-export it"
        ) from None
    sizes: dict[str, int] = {}
    weight_bytes = 0
    by_dtype: Counter = Counter()
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in init.external_data}
            loc = folder / info.get("location", "")
            if loc.name not in sizes:
                if not loc.is_file():
                    raise UserError(
                        f"{model_file.name} keeps weights in {loc.name}, which is missing; copy the whole export folder"
                    )
                sizes[loc.name] = loc.stat().st_size
            end = int(info.get("offset", 0)) + int(info.get("length", 0))
            if end > sizes[loc.name]:
                raise UserError(
                    f"{loc} is truncated ({sizes[loc.name]} bytes, tensor {init.name} ends at {end}); re-export or re-copy it"
                )
        n = initializer_nbytes(init)
        weight_bytes += n
        by_dtype[onnx.TensorProto.DataType.Name(init.data_type)] += n
    ops = Counter(node.op_type for node in model.graph.node)
    nbits = Counter()
    for node in model.graph.node:
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
            nbits[f"{node.op_type} {bits}-bit"] += 1
    cfg = {}
    if (folder / "genai_config.json").is_file():
        cfg = json.loads((folder / "genai_config.json").read_text())
    dec = cfg.get("model", {}).get("decoder", {})
    prov = json.loads((folder / PROVENANCE_FILE).read_text()) if (folder / PROVENANCE_FILE).is_file() else None
    n_layers = dec.get("num_hidden_layers") or ops.get("GroupQueryAttention") or None
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    return {
        "path": str(folder),
        "model_file": model_file.name,
        "format": "onnx",
        "files": files,
        "file_bytes": sum(files.values()),
        "model_bytes": model_file.stat().st_size + sum(sizes.values()),
        "weight_bytes": weight_bytes,
        "weight_bytes_by_dtype": dict(by_dtype),
        "quantized_ops": dict(nbits),
        "op_counts": dict(ops.most_common(8)),
        "block_count": int(n_layers) if n_layers else None,
        "n_vocab": cfg.get("model", {}).get("vocab_size"),
        "n_kv_heads": dec.get("num_key_value_heads"),
        "head_size": dec.get("head_size"),
        "context": cfg.get("search", {}).get("max_length"),
        "model_context": cfg.get("model", {}).get("context_length"),
        "inputs": [i.name for i in model.graph.input][:3],
        "quant": (prov or {}).get("quant"),
        "provenance": prov,
    }
