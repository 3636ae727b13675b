"""Predicted peak memory (resident) of an ONNX export running in onnxruntime-genai (CPU provider).

peak = overhead     Python + onnxruntime + onnxruntime-genai loaded, no model: measured on a tiny
                    model (bench/memory_model.py)
     + weights x r  resident weights.  onnxruntime does not simply map the weights: it prepacks
                    MatMulNBits blocks for the CPU kernels, folds constants (fp32 tied embeddings
                    get a transposed copy), and leaves untouched rows of a gathered float embedding
                    out of RSS.  r is measured per quant type on the unmerged model, from the peak
                    of a 512-token run at context 1024 less the other terms, and applied to a
                    merged model's own weight bytes and to other contexts.
     + KV cache     onnxruntime-genai allocates past/present as one buffer of max_length tokens
                    (past_present_share_buffer), in the model's I/O type (float32 on CPU except fp16),
                    so the whole context counts from the first token.
     + prefill      the builder's graph returns logits for every prompt position: prompt x vocab x
                    4 B x ACT_FACTOR (the factor covers the other per-token activations; fitted on
                    SmolLM2 int8 with a 512-token prompt).
Fits and errors: bench/memory_model.py, docs/results.md.
"""

from __future__ import annotations

from .memory import MIB, MemoryPrediction, Shape

# Fitted on this host (bench/memory_model.py, ONNX rows).
ONNX_OVERHEAD_MB = 70.0
ACT_FACTOR = 1.17
PROMPT_TOKENS = 512  # prefill size the device prediction assumes (the validation prompt)


def onnx_kv_bytes(shape: Shape, context: int, quant: str) -> float:
    per = 2.0 if quant == "fp16" else 4.0
    return 2.0 * shape.n_layers * context * shape.n_kv_head * shape.head_dim * per


def prefill_bytes(shape: Shape, prompt_tokens: int) -> float:
    return 4.0 * prompt_tokens * shape.n_vocab * ACT_FACTOR


def predict_onnx(
    shape: Shape,
    weight_bytes: float,
    resident_ratio: float,
    context: int,
    quant: str,
    prompt_tokens: int = PROMPT_TOKENS,
    overhead_mb: float = ONNX_OVERHEAD_MB,
) -> MemoryPrediction:
    """Same terms as the llama.cpp model so plans and reports read alike: ``repack_mb`` holds what
    onnxruntime adds to (or leaves out of) the weight bytes, ``attention_mb`` the prefill activations."""
    return MemoryPrediction(
        weights_mb=weight_bytes / MIB,
        repack_mb=(resident_ratio - 1.0) * weight_bytes / MIB,
        kv_mb=onnx_kv_bytes(shape, context, quant) / MIB,
        attention_mb=prefill_bytes(shape, min(prompt_tokens, context)) / MIB,
        overhead_mb=overhead_mb,
    )
