"""llama.cpp target: a GGUF file, quantized by llama.cpp's own quantizer, run by llama-cpp-python.

The heavy parts (torch, gguf-py, llama.cpp's bindings) are imported inside the methods that use
them, so that listing targets, profiles or `--help` does not load them.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from ..cache import atomic_write_text
from ..errors import UserError
from ..kv_cache import BASELINE_CACHE
from ..records import ArtifactSummary, Efficiency, MeasuredCosts, QuantCost
from ..solver import memory
from ..solver.speed import efficiency
from ..validate.formats import Format, check_count, compare_tokens, dist_version
from ..validate.workers import GGUF_WORKER
from .base import ReportMemory, Target, register

# IQ4_XS / IQ3_M: 256-wide blocks; where a row is not a multiple of 256 (SmolLM2's 576) llama.cpp
# falls back per tensor (IQ4_NL), as the measured sizes show
PLAN_QUANTS = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "IQ4_XS", "Q3_K_M", "IQ3_M", "Q2_K")


def run_commands(artifact: str, context: int, threads: int, cache: str = BASELINE_CACHE) -> str:
    """RUN.md: the artifact's memory figures hold in the plan's cache mode, so every command sets it."""
    from ..kv_cache import CacheMode

    m = CacheMode.parse(cache or BASELINE_CACHE)
    kw = m.llama_kwargs()
    flags = f" -fa {'on' if m.flash_attn else 'off'} -ctk {m.type_k} -ctv {m.type_v}"
    py = f", flash_attn={m.flash_attn}, type_k={kw['type_k']}, type_v={kw['type_v']}"
    ollama_env = (
        f"OLLAMA_FLASH_ATTENTION={int(m.flash_attn)} OLLAMA_KV_CACHE_TYPE={m.type_k} "
        if m.label != BASELINE_CACHE
        else ""
    )
    return f"""# Running `{artifact}`

The plan's memory and quality figures are for the KV cache mode **{m.label}** ({m.attention} attention,
K cache {m.type_k}, V cache {m.type_v}); the commands below set it.

llama.cpp command line:

```bash
llama-cli -m {artifact} -c {context} -t {threads}{flags} -cnv
```

llama.cpp server (OpenAI-compatible API on port 8080):

```bash
llama-server -m {artifact} -c {context} -t {threads}{flags} --port 8080
```

Python (llama-cpp-python; type_k / type_v are ggml type ids):

```python
from llama_cpp import Llama

llm = Llama(model_path="{artifact}", n_ctx={context}, n_threads={threads}{py})
print(llm.create_chat_completion([{{"role": "user", "content": "Hello!"}}])["choices"][0]["message"]["content"])
```

Ollama (with the `Modelfile` in this folder; the cache mode is a server setting):

