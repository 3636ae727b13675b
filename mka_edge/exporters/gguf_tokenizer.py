"""The tokenizer half of a GGUF: carried over unchanged from a source GGUF, or built from a
Hugging Face tokenizer directory with gguf-py's vocab helpers.

Carrying over matters for the embedded default: its GGUF already holds what llama.cpp expects
(token types, merges, pre-tokenizer name, chat template), and re-deriving it could only drift.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import gguf

from mka_edge.errors import UserError

_TOKEN_TYPES = gguf.TokenType


def copy_tokenizer_fields(source_gguf: Path, writer: gguf.GGUFWriter) -> int:
    """Copy every ``tokenizer.*`` key of ``source_gguf`` byte for byte; returns the vocab size."""
    reader = gguf.GGUFReader(str(source_gguf))
    n_vocab = 0
    for key, fld in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        main = fld.types[0]
        if main == gguf.GGUFValueType.ARRAY:
            sub = fld.types[-1]
            if sub == gguf.GGUFValueType.STRING:
                val: Any = [bytes(fld.parts[i]) for i in fld.data]
            else:
                val = [fld.parts[i].tolist()[0] for i in fld.data]
            writer.add_key_value(key, val, main, sub_type=sub)
            if key == "tokenizer.ggml.tokens":
                n_vocab = len(val)
        elif main == gguf.GGUFValueType.STRING:
            writer.add_key_value(key, bytes(fld.parts[fld.data[0]]), main)
        else:
            writer.add_key_value(key, fld.parts[fld.data[0]].tolist()[0], main)
    if not n_vocab:
        raise UserError(f"{source_gguf} holds no tokenizer.ggml.tokens; export from the Hugging Face directory instead")
    return n_vocab


@lru_cache(maxsize=1)
def _pre_table() -> dict:
    path = resources.files("mka_edge.data") / "llama_cpp_pretokenizers.json.gz"
    with gzip.open(str(path), "rt", encoding="utf-8") as fh:
        return json.load(fh)


def known_pre_tokenizers() -> list[str]:
    return sorted({r["pre"] for r in _pre_table()["table"]} | {"default"})


def pre_tokenizer_name(tokenizer) -> str | None:
    """llama.cpp's name for a byte-level BPE pre-tokenizer, found the way llama.cpp's converter finds
    it: the sha256 of the token ids of a fixed probe text, looked up in llama.cpp's own table."""
    table = _pre_table()
    ids = tokenizer.encode(table["probe"])
    digest = hashlib.sha256(str(ids).encode()).hexdigest()
    return next((r["pre"] for r in table["table"] if r["chkhsh"] == digest), None)


def _bpe_tokens(folder: Path, n_vocab: int) -> tuple[list[str], list[int]]:
    """Tokens and token types from tokenizer.json: added special tokens are CONTROL, other added
    tokens USER_DEFINED, holes up to the model's vocabulary size UNUSED padding."""
    tj = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    by_id: dict[int, str] = {i: t for t, i in tj["model"]["vocab"].items()}
    kinds: dict[int, int] = {}
    for added in tj.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        kinds[added["id"]] = int(_TOKEN_TYPES.CONTROL if added.get("special") else _TOKEN_TYPES.USER_DEFINED)
    size = max(n_vocab, max(by_id) + 1)
    tokens, types = [], []
    for i in range(size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(kinds.get(i, int(_TOKEN_TYPES.NORMAL)))
        else:
            tokens.append(f"[PAD{i}]")
            types.append(int(_TOKEN_TYPES.UNUSED))
    return tokens, types


def write_hf_tokenizer(
    folder: Path, tokenizer, writer: gguf.GGUFWriter, n_vocab: int, pre_tokenizer: str | None
) -> dict:
    """Tokenizer metadata from a Hugging Face directory; returns what was decided (for the log)."""
    tj_path = folder / "tokenizer.json"
    if not tj_path.is_file():
        raise UserError(f"{folder} has no tokenizer.json; GGUF export needs a fast (tokenizers) tokenizer")
    model = json.loads(tj_path.read_text(encoding="utf-8"))["model"]
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        # SentencePiece-style BPE (Llama 2, Mistral v0.1): llama.cpp's "llama" tokenizer model.
        vocab = gguf.LlamaHfVocab(folder)
        tokens, scores, types = [], [], []
        for text, score, ttype in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(int(ttype))
        for i in range(len(tokens), n_vocab):
            tokens.append(f"[PAD{i}]".encode())
            scores.append(-1000.0)
            types.append(int(_TOKEN_TYPES.UNUSED))
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(folder, load_merges=False, n_vocab=len(tokens))
        special.add_to_gguf(writer, quiet=True)
        return {"tokenizer_model": "llama", "pre": "default", "n_vocab": len(tokens)}
    if model.get("type") != "BPE":
        raise UserError(f"{folder}: tokenizer type {model.get('type')} is not supported for GGUF export (BPE only)")
    if pre_tokenizer is not None and pre_tokenizer not in known_pre_tokenizers():
        raise UserError(
            f"unknown pre-tokenizer '{pre_tokenizer}'; llama.cpp knows: {', '.join(known_pre_tokenizers())}"
        )
    pre = pre_tokenizer or pre_tokenizer_name(tokenizer)
    if pre is None:
        raise UserError(
            f"llama.cpp's table does not know the pre-tokenizer of {folder}; pass --pre-tokenizer NAME "
            f"(e.g. llama-bpe, qwen2, smollm, gpt-2) if you know which one it uses"
        )
    tokens, types = _bpe_tokens(folder, n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    if not special.merges:
        raise UserError(f"{folder}: tokenizer.json has no BPE merges; the tokenizer cannot be exported")
    special.add_to_gguf(writer, quiet=True)
    return {"tokenizer_model": "gpt2", "pre": pre, "n_vocab": len(tokens)}
