"""llama.cpp files for per-tensor types (issue 25): the whole model requested at one ggml type (the
sensitivity table's inputs), a mix of per-tensor types written in one quantize call, and the KL
of any such file against the probe's reference.

A request goes through llama.cpp's own quantizer as ``tt_overrides`` on the Q8_0 file type (no
``_M`` mix rules: every 2-D weight gets what the override asks, or llama.cpp's fallback where
its rows cannot take it, which the written file shows).  The importance matrix is passed
whenever there is one: llama.cpp uses it for the types that take one.
"""

from __future__ import annotations

from pathlib import Path

from mka_edge.exporters.llama_quantize import quantize, tensor_pattern
from mka_edge.exporters.quant_types import quant_type

from ..validate.jobs import AccuracyJob
from ..validate.runner import run_child
from ..validate.workers import GGUF_WORKER as WORKER
from .quant_probe import tensor_bytes_split

# the ggml types a tensor may take, most bits first: the K-quants (256-wide blocks; llama.cpp falls
# back on rows they cannot take) and the 32-wide ones every row takes
CANDIDATES = ("Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q4_K", "IQ4_NL", "Q4_0", "Q3_K", "Q2_K")
CARRIER = "Q8_0"  # the file type the overrides ride on: no mix rules of its own


def write_types(base: Path, art: Path, types: dict[str, str], matrix: Path | None, threads: int = 2) -> Path:
    """``base`` quantized with each named tensor at its type (tensor -> ggml type) in one call."""
    overrides = {tensor_pattern(name): t for name, t in types.items()}
    quantize(base, art, quant_type(CARRIER).ftype, threads, matrix, overrides=overrides)
    return art


def write_request(base: Path, art: Path, ggml_type: str, matrix: Path | None, threads: int = 2) -> Path:
    """``base`` with every weight requested at ``ggml_type``."""
    quantize(base, art, quant_type(CARRIER).ftype, threads, matrix, overrides={r"\.weight$": ggml_type})
    return art


def measure_file(art: Path, ref_path: Path, threads: int = 2) -> dict:
    """KL, top-1 and perplexity of ``art`` against the reference, and its tensor bytes."""
    acc = run_child(WORKER, AccuracyJob(str(art), threads, reference=str(ref_path)), 3600, f"KL of {art.name}")
    split = tensor_bytes_split(art)
    return {
        "kl": acc["kl"],
        "top1": acc["top1"],
        "ppl": acc["ppl"],
        "tensor_bytes": sum(split["per_layer"]) + split["other"],
    }