```bash
{ollama_env}ollama serve &
ollama create my-edge-model -f Modelfile && ollama run my-edge-model
```
"""


def modelfile(artifact: str, context: int) -> str:
    return f"FROM ./{artifact}\nPARAMETER num_ctx {context}\n"


# ---- validation adapter ----


def resolve_cache_mode(kv: str | None, flash_attn: str | None):
    """The cache mode a validation runs: ``kv`` a type (K and V) or a ``K/V[+fa]`` label (None or
    ``auto``: f16); ``flash_attn`` on / off / auto (None: auto = on exactly when the V type needs it)."""
    from ..kv_cache import CacheMode

    mode = CacheMode.parse(kv if kv and kv != "auto" else "f16")
    if flash_attn in ("on", "off"):
        mode = CacheMode(mode.type_k, mode.type_v, flash_attn == "on")
    return mode


def _inspect(path: Path) -> dict:
    from ..exporters.gguf_inspect import inspect_gguf

    return inspect_gguf(path)


def _vocab(artifact: Path, info: dict, lm) -> None:
    from ..exporters.gguf_inspect import gguf_tokens

    n = check_count(info["n_vocab"], lm)
    compare_tokens(gguf_tokens(artifact, n), lm, n)


def _rows(art: dict) -> list[tuple[str, str]]:
    types = ", ".join(f"{k} {v}" for k, v in art["tensor_types"].items())
    return [
        ("file size", f"{art['file_bytes'] / 2**20:.1f} MiB"),
        ("bits per weight (tensor types written)", f"{art['bits_per_weight']:.2f} ({types})"),
    ]


VALIDATION = Format(
    "gguf",
    GGUF_WORKER,
    "llama.cpp (llama-cpp-python)",
    lambda: dist_version("llama-cpp-python"),
    _inspect,
    _vocab,
    lambda kv, fa, info: resolve_cache_mode(kv, fa).label,
    _rows,
    lambda p: p.with_name(f"{p.stem}-validation"),
)


@register
class GgufTarget(Target):
    name = "gguf"
    runtime = "llama.cpp"
    runtime_label = "llama.cpp"
    artifact_kind = "a .gguf file"
    default_quants = PLAN_QUANTS
    default_export_quant = "Q4_K_M"
    sizes_are_exact = True
    per_tensor_types = True  # llama.cpp's quantizer takes tt_overrides
    memory_model = "weights (tensor types llama.cpp writes) + KV + compute buffer + overhead, llama.cpp CPU backend"
    speed_calibration_file = "speed_calibration.json"
    export_options = ("pre_tokenizer", "threads", "calibration", "imatrix", "intermediate")

    def check_quants(self, quants: list[str] | None) -> list[str]:
        from ..exporters.quant_types import quant_type

        # types that need an importance matrix are measured and exported with one (cached per model)
        out = [quant_type(q).name for q in (quants or self.default_quants)]
        if any(quant_type(q).per_tensor for q in out):
            raise UserError("--quants takes one type per model; per-tensor types are --mixed")
        return out

    def type_sizes(self, ms, quants: list[str], measure: bool) -> dict[str, QuantCost]:
        from ..solver.feasibility import gguf_type_sizes

        if not measure:
            self._check_prior(quants)  # before the dry run: an unknown type is refused first
        exact = gguf_type_sizes(ms, quants)  # llama.cpp's dry run: seconds even at 70B (a sparse file)
        if measure:
            return {q: QuantCost.from_json(q, self.name, d) for q, d in exact.items()}
        return {q: QuantCost.from_json(q, self.name, {**exact[q], **self._prior_kl(q)}) for q in quants}

    def _check_prior(self, quants: list[str]) -> None:
        from ..solver.quant_prior import KNOWN

        unknown = [q for q in quants if q not in KNOWN]
        if unknown:
            raise UserError(f"no published prior for {', '.join(unknown)}; use types from {', '.join(KNOWN)}")

    def _prior_kl(self, q: str) -> dict:
        """The KL fields of llama.cpp's published Llama-3-8B table for ``q`` (``kl``, ``imatrix``,
        ``kl_plain`` / ``kl_imatrix``, ``source``): the quality a model too large to probe is
        planned with.  Its bytes are not taken from the table's bits per weight: the dry run gives
        the exact per-tensor types this model gets (row widths, tied embedding, llama.cpp's mixes)."""
        from ..solver.quant_prior import prior_entry

        keep = ("kl", "imatrix", "kl_plain", "kl_imatrix", "source")
        return {k: v for k, v in prior_entry(q, [0], 0).items() if k in keep}

    def quant_costs(
        self, lm, ms, sizes, quants, *, measure, progress, calibrate_speed, log, imatrix=True, session=None
    ) -> MeasuredCosts:
        from ..solver.quant_prior import SOURCE

        if not measure:
            return MeasuredCosts(sizes, f"prior: {SOURCE}; measured on Llama-3-8B, it does not transfer to every model")
        from ..solver.quant_probe import ProbeSession

        with contextlib.ExitStack() as stack:
            if session is None:
                log(
                    "measuring each quant type on this model with llama.cpp, plain and with an importance matrix "
                    "(cached after the first plan)"
                )
                session = stack.enter_context(ProbeSession(lm, progress=progress, imatrix=imatrix))
            costs = session.measure(quants)
            # the host's decode speed, timed on the Q8_0 file the probe just wrote
            eff = session.calibrate() if calibrate_speed and "Q8_0" in quants else None
        # each cost is the better of plain and importance-matrix quantization; extra["imatrix"]
        # (with kl_plain / kl_imatrix) says which, and is what the build exports with
        return MeasuredCosts(
            {q: QuantCost.from_json(q, self.name, d) for q, d in costs.items()},
            "measured on this model (llama.cpp quantizer, held-out KL; per type the better of plain "
            "and importance-matrix quantization)",
            eff,
        )

    def probe_session(self, lm, *, progress, imatrix, plain_too=True):
        from ..solver.quant_probe import ProbeSession

        return ProbeSession(lm, progress=progress, imatrix=imatrix, plain_too=plain_too)

    def calibrate_speed(self, session, quants) -> Efficiency:
        """The host's decode efficiency on a Q8_0 file, as the Q8_0 probe would calibrate it; a plan
        without Q8_0 among its types never calibrated, and gets this host's prior."""
        if "Q8_0" in quants:
            return session.calibrate()
        return efficiency(self.name, session.lm.fingerprint)

    def source_grids(self, lm) -> frozenset[str]:
        """Tensor types that can hold a GGUF source's own grid exactly (``quant_types.GRIDS_CONTAINING``):
        the precision order of solver/scope.py does not compare them."""
        from ..exporters.quant_types import GRIDS_CONTAINING

        if lm.source.get("kind") != "gguf":
            return frozenset()
        kinds = _inspect(Path(lm.source["path"]))["tensor_types"]
        return frozenset().union(*(GRIDS_CONTAINING.get(t.upper(), ()) for t in kinds))

    def kv_bytes(self, shape, context, quant, kv_type):
        return memory.cache_bytes(shape, context, kv_type)

    def predict_memory(self, shape, cost, weight_bytes, repack_bytes, context, kv_type, overhead_mb):
        return memory.predict(shape, weight_bytes, context, kv_type, repack_bytes=repack_bytes, overhead_mb=overhead_mb)

    def cache_modes(self, kv_cache_type, flash_attention, head_dim):
        from ..kv_cache import LLAMA_CPP_MODES, CacheMode, allowed_modes, block_fits

        table = LLAMA_CPP_MODES
        if kv_cache_type != "auto" and not any(m.type_k == kv_cache_type for m in table):  # f32: pinned only
            table = (CacheMode(kv_cache_type, kv_cache_type, False), CacheMode(kv_cache_type, kv_cache_type, True))
        modes = allowed_modes(table, flash_attention=flash_attention, kv_cache_type=kv_cache_type)
        modes = [m for m in modes if block_fits(m, head_dim)]
        if not modes:
            raise UserError(
                f"no KV cache mode is allowed: a {kv_cache_type} V cache needs flash attention, which "
                "flash_attention: false / --flash-attn off forbids; allow one or pin an f16 cache"
            )
        return [m.label for m in modes]

    def cache_costs(self, lm, modes, *, context, measure, progress, log, timed=True, session=None):
        from ..kv_cache import BASELINE, CacheMode
        from ..records import CacheCost

        if len(modes) == 1 and modes[0] == BASELINE_CACHE:
            return [CacheCost(modes[0])]
        if not measure:  # a model too large to probe: SmolLM2's measured costs as the prior
            from ..kv_cache import PRIOR_KL

            return [CacheCost(m, PRIOR_KL.get(m, PRIOR_KL.get(m.split("+")[0], 0.0))) for m in modes]
        from ..solver.cache_probe import probe_cache_modes

        log("measuring each KV cache mode on this model with llama.cpp (cached after the first plan)")
        res = probe_cache_modes(
            lm,
            [CacheMode.parse(m) for m in modes],
            progress=progress,
            context=context if timed else None,
            q8_file=session.q8_0 if session is not None else None,
        )
        return [
            CacheCost(m, res[m]["kl_cost"], res[m].get("speed_factor", 1.0), timed or m == BASELINE.label)
            for m in modes
        ]

    def cache_speed(self, lm, mode, *, context, progress, log, session=None):
        from ..kv_cache import CacheMode
        from ..records import CacheCost
        from ..solver.cache_probe import probe_cache_modes

        log(f"timing the {mode} KV cache at context {context} (a plan with it ranks first)")
        q8 = session.q8_0 if session is not None else None
        res = probe_cache_modes(lm, [CacheMode.parse(mode)], progress=progress, context=context, q8_file=q8)[mode]
        return CacheCost(mode, res["kl_cost"], res.get("speed_factor", 1.0))

    def supports_attention_removal(self, arch):
        return arch.gguf_attention_free_arch is not None

    def artifact_name(self, tag: str) -> str:
        return f"{tag}.gguf"

    def export(self, lm, out, quant, *, context, progress, imatrix=False, made=None, tensor_types=None):
        """``imatrix``: quantize with the model's cached importance matrix (the plan's
        ``QuantCost.extra["imatrix"]``); types that need one get it anyway.  ``made``: (file, its
        making) the quant probe already wrote of this unmerged model, moved instead of rewritten.
        ``tensor_types``: a mixed plan's {tensor: ggml type} in this model's names, in one quantize call."""
        from ..exporters.gguf import adopt_quantized, export_loaded

        if made is not None:
            return self.summary(adopt_quantized(made[0], out, made[1]))
        return self.summary(
            export_loaded(lm, out, quant, progress=progress, imatrix=bool(imatrix), tensor_types=tensor_types)
        )

    def made_by_probe(self, folder, lm, quant, imatrix):
        """The probe's file of ``quant`` (with or without an importance matrix as ``imatrix``) of
        this very model in the build's hand-over ``folder`` (planning.measure's ``keep``), with the
        facts of its making; None when there is none to reuse."""
        import json

        path, facts_path = Path(folder) / f"{quant}.gguf", Path(folder) / f"{quant}.json"
        if not (path.is_file() and facts_path.is_file()):
            return None
        facts = json.loads(facts_path.read_text())
        if facts.get("model") != lm.fingerprint or bool(facts.get("imatrix")) != bool(imatrix):
            return None
        facts.pop("model")
        return path, facts

    def export_disk_bytes(self, config, quant, artifact_bytes, *, from_folder):
        """The float intermediate gguf-py writes (F32 for small models, else the weights' 16-bit
        type) plus the quantized file, both in the scratch folder beside --out (F32/F16/BF16 artifacts
        are the float file itself)."""
        from ..exporters.gguf import f32_bytes, intermediate_type
        from ..exporters.quant_types import quant_type

        float_type = intermediate_type(config, quant)
        float_bytes = f32_bytes(config) * (1.0 if float_type == "F32" else 0.5)
        return float_bytes + (0.0 if quant_type(quant).direct else artifact_bytes)

    def export_spec(self, model, out, quant, options):
        from ..exporters.gguf import export_gguf

        return self.summary(export_gguf(model, out, quant, **options))

    def summary(self, info: dict) -> ArtifactSummary:
        return ArtifactSummary(
            self.name,
            str(info.get("path", "")),
            info.get("quant"),
            int(info["block_count"]),
            int(info["file_bytes"]),
            int(info["tensor_bytes"]),
            float(info["bits_per_weight"]),
            dict(info["tensor_types"]),
            info,
            info.get("allocation"),
        )

    def claims(self, artifact: Path) -> bool:
        return artifact.suffix.lower() == ".gguf"

    @property
    def validation(self) -> Format:
        return VALIDATION

    def describe_export(self, s):
        types = ", ".join(f"{k} x{v}" for k, v in s.tensor_types.items())
        return (
            f"wrote {s.path}: {s.file_bytes / 2**20:.1f} MiB, {s.block_count} layers, "
            f"{s.bits_per_weight:.2f} bits/weight ({types})"
        )

    def report_memory(self, folder, artifact, quant, summary, plan, latency, shape, kv_type):
        from ..solver.quant_probe import tensor_bytes_split

        split = tensor_bytes_split(folder / artifact)
        repack = float(sum(split["repack_per_layer"]))
        weights = float(summary.weight_bytes)
        context = plan.budget.context
        dev = memory.predict(shape, weights, context, kv_type, repack_bytes=repack)
        # the validation run fills only prompt + generated tokens of the cache; predict that run too
        used = min(context, latency["prompt_tokens"] + latency["gen_tokens"])
        # the point estimate (no margin), so that its error against the measured peak stays the model's own
        host = memory.predict(shape, weights, context, kv_type, repack_bytes=repack, kv_tokens=used, margin=False)
        return ReportMemory(
            dev, host, used, f"a {used}-token run", weights, memory.cache_bytes(shape, context, kv_type)
        )

    def artifact_line(self, artifact, quant, summary, layers):
        return (
            f"`{artifact}` — {summary.file_bytes / 2**20:.1f} MiB, {summary.block_count} of "
            f"{layers} layers, {summary.bits_per_weight:.2f} bits/weight"
        )

    def card_facts(self, summary):
        return {
            "how": "quantized by llama.cpp's quantizer",
            "format": "GGUF (llama.cpp, llama-cpp-python, Ollama, LM Studio)",
            "size": f"{summary.file_bytes / 2**20:.1f} MiB, {summary.bits_per_weight:.2f} bits/weight",
            "provenance": "the GGUF's `mka_edge.*` metadata",
        }

    def write_run_files(self, folder, artifact, context, threads, cache=BASELINE_CACHE):
        atomic_write_text(folder / "RUN.md", run_commands(artifact, context, threads, cache))
        atomic_write_text(folder / "Modelfile", modelfile(artifact, context))
