"""Quant costs without measuring: llama.cpp's published figures for Llama-3-8B, as a prior.

Source: llama.cpp `tools/perplexity/README.md` ("LLaMA 3 8b Scoreboard", CUDA backend, Wikitext-2,
KL divergence against FP16, rows without an importance matrix; Q2_K only exists there with one,
the 1m-token row is used; ``PUBLISHED_IMATRIX``: the rows made with one, the only ones IQ4_XS and
IQ3_M have), as vendored in llama-cpp-python 0.3.36 (MIT).  File sizes are turned
into bits per weight with Llama-3-8B's 8.03e9 parameters.  These figures are for one model and one
text: on SmolLM2 we measured Q4_0 at 0.305 nats where this table says 0.072 (tied embeddings,
576-wide rows), so the solver uses them only when measuring on the model at hand is too costly,
and says so in the plan.
"""

from __future__ import annotations

LLAMA3_8B_PARAMS = 8.03e9
# type: (model size GiB, mean KLD nats vs FP16)
PUBLISHED = {
    "F16": (14.97, 0.000551),
    "Q8_0": (7.96, 0.001355),
    "Q6_K": (6.14, 0.005452),
    "Q5_K_M": (5.33, 0.010762),
    "Q5_K_S": (5.21, 0.016595),
    "Q5_1": (5.65, 0.018045),
    "Q5_0": (5.21, 0.022239),
    "Q4_K_M": (4.58, 0.031273),
    "Q4_K_S": (4.37, 0.043136),
    "Q4_1": (4.78, 0.071683),
    "Q4_0": (4.34, 0.071940),
    "Q3_K_L": (4.03, 0.087176),
    "Q3_K_M": (3.74, 0.101913),
    "Q3_K_S": (3.41, 0.228217),
    "Q2_K": (2.96, 0.335308),
}
# The same scoreboard's rows quantized with an importance matrix ("WT 10m": 10 million Wikitext
# tokens), for the types that have one: IQ4_XS and IQ3_M exist there only with a matrix.
# Q2_K above is itself the table's "WT 1m" row.
PUBLISHED_IMATRIX = {
    "Q4_K_M": (4.58, 0.028152),
    "Q4_K_S": (4.37, 0.031951),
    "IQ4_NL": (4.35, 0.035742),
    "IQ4_XS": (4.14, 0.036334),
    "Q3_K_L": (4.03, 0.073077),
    "Q3_K_M": (3.74, 0.084358),
    "IQ3_M": (3.53, 0.102534),
    "IQ3_S": (3.42, 0.111278),
    "IQ3_XS": (3.28, 0.138693),
    "Q3_K_S": (3.41, 0.199821),
    "Q2_K": (2.96, 0.332223),
}
KNOWN = tuple(dict.fromkeys([*PUBLISHED, *PUBLISHED_IMATRIX]))  # every type the prior can cost
SOURCE = "llama.cpp tools/perplexity/README.md, LLaMA 3 8b scoreboard (KLD vs FP16; with an imatrix where lower)"


def bits_per_weight(quant: str) -> float:
    gib, _ = PUBLISHED[quant] if quant in PUBLISHED else PUBLISHED_IMATRIX[quant]
    return gib * 2**30 * 8 / LLAMA3_8B_PARAMS


def prior_entry(quant: str, block_params: list[int], other_params: int) -> dict:
    """A quant_probe-shaped entry from the published table (bytes from bits per weight): the lower
    KL of the plain and importance-matrix rows, ``imatrix`` saying which (as the probe does)."""
    if quant not in KNOWN:
        raise KeyError(quant)
    bpw = bits_per_weight(quant)
    plain = PUBLISHED[quant][1] if quant in PUBLISHED else None
    imat = PUBLISHED_IMATRIX[quant][1] if quant in PUBLISHED_IMATRIX else None
    use_imatrix = imat is not None and (plain is None or imat < plain)
    entry = {
        "per_layer": [p * bpw / 8 for p in block_params],
        "repack_per_layer": [0.0] * len(block_params),
        "other": other_params * bpw / 8,
        "kl": imat if use_imatrix else plain,
        "imatrix": use_imatrix,
        "source": SOURCE,
        "tensor_types": {},
    }
    if plain is not None:  # as the probe: absent where the table has no such row
        entry["kl_plain"] = plain
    if imat is not None:
        entry["kl_imatrix"] = imat
    return entry
