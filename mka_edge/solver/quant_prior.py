"""Quant costs without measuring: llama.cpp's published figures for Llama-3-8B, as a prior.

Source: llama.cpp `tools/perplexity/README.md` ("LLaMA 3 8b Scoreboard", CUDA backend, Wikitext-2,
KL divergence against FP16, rows without an importance matrix; Q2_K only exists there with one,
the 1m-token row is used), as vendored in llama-cpp-python 0.3.36 (MIT).  File sizes are turned
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
SOURCE = "llama.cpp tools/perplexity/README.md, LLaMA 3 8b scoreboard (KLD vs FP16, no imatrix)"


def bits_per_weight(quant: str) -> float:
    gib, _ = PUBLISHED[quant]
    return gib * 2**30 * 8 / LLAMA3_8B_PARAMS


def prior_entry(quant: str, block_params: list[int], other_params: int) -> dict:
    """A quant_probe-shaped entry from the published table (bytes from bits per weight)."""
    if quant not in PUBLISHED:
        raise KeyError(quant)
    bpw = bits_per_weight(quant)
    return {
        "per_layer": [p * bpw / 8 for p in block_params],
        "repack_per_layer": [0.0] * len(block_params),
        "other": other_params * bpw / 8,
        "kl": PUBLISHED[quant][1],
        "source": SOURCE,
        "tensor_types": {},
    }
