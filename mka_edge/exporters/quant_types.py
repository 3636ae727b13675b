"""llama.cpp quantization types as data: the name users type, llama.cpp's file type, the tensor
type it mainly writes, whether llama.cpp only makes it with an importance matrix, and whether it
quantizes better when given one.

Nominal bits per weight come from gguf-py's block sizes of the main tensor type; the figure a
file really has depends on the mix llama.cpp chooses per tensor (and on fallbacks when rows are
not a multiple of 256), so reports always read the types back from the written file.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from mka_edge.errors import UserError


@dataclass(frozen=True)
class QuantType:
    name: str
    ftype: int  # llama_ftype (LLAMA_FTYPE_*)
    main: str  # ggml type of most 2-D weights
    needs_imatrix: bool = False  # llama.cpp refuses (or badly makes) it without an importance matrix
    direct: bool = False  # written by gguf-py itself, without llama.cpp's quantizer
    note: str = ""
    per_tensor: bool = False  # each tensor at the type a plan allocated it (tt_overrides on this ftype)

    @property
    def imatrix_helps(self) -> bool:
        """Whether llama.cpp's quantizer weighs the rounding by an importance matrix when given one:
        the legacy (Q4_0..Q5_1), K and IQ types do; the float types, Q8_0 and the ternary TQ types
        ignore it (ggml's quantize functions for them take no weights)."""
        return self.needs_imatrix or self.per_tensor or self.main not in _IMATRIX_IGNORED

    @property
    def nominal_bpw(self) -> float:

        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[self.main]]
        return 8.0 * size / block


_IMATRIX_IGNORED = frozenset({"F32", "F16", "BF16", "Q8_0", "TQ1_0", "TQ2_0"})

_ROWS = [
    QuantType("F32", 0, "F32", direct=True, note="reference precision"),
    QuantType("F16", 1, "F16", direct=True),
    QuantType("BF16", 32, "BF16"),
    QuantType("Q8_0", 7, "Q8_0"),
    QuantType("Q6_K", 18, "Q6_K"),
    QuantType("Q5_K_M", 17, "Q5_K", note="mix: some tensors Q6_K"),
    QuantType("Q5_K_S", 16, "Q5_K"),
    QuantType("Q5_1", 9, "Q5_1"),
    QuantType("Q5_0", 8, "Q5_0"),
    QuantType("Q4_K_M", 15, "Q4_K", note="mix: attn_v/ffn_down partly Q6_K"),
    QuantType("Q4_K_S", 14, "Q4_K"),
    QuantType("Q4_1", 3, "Q4_1"),
    QuantType("Q4_0", 2, "Q4_0"),
    QuantType("IQ4_NL", 25, "IQ4_NL"),
    QuantType("IQ4_XS", 30, "IQ4_XS"),
    QuantType("Q3_K_L", 13, "Q3_K", note="mix: some tensors Q5_K"),
    QuantType("Q3_K_M", 12, "Q3_K", note="mix: some tensors Q4_K/Q5_K"),
    QuantType("Q3_K_S", 11, "Q3_K"),
    QuantType("IQ3_M", 27, "IQ3_S"),
    QuantType("IQ3_S", 26, "IQ3_S"),
    QuantType("IQ3_XS", 22, "IQ3_S"),
    QuantType("Q2_K", 10, "Q2_K", note="mix: some tensors Q3_K/Q4_K"),
    QuantType("TQ2_0", 37, "TQ2_0", note="ternary models only"),
    QuantType("TQ1_0", 36, "TQ1_0", note="ternary models only"),
    QuantType("IQ3_XXS", 23, "IQ3_XXS", needs_imatrix=True),
    QuantType("Q2_K_S", 21, "Q2_K", needs_imatrix=True),
    QuantType("IQ2_M", 29, "IQ2_S", needs_imatrix=True),
    QuantType("IQ2_S", 28, "IQ2_S", needs_imatrix=True),
    QuantType("IQ2_XS", 20, "IQ2_XS", needs_imatrix=True),
    QuantType("IQ2_XXS", 19, "IQ2_XXS", needs_imatrix=True),
    QuantType("IQ1_M", 31, "IQ1_M", needs_imatrix=True),
    QuantType("IQ1_S", 24, "IQ1_S", needs_imatrix=True),
    # a mixed plan (issue 25): the Q8_0 file type carries per-tensor overrides, so no mix rule applies
    QuantType("MIXED", 7, "Q8_0", note="per-tensor types from a mixed plan (--mixed)", per_tensor=True),
]
QUANT_TYPES: dict[str, QuantType] = {q.name: q for q in _ROWS}


