"""The KV cache and the attention path as data: the cache element types llama.cpp offers, and the
cache modes (attention path x K type x V type) a plan can choose between.

A cache mode is a solver dimension beside the weight quant type: on SmolLM2 at context 4096 the
f16 cache (90 MiB) is as large as the Q4_K_M weights, and a q8_0 cache halves it for a few
thousandths of a nat.  llama.cpp's constraints, read from its source and checked at load:

- a quantized V cache needs flash attention (``llama_init_from_model: quantized V cache requires
  flash_attn to be enabled``); a quantized K cache does not;
- without flash attention llama.cpp materialises the K·Q scores (the memory model's compute term);
  with it, it does not.

The pinned bindings' ``Llama(flash_attn=False)`` means "disabled" (not llama.cpp's "auto"), so every
caller passes the attention path explicitly, and records which one ran.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError

# the full-precision cache without flash attention: every plan's baseline and the default everywhere
BASELINE_CACHE = "f16/f16"


@dataclass(frozen=True)
class KvType:
    name: str
    ggml_type: int  # llama.cpp's ggml_type id (Llama(type_k=..., type_v=...))
    bytes_per_element: float
    quantized: bool


_ROWS = (
    KvType("f32", 0, 4.0, False),
    KvType("f16", 1, 2.0, False),
    KvType("q8_0", 8, 34 / 32, True),
    KvType("q4_0", 2, 18 / 32, True),
)
KV_TYPES: dict[str, KvType] = {r.name: r for r in _ROWS}


def kv_type(name: str) -> KvType:
    try:
        return KV_TYPES[str(name).lower()]
    except KeyError:
        raise UserError(f"unknown KV cache type '{name}'; known: {', '.join(KV_TYPES)}") from None


@dataclass(frozen=True, order=True)
class CacheMode:
    """One way to run attention: the attention path and the K and V cache element types."""

    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: bool = False

    def __post_init__(self) -> None:
        kv_type(self.type_k), kv_type(self.type_v)
        if kv_type(self.type_v).quantized and not self.flash_attn:
            raise UserError(
                f"a {self.type_v} V cache needs flash attention in llama.cpp; use --flash-attn on, or an f16 V cache"
            )

    @property
    def label(self) -> str:
        """``q8_0/q8_0+fa``: K type / V type, ``+fa`` with flash attention."""
        return f"{self.type_k}/{self.type_v}{'+fa' if self.flash_attn else ''}"

    @property
    def attention(self) -> str:
        return "flash" if self.flash_attn else "standard"

    @property
    def quantized(self) -> bool:
        return kv_type(self.type_k).quantized or kv_type(self.type_v).quantized

    @classmethod
    def parse(cls, label: str) -> CacheMode:
        """The inverse of ``label``; a bare type (``q8_0``) means K and V of that type, with flash
        attention when the V type needs it."""
        text = str(label).strip().lower()
        fa = text.endswith("+fa")
        text = text.removesuffix("+fa")
        k, _, v = text.partition("/")
        v = v or k
        return cls(k, v, fa or kv_type(v).quantized)

    def llama_kwargs(self) -> dict:
        """The llama-cpp-python ``Llama(...)`` arguments for this mode."""
        return {
            "type_k": kv_type(self.type_k).ggml_type,
            "type_v": kv_type(self.type_v).ggml_type,
            "flash_attn": self.flash_attn,
        }

    def runtime_json(self) -> dict:
        return {"kv_cache_type": self.label, "type_k": self.type_k, "type_v": self.type_v, "attention": self.attention}


# KL each mode adds, measured on SmolLM2-135M (solver/cache_probe.py, Q8_0 file, 2 x 512 held-out
# tokens, docs/results.md): the prior for models too large to probe, as quant_prior is for weights.
PRIOR_KL = {
    "f16/f16": 0.0,
    "q8_0/f16": 0.00027,
    "q4_0/f16": 0.0366,
    "f16/f16+fa": 0.0,
    "q8_0/q8_0+fa": 0.00033,
    "q4_0/q4_0+fa": 0.0412,
}
PRIOR_SOURCE = "measured on SmolLM2-135M (Q8_0, 2 x 512 held-out tokens); speed not measured"

BASELINE = CacheMode()  # what every quality figure so far was measured with

# The modes a llama.cpp plan chooses between: without flash attention only K may be quantized;
# with it, K and V of one type (K quantized alone without flash attention is the mixed case).
LLAMA_CPP_MODES: tuple[CacheMode, ...] = (
    CacheMode("f16", "f16", False),
    CacheMode("q8_0", "f16", False),
    CacheMode("q4_0", "f16", False),
    CacheMode("f16", "f16", True),
    CacheMode("q8_0", "q8_0", True),
    CacheMode("q4_0", "q4_0", True),
)


QUANT_BLOCK = 32  # q8_0 / q4_0 block size: llama.cpp refuses such a cache when it does not divide the head size


def block_fits(mode: CacheMode, head_dim: int) -> bool:
    """Whether llama.cpp can hold this mode's cache for heads of this size (measured: a q8_0 K cache
    with flash attention and 16-wide heads fails to load)."""
    return not mode.quantized or head_dim % QUANT_BLOCK == 0


def allowed_modes(modes: tuple[CacheMode, ...], *, flash_attention: bool, kv_cache_type: str) -> list[CacheMode]:
    """The modes a device allows: ``flash_attention`` False forbids flash attention; a pinned
    ``kv_cache_type`` (anything but ``auto``) allows only caches of that type (K and V)."""
    out = [m for m in modes if flash_attention or not m.flash_attn]
    if kv_cache_type != "auto":
        out = [m for m in out if m.type_k == kv_cache_type and m.type_v == kv_cache_type]
    return out
