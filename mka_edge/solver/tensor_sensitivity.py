"""How much KL each tensor adds at each type (issue 25): the error llama.cpp's own quantizer
makes on it, weighted by the importance matrix, calibrated per tensor kind against a handful of
llama.cpp KL measurements.

Why this estimate:
- The error is the quantizer's real one: each candidate type is written once for the whole model
  by llama.cpp (with the importance matrix where the type takes one, and with llama.cpp's
  fallbacks for rows a type cannot take), and each tensor is read back with gguf-py's
  ``quants.dequantize``.  No reimplementation of a quantizer, so no drift from what a build writes.
- The weighting is the importance matrix's: llama.cpp's imatrix is the mean square of each input
  column's activation on calibration text, so ``sum_j imp_j * |W[:, j] - Q(W)[:, j]|^2`` is the
  expected squared error of the tensor's output, ``E |(W - Q(W)) x|^2``, with the columns taken
  as uncorrelated (the diagonal that llama.cpp's quantizer minimizes too).  A tensor without an
  entry (the token embedding, read by row) is weighted uniformly.
- KL is second order in the output error, so for small errors it is linear in these squared
  errors, with a factor that depends on where the tensor sits: one factor per tensor kind
  (``attn_q`` ... ``ffn_down``, ``token_embd``), measured by quantizing that kind alone to a low
  type with everything else at Q8_0 (``kind_scales``).  A prediction for a mix is the sum over
  its tensors (``predict``), an additivity assumption the bench checks against measured KL.

Bytes are exact: each tensor's bytes at a type are the bytes llama.cpp wrote for it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .allocate import Option

_BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.(.+)\.weight$")


def kind_of(name: str) -> tuple[str, int | None]:
    """(kind, layer) of a GGUF tensor name: ``blk.3.ffn_down.weight`` -> (``ffn_down``, 3);
    ``token_embd.weight`` -> (``token_embd``, None)."""
    m = _BLOCK_TENSOR.match(name)
    if m:
        return m.group(2), int(m.group(1))
    return name.removesuffix(".weight"), None


@dataclass
class TensorCost:
    """One weight tensor: its kind and layer, and per candidate type the ggml type llama.cpp gave
    it (a fallback for rows the type cannot take shows here), its bytes and its weighted error."""

    name: str
    kind: str
    layer: int | None
    rows: int = 0  # ne[1]: whether llama.cpp repacks a type depends on it (solver/memory.repacked)
    actual: dict[str, str] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    err: dict[str, float] = field(default_factory=dict)


def weighted_error(ref: np.ndarray, deq: np.ndarray, imp: np.ndarray | None) -> float:
    """``sum_ij imp_j (ref_ij - deq_ij)^2`` with rows i and input columns j (uniform without ``imp``)."""
    d = ref.astype(np.float64) - deq.astype(np.float64)
    d2 = d * d
    if imp is None:
        return float(d2.sum())
    return float((d2 @ imp.astype(np.float64)).sum())


def _float_rows(t) -> np.ndarray:
    """A GGUF tensor as float32 rows (ne[1] x ne[0]), dequantized when stored quantized."""
    import gguf

    data = np.asarray(t.data)
    if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return data.astype(np.float32).reshape(int(t.shape[1]), int(t.shape[0]))
    return gguf.quants.dequantize(data, t.tensor_type).reshape(int(t.shape[1]), int(t.shape[0]))


def tensor_table(base: Path, files: dict[str, Path], imatrix: dict[str, np.ndarray]) -> dict[str, TensorCost]:
    """Every 2-D weight of ``base`` (the float GGUF the quantizer read) against each candidate
    type's file (``files``: type -> the whole model quantized with that type as its request)."""
    table = empty_table(base)
    for q, path in files.items():
        add_type(table, base, q, path, imatrix)
    return table


def empty_table(base: Path) -> dict[str, TensorCost]:
    """A row for every 2-D weight of ``base``, no type measured yet."""
    import gguf

    return {
        t.name: TensorCost(t.name, *kind_of(t.name), rows=int(t.shape[1]))
        for t in gguf.GGUFReader(str(base)).tensors
        if len(t.shape) == 2
    }


def add_type(table: dict[str, TensorCost], base: Path, q: str, path: Path, imatrix: dict[str, np.ndarray]) -> None:
    """Candidate type ``q``'s column, read from ``path`` (the model with every weight requested at
    ``q``), one tensor at a time: a plan writes, reads and deletes one such file at a time, so
    the scratch disk holds one quantized copy beside the float base."""
    import gguf

    ref = {t.name: t for t in gguf.GGUFReader(str(base)).tensors if t.name in table}
    for t in gguf.GGUFReader(str(path)).tensors:
        if t.name not in table:
            continue
        row = table[t.name]
        row.actual[q] = t.tensor_type.name
        row.bytes[q] = int(t.n_bytes)
        row.err[q] = weighted_error(_float_rows(ref[t.name]), _float_rows(t), imatrix.get(t.name))