def quant_type(name: str) -> QuantType:
    q = QUANT_TYPES.get(name.upper())
    if q is None:
        raise UserError(f"unknown quant type '{name}'; valid: {', '.join(QUANT_TYPES)} (see --quant help)")
    return q


def quant_help() -> str:
    lines = [f"{'type':<9} {'bpw':>6}  notes"]
    for q in _ROWS:
        notes = [q.note] if q.note else []
        if q.needs_imatrix:
            notes.append("llama.cpp needs an importance matrix (computed from the calibration set)")
        elif q.imatrix_helps:
            notes.append("imatrix")
        if q.direct:
            notes.append("written directly by gguf-py")
        lines.append(f"{q.name:<9} {q.nominal_bpw:>6.2f}  {'; '.join(notes)}")
    lines.append(
        "bpw: nominal for the main tensor type; files report the real figure (llama.cpp mixes types "
        "and substitutes others when a row width is not a multiple of 256).\n"
        "imatrix: llama.cpp quantizes it better given an importance matrix (computed from the calibration "
        "set; a plan measures the type with and without one and keeps the better)."
    )
    return "\n".join(lines)


# Precision tiers of the ggml tensor types llama.cpp writes: a tensor at a higher tier rounds each
# weight more finely (more bits for the same block of weights).  The measure-only-what-matters
# rule (solver/scope.py) compares types tensor by tensor on this table; types of one tier are not
# compared with each other (Q5_K against Q5_1, IQ4_XS against Q4_0: which rounds better depends on
# the weights).  Tiers follow the nominal bits per weight (gguf-py's block sizes) and llama.cpp's
# Llama-3-8B KL scoreboard, on which every higher-tier type has lower KL than every lower-tier one.
PRECISION_TIER: dict[str, int] = {
    "F32": 9,
    "F16": 8,
    "BF16": 8,
    "Q8_0": 7,
    "Q6_K": 6,
    "Q5_K": 5,
    "Q5_1": 5,
    "Q5_0": 5,
    "Q4_K": 4,
    "Q4_1": 4,
    "Q4_0": 4,
    "IQ4_NL": 4,
    "IQ4_XS": 4,
    "Q3_K": 3,
    "IQ3_S": 3,
    "IQ3_XXS": 3,
    "Q2_K": 2,
    "IQ2_S": 2,
    "IQ2_XS": 2,
    "IQ2_XXS": 2,
    "IQ1_M": 1,
    "IQ1_S": 1,
}

# Grids that contain another type's grid exactly: a weight on a Q4_1 block grid (scale d, minimum m,
# 16 levels) is also on the Q5_1 grid with the same d and m.  A model dequantized from a quantized
# GGUF (the embedded SmolLM2 is Q4_1) sits on its file's grid, so these types can reproduce it
# with no error at all, and the precision order does not hold for them (measured: SmolLM2's
# Q5_K_M, mostly Q5_1 tensors, beat Q6_K, mostly Q8_0, once both had an importance matrix).
GRIDS_CONTAINING: dict[str, frozenset[str]] = {
    "Q4_0": frozenset({"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}),
    "Q4_1": frozenset({"Q4_1", "Q5_1"}),
    "Q5_0": frozenset({"Q5_0", "Q5_1", "Q8_0"}),
    "Q5_1": frozenset({"Q5_1"}),
    "Q8_0": frozenset({"Q8_0"}),
}
