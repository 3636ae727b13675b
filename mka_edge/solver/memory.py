"""Predicted peak memory (resident) of a GGUF artifact running in llama.cpp (CPU backend).

peak = weights      bytes of the tensor types actually written, plus the copy llama.cpp makes
                    of Q4_0/IQ4_NL/Q4_K weights when it repacks them for the CPU (the mapped
                    originals were read at load, so both stay resident)
     + KV cache     2 x layers x context x KV width x bytes per element (full context used)
     + attention    the K·Q scores llama.cpp materialises without flash attention:
                    heads x context x micro-batch x 4 B x KQ_FACTOR; with flash attention it
                    does not (a few rows per micro-batch remain: FA_FACTOR x n_embd x micro-batch x 4 B)
     + overhead     process, Python and libraries, allocator slack: fitted on one configuration.
     + margin       the model's measured error (``MARGIN``): a plan's budget is a promise, and
                    the point estimate above was below the measured peak on every plan built.

llama.cpp reserves a larger compute buffer (it sizes it for logits of a whole 512-token
micro-batch, n_ubatch x n_vocab x 4 B), but a run without all-position logits never touches most
of it, so resident memory — what the device must hold — is modelled, and the reserved figure is
reported beside it (``reserved_compute_bytes``) for checks against llama.cpp's own log.
Fits and errors: bench/memory_model.py, docs/results.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..kv_cache import KV_TYPES, CacheMode
from ..models.attention_removal import attention_layers, attention_removed

MIB = 2**20
KV_BYTES = {name: t.bytes_per_element for name, t in KV_TYPES.items()}
N_UBATCH = 512
# The weight types llama.cpp's CPU backend copies into an interleaved layout at load (ggml-cpu
# repack.cpp, ``ggml_repack_get_optimal_repack_type``, llama-cpp-python 0.3.36) on an x86-64 CPU
# with AVX2, the baseline of the llama.cpp CPU profiles, and the row count a 2-D weight needs for it
# (ne[1] % 8). Q4_K joined the list in llama.cpp and was missing here: SmolLM2's Q4_K_M plans
# measured 2-4% over the point estimate against 1% for Q8_0, its ffn_down tensors' Q4_K bytes
# (bench/quality_at_budget.py, session 8). Not counted: Q2_K (repacked only with AVX-512, which the
# 8 GB laptop class lacks; this host has it, so a Q2_K plan measures over here) and the ARM NEON
# repacks (Q5_K, Q6_K and Q8_0 too), which a profile's CPU field would have to select.
REPACKED_TYPES: dict[str, int] = {"Q4_0": 8, "IQ4_NL": 8, "Q4_K": 8, "MXFP4": 8}


def repacked(type_name: str, shape_rows: int | None) -> bool:
    """Whether llama.cpp keeps a repacked copy of a 2-D weight of this type with this many rows
    (ne[1]; None: unknown, counted as repacked)."""
    rows_multiple = REPACKED_TYPES.get(type_name)
    return rows_multiple is not None and (shape_rows is None or shape_rows % rows_multiple == 0)


# Fitted on this host (bench/memory_model.py): KQ_FACTOR from the context slope of SmolLM2 F16
# (512 -> 4096), the overhead on SmolLM2 Q8_0 at context 512; the other configurations (other
# types, the synthetic 1B model) are predictions.
KQ_FACTOR = 1.4
# With flash attention (same bench, --cache-modes): SmolLM2 Q8_0 peak RSS fell by 93.6 MiB at
# context 4096 and 5.9 MiB at 512 against the predicted K·Q terms of 100.8 and 12.6 MiB: about
# 7 MiB stays whatever the context, ~6 rows of n_embd per micro-batch position.
FA_FACTOR = 6.2
DEFAULT_OVERHEAD_MB = 69.8

# The memory model's error, kept as a margin on its point estimate so that no plan measures over its
# budget. Source: the plans bench/quality_at_budget.py built (SmolLM2, llama.cpp on the CPU, context
# 4096): measured peak RSS / point estimate, the largest per architecture (``deci``: llama.cpp's
# runner for a model with attention removed) and cache mode, plus half a percent, rounded up to a
# half percent. The llama rows come from docs/data/quality_at_budget-s8.json (30 plans, every one
# under-predicted, by 0.7% to 3.2%), the first run with Q4_K's repacked copy counted; the deci row
# from docs/data/quality_at_budget.json (no later run chose attention removal; its point lacked that
# copy, so its 6.8% overstates the error). A mode not measured takes the largest of its architecture
# (``MARGIN_DEFAULT``). tests/test_memory_margin.py checks that the table covers every recorded plan.
MARGIN: dict[tuple[str, str], float] = {
    ("llama", "f16/f16"): 0.020,  # 1.0125: Q4_K_M, K=0 (367.1 -> 371.7 MB)
    ("llama", "f16/f16+fa"): 0.025,  # 1.0196: Q8_0 (303.2 -> 309.1 MB)
    ("llama", "q8_0/q8_0+fa"): 0.035,  # 1.0265: Q5_K_M + imatrix (229.8 -> 235.9 MB)
    ("llama", "q4_0/q4_0+fa"): 0.040,  # 1.0316: sleb-fast K=2, Q5_K_M + imatrix (200.5 -> 206.8 MB)
    ("deci", "q4_0/q4_0+fa"): 0.075,  # 1.0680: sleb-attn K=11, 6 attentions removed (179.5 -> 191.7 MB)
}
MARGIN_DEFAULT = {arch: max(v for (a, _), v in MARGIN.items() if a == arch) for arch, _ in MARGIN}


def architecture(shape: Shape) -> str:
    """The runner llama.cpp uses for this shape: ``deci`` once some layer has lost its attention."""
    return "deci" if shape.attn_layers is not None and shape.attn_layers < shape.n_layers else "llama"


def margin_rate(shape: Shape, cache: CacheMode | str) -> float:
    """The measured-error margin (a fraction of the point estimate) for this shape and cache mode."""
    arch = architecture(shape)
    return MARGIN.get((arch, as_mode(cache).label), MARGIN_DEFAULT[arch])


@dataclass(frozen=True)
class Shape:
    """What memory depends on, read from a config."""

    n_layers: int
    n_embd: int
    n_head: int
    n_kv_head: int
    head_dim: int
    n_ff: int
    n_vocab: int
    tied_embeddings: bool = True
    attn_layers: int | None = None  # layers that keep attention (and a KV cache); None: all of them

    @property
    def kv_layers(self) -> int:
        return self.n_layers if self.attn_layers is None else self.attn_layers

    @classmethod
    def from_config(cls, cfg) -> Shape:
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(
            int(cfg.num_hidden_layers),
            int(cfg.hidden_size),
            int(cfg.num_attention_heads),
            int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads),
            int(head_dim),
            int(cfg.intermediate_size),
            int(cfg.vocab_size),
            bool(getattr(cfg, "tie_word_embeddings", False)),
            attention_layers(cfg) if attention_removed(cfg) else None,
        )

    def with_layers(self, n: int, attn_layers: int | None = None) -> Shape:
        """The shape with ``n`` layers, ``attn_layers`` of them keeping attention (default: all)."""
        return Shape(**{**asdict(self), "n_layers": n, "attn_layers": attn_layers})


@dataclass
class MemoryPrediction:
    weights_mb: float
    repack_mb: float
    kv_mb: float
    attention_mb: float
    overhead_mb: float
    margin_mb: float = 0.0  # the measured error (``MARGIN``); 0 in a point estimate

    @property
    def total_mb(self) -> float:
        return self.weights_mb + self.repack_mb + self.kv_mb + self.attention_mb + self.overhead_mb + self.margin_mb

    def as_dict(self) -> dict:
        d = {k: round(v, 2) for k, v in asdict(self).items()}
        d["total_mb"] = round(self.total_mb, 2)
        return d


N_CTX_PAD = 256  # llama-context.cpp: cparams.n_ctx = GGML_PAD(cparams.n_ctx, 256)


def kv_cells(context: int) -> int:
    """Cells llama.cpp allocates for a context of ``context`` tokens (one sequence): rounded up to
    a multiple of 256 (``Llama(n_ctx=300)`` runs with n_ctx = 512)."""
    return -(-int(context) // N_CTX_PAD) * N_CTX_PAD


def kv_bytes(
    shape: Shape,
    context: int,
    kv_type: str = "f16",
    *,
    flash_attn: bool = False,
    type_v: str | None = None,
    padded: bool = True,
) -> float:
    """llama.cpp's KV cache ("KV buffer size" in its load log), layer by layer as llama-kv-cache.cpp
    allocates it: a K row of n_kv_head x head_dim elements per cell for every layer that keeps
    attention (a layer with 0 KV heads gets an empty K); V the same with flash attention, but
    without it (V stored transposed) every layer, attention or not, gets a V as wide as the widest
    layer's ("padding V cache").  ``kv_type`` is the K type, ``type_v`` the V type (default: the
    same; a quantized V needs ``flash_attn``).  ``padded``: cells = the context rounded up as
    llama.cpp does (``kv_cells``); False counts exactly ``context`` cells (a partly filled cache)."""
    cells = kv_cells(context) if padded else int(context)
    width = shape.n_kv_head * shape.head_dim
    v_layers = shape.kv_layers if flash_attn else shape.n_layers
    return float(cells * width * (shape.kv_layers * KV_BYTES[kv_type] + v_layers * KV_BYTES[type_v or kv_type]))


def attention_bytes(shape: Shape, context: int, n_ubatch: int = N_UBATCH, flash_attn: bool = False) -> float:
    """Resident attention scratch: the K·Q scores of a micro-batch over the whole context without
    flash attention (none when no layer keeps attention), a few rows per position with it."""
    u = min(n_ubatch, context)
    if flash_attn:
        return 4.0 * shape.n_embd * u * FA_FACTOR
    return 4.0 * shape.n_head * context * u * KQ_FACTOR if shape.kv_layers else 0.0


def as_mode(cache: CacheMode | str) -> CacheMode:
    """A cache mode from a mode or a label / bare type (``f16``: no flash attention)."""
    return cache if isinstance(cache, CacheMode) else CacheMode.parse(cache)


def cache_bytes(shape: Shape, context: int, cache: CacheMode | str = "f16", padded: bool = True) -> float:
    """The KV cache of a cache mode (K and V types, flash attention's per-layer V)."""
    m = as_mode(cache)
    return kv_bytes(shape, context, m.type_k, flash_attn=m.flash_attn, type_v=m.type_v, padded=padded)


def reserved_compute_bytes(shape: Shape, context: int, n_ubatch: int = N_UBATCH) -> float:
    """llama.cpp's reserved CPU compute buffer: the larger of the micro-batch logits and the K·Q
    scores (the allocator reuses one region for both), plus a few activation rows."""
    u = min(n_ubatch, context)
    return 4.0 * u * max(shape.n_vocab, shape.n_head * context) + 4.0 * u * 2 * shape.n_embd + 330.0 * context


def predict(
    shape: Shape,
    weight_bytes: float,
    context: int,
    cache: CacheMode | str = "f16",
    repack_bytes: float = 0.0,
    overhead_mb: float = DEFAULT_OVERHEAD_MB,
    kv_tokens: int | None = None,
    margin: bool = True,
) -> MemoryPrediction:
    """Resident peak for a run that fills ``kv_tokens`` cells of the cache (default: all of it)
    with this cache mode.  The K·Q scores are sized by the allocated context whatever the fill (measured).
    ``margin``: add the measured error (what a budget is checked against); False gives the point
    estimate (what a measurement is compared with)."""
    m = as_mode(cache)
    p = MemoryPrediction(
        weights_mb=weight_bytes / MIB,
        repack_mb=repack_bytes / MIB,
        kv_mb=cache_bytes(shape, min(context, kv_tokens or context), m, padded=kv_tokens is None) / MIB,
        attention_mb=attention_bytes(shape, context, flash_attn=m.flash_attn) / MIB,
        overhead_mb=overhead_mb,
    )
    if margin:
        p.margin_mb = margin_rate(shape, m) * p.total_mb
    return p
