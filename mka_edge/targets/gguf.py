"""llama.cpp target: a GGUF file, quantized by llama.cpp's own quantizer, run by llama-cpp-python.

The heavy parts (torch, gguf-py, llama.cpp's bindings) are imported inside the methods that use
them, so that listing targets, profiles or `--help` does not load them.
"""

from __future__ import annotations

from pathlib import Path

from ..cache import atomic_write_text
from ..errors import UserError
from ..records import ArtifactSummary, QuantCost
from ..solver import memory
from ..validate.formats import Format, check_count, compare_tokens, dist_version
from .base import ReportMemory, Target, register

PLAN_QUANTS = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K")


def run_commands(artifact: str, context: int, threads: int) -> str:
    return f"""# Running `{artifact}`

llama.cpp command line:

```bash
llama-cli -m {artifact} -c {context} -t {threads} -cnv
```

llama.cpp server (OpenAI-compatible API on port 8080):

```bash
llama-server -m {artifact} -c {context} -t {threads} --port 8080
```

Python (llama-cpp-python):

```python
from llama_cpp import Llama

llm = Llama(model_path="{artifact}", n_ctx={context}, n_threads={threads})
print(llm.create_chat_completion([{{"role": "user", "content": "Hello!"}}])["choices"][0]["message"]["content"])
```

Ollama (with the `Modelfile` in this folder):

```bash
ollama create my-edge-model -f Modelfile && ollama run my-edge-model
```
"""


def modelfile(artifact: str, context: int) -> str:
    return f"FROM ./{artifact}\nPARAMETER num_ctx {context}\n"


# ---- validation adapter ----


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
    "mka_edge.validate.gguf_worker",
    "llama.cpp (llama-cpp-python)",
    lambda: dist_version("llama-cpp-python"),
    _inspect,
    _vocab,
    lambda kv, info: kv or "f16",
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
    memory_model = "weights (tensor types llama.cpp writes) + KV + compute buffer + overhead, llama.cpp CPU backend"
    speed_calibration_file = "speed_calibration.json"
    export_options = ("pre_tokenizer", "threads", "calibration", "intermediate")

    def check_quants(self, quants: list[str] | None) -> list[str]:
        from ..exporters.quant_types import quant_type

        names = [quant_type(q).name for q in (quants or self.default_quants)]
        for q in names:
            if quant_type(q).needs_imatrix:
                raise UserError(f"{q} needs an importance matrix; plans use types that do not (drop it from --quants)")
        return names

    def type_sizes(self, ms, quants: list[str], measure: bool) -> dict[str, QuantCost]:
        from ..solver.feasibility import gguf_type_sizes

        if measure:
            return {q: QuantCost.from_json(q, self.name, d) for q, d in gguf_type_sizes(ms, quants).items()}
        return self._prior(ms, quants)

    def _prior(self, ms, quants: list[str]) -> dict[str, QuantCost]:
        """Costs from llama.cpp's published Llama-3-8B table, sized for this model."""
        from ..solver.quant_prior import PUBLISHED, prior_entry

        unknown = [q for q in quants if q not in PUBLISHED]
        if unknown:
            raise UserError(f"no published prior for {', '.join(unknown)}; use types from {', '.join(PUBLISHED)}")
        return {q: QuantCost.from_json(q, self.name, prior_entry(q, ms.block_params, ms.other_params)) for q in quants}

    def quant_costs(self, lm, ms, sizes, quants, *, measure, progress, calibrate_speed, log):
        from ..solver.quant_prior import SOURCE

        if not measure:
            return sizes, f"prior: {SOURCE}; measured on Llama-3-8B, it does not transfer to every model"
        from ..solver.quant_probe import probe

        log("measuring each quant type on this model with llama.cpp (cached after the first plan)")
        costs = probe(lm, quants, progress=progress, calibrate_speed=calibrate_speed)
        return (
            {q: QuantCost.from_json(q, self.name, d) for q, d in costs.items()},
            "measured on this model (llama.cpp quantizer, held-out KL)",
        )

    def kv_bytes(self, shape, context, quant, kv_type):
        return memory.kv_bytes(shape, context, kv_type)

    def predict_memory(self, shape, cost, weight_bytes, repack_bytes, context, kv_type, overhead_mb):
        return memory.predict(shape, weight_bytes, context, kv_type, repack_bytes=repack_bytes, overhead_mb=overhead_mb)

    def artifact_name(self, tag: str) -> str:
        return f"{tag}.gguf"

    def export(self, lm, out, quant, *, context, progress):
        from ..exporters.gguf import export_loaded

        return self.summary(export_loaded(lm, out, quant, progress=progress))

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
        host = memory.predict(shape, weights, context, kv_type, repack_bytes=repack, kv_tokens=used)
        return ReportMemory(dev, host, used, f"a {used}-token run", weights, memory.kv_bytes(shape, context, kv_type))

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

    def write_run_files(self, folder, artifact, context, threads):
        atomic_write_text(folder / "RUN.md", run_commands(artifact, context, threads))
        atomic_write_text(folder / "Modelfile", modelfile(artifact, context))
