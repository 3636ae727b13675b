"""Memory a heal needs, on paper, for each training choice — so a user can tell before starting
whether a Llama-3-8B-sized heal fits a GPU.

Terms (bytes):  teacher weights (frozen, in the compute dtype)
              + student weights (compute dtype)
              + for the trained parameters: gradient (compute dtype) + AdamW m and v (fp32)
                (+ an fp32 master copy when the compute dtype is 16-bit: mixed precision)
              + activations kept for backward: per layer ~ tokens x hidden x 34 B/elem-equivalents
                (attention, MLP, norms; no checkpointing) for the student, plus the teacher's and
                the student's logits and their log-softmax (4 x tokens x vocab x 4 B).
LoRA: rank r adapters on the seven linear maps of every student block, r x (in + out) each.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9
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
) -> dict:
    """GB per term for healing ``shape`` with ``k`` layers merged away."""
    layers = shape.layers - k
    student = shape.params(layers)
    if mode == "all":
        trained = student
    elif mode == "changed":
        trained = (trained_layers if trained_layers is not None else min(layers, 2 * k + 2)) * shape.layer_params
    elif mode == "lora":
        trained = shape.lora_params(layers, lora_rank)
    else:
        raise ValueError(mode)
    per_trained = dtype_bytes + 8 + (4 if dtype_bytes < 4 else 0)  # grad + AdamW m, v (+ fp32 master)
    tokens = batch * seq_len
    terms = {
        "teacher_weights": shape.params() * dtype_bytes / GB,
        "student_weights": student * dtype_bytes / GB,
        "trained_params_B": trained / 1e9,
        "grads_and_optimizer": trained * per_trained / GB,
        "activations": (layers * tokens * shape.hidden * ACT_BYTES_PER_TOKEN_HIDDEN + 4 * tokens * shape.vocab * 4)
        / GB,
    }
    terms["total"] = sum(v for key, v in terms.items() if key != "trained_params_B")
    return {k2: round(v, 2) for k2, v in terms.items()}
