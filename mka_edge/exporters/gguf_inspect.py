"""Reading a GGUF back with gguf-py: the check every consumer runs before llama.cpp touches a
file (a truncated or corrupt file must become one clear error, not a crash inside llama.cpp),
and the facts reports need (tensor types actually written, real bits per weight)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from mka_edge.errors import UserError


def _scalar(fld) -> Any:
    try:
        return fld.contents()
    except Exception:  # noqa: BLE001 - an odd field must not stop the inspection
        return None


def inspect_gguf(path: str | Path) -> dict:
    """Metadata and tensor-type summary of a GGUF; UserError if the file is not a whole GGUF."""

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist or is not a file")
    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 - any failure here means a bad file
        raise UserError(
            f"{path} is not a readable GGUF ({type(exc).__name__}: {str(exc)[:100]}); re-export or re-download it"
        ) from None
    types: Counter[str] = Counter()
    type_bytes: Counter[str] = Counter()
    n_params = 0
    end = 0
    for t in reader.tensors:
        name = t.tensor_type.name
        types[name] += 1
        type_bytes[name] += int(t.n_bytes)
        n_params += int(np.prod(t.shape))
        end = max(end, int(t.data_offset) + int(t.n_bytes))
    if end > size or not reader.tensors:
        raise UserError(f"{path} is truncated or holds no tensors ({size} bytes, tensors need {end}); re-export it")
    f = reader.fields
    arch = _scalar(f["general.architecture"]) if "general.architecture" in f else None
    if arch is None:
        raise UserError(f"{path} has no general.architecture; it is not a model GGUF")

    def key(name: str, default=None):
        fld = f.get(f"{arch}.{name}") or f.get(name)
        return _scalar(fld) if fld is not None else default

    provenance = {k[len("mka_edge.") :]: _scalar(v) for k, v in f.items() if k.startswith("mka_edge.")}
    if isinstance(provenance.get("layer_map"), str):
        provenance["layer_map"] = json.loads(provenance["layer_map"])
    allocation = None
    if isinstance(provenance.get("tensor_types"), str):  # a mixed plan's file: each tensor as written
        provenance["tensor_types"] = json.loads(provenance["tensor_types"])
        allocation = _allocation(reader)
    tokens = f.get("tokenizer.ggml.tokens")
    weight_bytes = sum(type_bytes.values())
    heads, heads_kv = key("attention.head_count"), key("attention.head_count_kv")
    removed: list[int] = []
    if isinstance(heads, list):  # per-layer head counts (deci): 0 where a layer has no attention
        removed = [i for i, h in enumerate(heads) if not h]
        heads = max(heads, default=None)
        heads_kv = max(heads_kv, default=None) if isinstance(heads_kv, list) else heads_kv
    return {
        "path": str(path),
        "file_bytes": size,
        "architecture": arch,
        "name": key("general.name"),
        "block_count": key("block_count"),
        "context_length": key("context_length"),
        "embedding_length": key("embedding_length"),
        "head_count": heads,  # of a layer with attention (a deci file holds one count per layer)
        "head_count_kv": heads_kv,
        "attention_removed": removed,  # layers without attention (deci), as in the config's list
        "key_length": key("attention.key_length"),
        "value_length": key("attention.value_length"),
        "n_vocab": len(tokens.data) if tokens is not None else None,
        "file_type": key("general.file_type"),
        "n_params": n_params,
        "tensor_bytes": weight_bytes,
        "bits_per_weight": round(8.0 * weight_bytes / max(n_params, 1), 3),
        "tensor_types": dict(types.most_common()),
        "tensor_type_bytes": dict(type_bytes.most_common()),
        "provenance": provenance,
        **({"allocation": allocation} if allocation else {}),
    }


_BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.(.+)\.weight$")


def _allocation(reader) -> dict:
    """A mixed file's 2-D weights as written: {"cells": [[layer, kind, type]], "outside": {kind:
    type}, "kind_bytes": {kind: bytes}} (the report's heatmap and per-kind bytes)."""
    cells, outside, kind_bytes = [], {}, {}
    for t in reader.tensors:
        if len(t.shape) != 2:
            continue
        m = _BLOCK_TENSOR.match(t.name)
        kind = m.group(2) if m else t.name.removesuffix(".weight")
        if m:
            cells.append([int(m.group(1)), kind, t.tensor_type.name])
        else:
            outside[kind] = t.tensor_type.name
        kind_bytes[kind] = kind_bytes.get(kind, 0) + int(t.n_bytes)
    return {"cells": cells, "outside": outside, "kind_bytes": kind_bytes}


def gguf_tokens(path: str | Path, limit: int | None = None) -> list[str]:
    """The artifact's token strings (for the vocabulary check against a reference)."""

    reader = gguf.GGUFReader(str(path))
    fld = reader.fields["tokenizer.ggml.tokens"]
    idx = fld.data if limit is None else fld.data[:limit]
    return [bytes(fld.parts[i]).decode("utf-8", errors="replace") for i in idx]
