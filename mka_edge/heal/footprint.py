"""Memory a heal needs, on paper, for each training choice — so a user can tell before starting
whether a Llama-3-8B-sized heal fits a GPU.

Terms (bytes):  teacher weights (frozen, in the compute dtype)
              + student weights (compute dtype)
              + for the trained parameters: gradient (compute dtype) + AdamW m and v (fp32)
                (+ an fp32 master copy when the compute dtype is 16-bit: mixed precision)
              + activations kept for backward: per layer ~ tokens x hidden x 34 B/elem-equivalents
                (attention, MLP, norms; no checkpointing) for the student, plus the teacher's and
                the student's logits and their log-softmax (4 x tokens x vocab x 4 B).
LoRA: rank r adapters on the seven linear maps of every student block, r x (in + out) each, kept
in float32 by peft (weight, gradient, AdamW m and v: 16 B a parameter).
QLoRA (``--train qlora``): the same adapters over an NF4 copy of those linear maps (``NF4_BITS`` a
weight, what bitsandbytes stores; embeddings, norms and head stay 16-bit), no teacher in memory
while training (its top-k targets, ``top_k`` x 8 B a training position, sit in host memory), and
only the student's logits.  Its peak is the largest of three phases: the teacher alone writing
those targets (skipped when they are cached), training, and the 16-bit student whole (the
held-out measure before and after, and the reload the adapters merge into).
Why in paper terms and not measured: so a user can size a GPU for an 8B heal on a laptop;
tests/test_heal.py checks the NF4 term against what bitsandbytes really holds.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # 4-bit codes, an 8-bit scale per 64, a float32 scale per 256 scales
ACT_BYTES_PER_TOKEN_HIDDEN = 34.0  # per layer, 16-bit activations, standard transformer estimate


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    kv_dim: int
    vocab: int
    tied: bool

    @property
    def layer_params(self) -> int:
        attn = self.hidden * self.hidden * 2 + self.hidden * self.kv_dim * 2
        return attn + 3 * self.hidden * self.intermediate + 2 * self.hidden

    @property
    def linear_params(self) -> int:
        """The weights of a block's seven linear maps (what LoRA adapts and QLoRA stores in NF4)."""
        return self.layer_params - 2 * self.hidden

    @property
    def outside_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def params(self, layers: int | None = None) -> int:
        return self.outside_params + (self.layers if layers is None else layers) * self.layer_params

    def lora_params(self, layers: int, rank: int) -> int:
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        per = rank * ((h + h) + (h + kv) * 2 + (h + h) + 2 * (h + i) + (i + h))
        return layers * per


LLAMA3_8B = ModelShape(layers=32, hidden=4096, intermediate=14336, kv_dim=1024, vocab=128256, tied=False)


def heal_footprint(
    shape: ModelShape,
    k: int,
    mode: str,
    trained_layers: int | None = None,
    lora_rank: int = 16,
    batch: int = 2,
    seq_len: int = 256,
    dtype_bytes: int = 2,
    steps: int = 60,
    top_k: int = 256,
) -> dict:
    """GB per term for healing ``shape`` with ``k`` layers merged away (``total``: the device's peak)."""
    layers = shape.layers - k
    student = shape.params(layers)
    if mode == "all":
        trained = student
    elif mode == "changed":
        trained = (trained_layers if trained_layers is not None else min(layers, 2 * k + 2)) * shape.layer_params
    elif mode in ("lora", "qlora"):
        trained = shape.lora_params(layers, lora_rank)
    else:
        raise ValueError(mode)
    if mode in ("lora", "qlora"):
        per_trained = 16  # float32 adapter, its gradient, AdamW m and v
    else:
        per_trained = dtype_bytes + 8 + (4 if dtype_bytes < 4 else 0)  # grad + AdamW m, v (+ fp32 master)
    tokens = batch * seq_len
    quantized = layers * shape.linear_params if mode == "qlora" else 0
    logits = (2 if mode == "qlora" else 4) * tokens * shape.vocab * 4
    terms = {
        "teacher_weights": 0.0 if mode == "qlora" else shape.params() * dtype_bytes / GB,
        "student_weights": (quantized * NF4_BITS / 8 + (student - quantized) * dtype_bytes) / GB,
        "trained_params_B": trained / 1e9,
        "grads_and_optimizer": trained * per_trained / GB,
        "activations": (layers * tokens * shape.hidden * ACT_BYTES_PER_TOKEN_HIDDEN + logits) / GB,
    }
    terms["total"] = sum(v for key, v in terms.items() if key != "trained_params_B")
    if mode == "qlora":
        # the other phases: the teacher alone, writing its top-k targets (once: skipped when cached),
        # and the 16-bit student whole, measured (a 512-token chunk's logits) or merged into
        chunk_logits = 512 * shape.vocab * 4 * 2
        terms["teacher_phase"] = (shape.params() * dtype_bytes + chunk_logits) / GB
        terms["sixteen_bit_phase"] = (student * dtype_bytes + chunk_logits) / GB
        terms["teacher_targets_host"] = steps * tokens * top_k * 8 / GB
        terms["total"] = max(terms["total"], terms["teacher_phase"], terms["sixteen_bit_phase"])
    return {k2: round(v, 2) for k2, v in terms.items()}
