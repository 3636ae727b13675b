"""Calibration and held-out text, tokenized into fixed, seeded windows.

Calibration text drives merge decisions; held-out text is only for quality figures. The two
default sets are disjoint Wikipedia articles, and neither is an evaluation test split.
"""

from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from .errors import UserError

DEFAULT_CALIBRATION = "wiki_calibration.jsonl.gz"
DEFAULT_HELDOUT = "wiki_heldout.jsonl.gz"


def _packaged(name: str) -> Path:
    return Path(str(resources.files("mka_edge.data") / name))


def _read_jsonl_texts(lines: list[str], where: str) -> list[str]:
    texts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{where} line {n} is not JSON; give JSONL with a 'text' field, or plain text") from None
        text = row.get("text") if isinstance(row, dict) else row if isinstance(row, str) else None
        if not isinstance(text, str):
            raise UserError(f"{where} line {n} has no 'text' string field")
        texts.append(text)
    return texts


def load_texts(path: str | Path | None = None, default: str = DEFAULT_CALIBRATION) -> list[str]:
    """Documents from a user's .txt/.jsonl(.gz) file, or the packaged default set."""
    p = Path(path) if path else _packaged(default)
    where = str(p)
    try:
        raw = gzip.open(p, "rt", encoding="utf-8").read() if p.suffix == ".gz" else p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, EOFError, zlib.error) as exc:
        raise UserError(
            f"cannot read calibration file {where}: {exc.__class__.__name__}; check the path and that it is UTF-8 text"
        ) from None
    if ".jsonl" in p.name:
        texts = _read_jsonl_texts(raw.splitlines(), where)
    else:
        texts = [t.strip() for t in raw.split("\n\n\n") if t.strip()] or [raw]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise UserError(f"calibration file {where} is empty; give it some English prose")
    return texts


def _token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All documents tokenized and joined with the EOS token, so windows may span documents."""
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        ids.append(sep)
    return torch.tensor(ids, dtype=torch.long)


@dataclass(frozen=True)
class TextSpec:
    """What a token batch was made from: part of every cache key that depends on it."""

    source: str
    samples: int
    seq_len: int
    seed: int

    def key(self) -> dict:
        return {"source": self.source, "samples": self.samples, "seq_len": self.seq_len, "seed": self.seed}


def calibration_batch(
    tokenizer, path: str | Path | None, samples: int, seq_len: int, seed: int
) -> tuple[torch.Tensor, TextSpec]:
    """``samples`` windows of ``seq_len`` tokens at seeded, non-overlapping offsets."""
    if samples < 1 or seq_len < 8:
        raise UserError("calibration needs at least 1 sample of at least 8 tokens (--samples, --seq-len)")
    stream = _token_stream(tokenizer, load_texts(path))
    n_windows = len(stream) // seq_len
    if n_windows < samples:
        raise UserError(
            f"calibration text has {len(stream)} tokens, enough for {n_windows} windows of {seq_len}; "
            f"lower --samples/--seq-len or give more text"
        )
    g = torch.Generator().manual_seed(seed)
    picks = torch.randperm(n_windows, generator=g)[:samples].sort().values
    batch = torch.stack([stream[i * seq_len : (i + 1) * seq_len] for i in picks.tolist()])
    source = str(path) if path else f"packaged:{DEFAULT_CALIBRATION}"
    return batch, TextSpec(source, samples, seq_len, seed)


def heldout_chunks(tokenizer, n_chunks: int, chunk_len: int = 512, path: str | Path | None = None) -> torch.Tensor:
    """The first ``n_chunks`` consecutive ``chunk_len``-token chunks of the held-out text (no randomness)."""
    stream = _token_stream(tokenizer, load_texts(path, default=DEFAULT_HELDOUT))
    have = len(stream) // chunk_len
    if have < n_chunks:
        raise UserError(f"held-out text gives only {have} chunks of {chunk_len} tokens; ask for fewer")
    return stream[: n_chunks * chunk_len].view(n_chunks, chunk_len)