def tensor_scales(
    table: dict[str, TensorCost], isolated: dict[str, tuple[str, float]], floor: tuple[str, float]
) -> dict[str, float]:
    """Nats per unit of weighted error, per tensor.  ``isolated[kind] = (low type, measured KL)`` of
    a file with that kind alone at the low type and every other tensor at ``floor``'s type, whose
    own measured KL is ``floor[1]``.  The kind's added KL (at least 0) is shared equally by its
    tensors (one per layer), and each tensor's share is spread over its own error scale: at the
    low type every layer of a kind adds the same KL, at another type its error relative to its
    error there says how much.

    Why per tensor and not one factor per kind over the kind's summed error: on SmolLM2 a few
    layers' ``ffn_down`` carry most of the kind's weighted error (inputs with outlier activations),
    so one factor made every other layer's error almost free, and the allocation put Q2_K/Q3_K
    there: predicted 0.005-0.024 nats, measured 0.062-0.093 (bench/mixed_quant.py,
    docs/results.md).  Equal shares predicted the same files within 0.5x-1.6x."""
    base_type, base_kl = floor
    scales = {}
    for kind, (low, kl) in isolated.items():
        rows = [r for r in table.values() if r.kind == kind]
        share = max(kl - base_kl, 0.0) / len(rows)
        for r in rows:
            extra = r.err[low] - r.err[base_type]
            scales[r.name] = share / extra if extra > 0 else 0.0
    return scales


def predict(
    table: dict[str, TensorCost], scales: dict[str, float], types: dict[str, str], floor: tuple[str, float]
) -> float:
    """Predicted KL of the mix ``types`` (tensor -> candidate type): the measured KL of the all-
    ``floor[0]`` file (``floor[1]``: what llama.cpp's arithmetic costs even at 8 bits) plus each
    tensor's scaled error above its error there.  A tensor without a scale counts as free."""
    base_type, base_kl = floor
    return base_kl + sum(scales.get(n, 0.0) * (table[n].err[q] - table[n].err[base_type]) for n, q in types.items())


def options(table: dict[str, TensorCost], scales: dict[str, float], names: list[str] | None = None) -> dict:
    """{tensor: [Option]} for ``allocate``: each candidate type's exact bytes and predicted KL.
    Candidate types that llama.cpp wrote as the same ggml type for a tensor are one option."""
    out = {}
    for name in names if names is not None else list(table):
        row = table[name]
        seen: dict[str, Option] = {}
        for q in row.err:
            o = Option(q, row.bytes[q], scales.get(name, 0.0) * row.err[q])
            key = row.actual[q]
            if key not in seen or o.kl < seen[key].kl:
                seen[key] = o
        out[name] = list(seen.values())
    return out


@dataclass
class Sensitivity:
    """A model's per-tensor costs, as a plan allocates from them: the table, each tensor's nats per
    unit of error, the all-``floor`` file's measured KL, and the bytes no allocation changes (the
    1-D norms, F32 in every file) per layer and outside the layers."""

    table: dict[str, TensorCost]
    scales: dict[str, float]
    floor: tuple[str, float]
    calibrate: str
    fixed_per_layer: tuple[int, ...]
    fixed_other: int
    fixed_attn_per_layer: tuple[int, ...] = ()  # the part of fixed_per_layer in the attention sub-block

    def fixed_bytes(self, kept, attn_removed=()) -> int:
        """The unallocated bytes (norms, biases) of a model keeping these original layers, those in
        ``attn_removed`` without their attention sub-block."""
        return self.fixed_other + sum(self.fixed_layer(i, i in attn_removed) for i in kept)

    def fixed_layer(self, i: int, no_attention: bool = False) -> int:
        return self.fixed_per_layer[i] - (
            self.fixed_attn_per_layer[i] if no_attention and self.fixed_attn_per_layer else 0
        )

    def options(self, names: list[str], resident=None) -> dict:
        """``options`` over ``names``; ``resident(row, q)``: the bytes a choice holds in memory
        when that differs from the file's (llama.cpp's repacked copies), which is then what the
        allocation is budgeted in."""
        opts = options(self.table, self.scales, names)
        if resident is None:
            return opts
        return {n: [Option(o.type, resident(self.table[n], o.type), o.kl) for o in opts[n]] for n in names}

    def predict(self, types: dict[str, str]) -> float:
        return predict(self.table, self.scales, types, self.floor)

    def to_json(self) -> dict:
        return {
            "tensors": {
                n: {
                    "kind": r.kind,
                    "layer": r.layer,
                    "rows": r.rows,
                    "types": {q: [r.actual[q], r.bytes[q], r.err[q]] for q in r.err},
                }
                for n, r in self.table.items()
            },
            "scales": self.scales,
            "floor": list(self.floor),
            "calibrate": self.calibrate,
            "fixed_per_layer": list(self.fixed_per_layer),
            "fixed_other": self.fixed_other,
            "fixed_attn_per_layer": list(self.fixed_attn_per_layer),
        }

    @classmethod
    def from_json(cls, d: dict) -> Sensitivity:
        table = {}
        for n, r in d["tensors"].items():
            row = TensorCost(n, r["kind"], r["layer"], r["rows"])
            for q, (actual, b, e) in r["types"].items():
                row.actual[q], row.bytes[q], row.err[q] = actual, int(b), float(e)
            table[n] = row
        return cls(
            table,
            {k: float(v) for k, v in d["scales"].items()},
            (d["floor"][0], float(d["floor"][1])),
            d["calibrate"],
            tuple(int(x) for x in d["fixed_per_layer"]),
            int(d["fixed_other"]),
            tuple(int(x) for x in d.get("fixed_attn_per_layer", ())),
        )
