"""onnxruntime target: an ONNX folder written by onnxruntime-genai's model builder (MatMulNBits
quantization by onnxruntime), run by onnxruntime-genai.

onnx and the builder are imported inside the methods that use them (see targets/gguf.py).
"""

from __future__ import annotations

from pathlib import Path

from ..cache import atomic_write_text
from ..errors import UserError
from ..records import ArtifactSummary, MeasuredCosts, QuantCost
from ..solver import onnx_memory, speed
from ..validate.formats import Format, check_count, compare_tokens, dist_version
from ..validate.workers import ONNX_WORKER
from .base import ReportMemory, Target, register

# fp16 is left out by default: the CPU provider runs it upcast, with more memory than fp32 and no
# more speed (docs/results.md); it is for GPU/NPU devices; ask for it with --quants.
PLAN_QUANTS = ("fp32", "int8", "int4-mixed", "int4")
# ONNX types mapped to the llama.cpp type with the nearest scheme, for the published prior.
PRIOR_AS = {"fp32": "F16", "fp16": "F16", "int8": "Q8_0", "int4-mixed": "Q4_K_M", "int4": "Q4_0"}


def run_commands(artifact: str, context: int, threads: int) -> str:
    return f"""# Running `{artifact}/`

The folder is a complete onnxruntime-genai model: `model.onnx` (+ `model.onnx.data`, the weights),
`genai_config.json` (KV cache sized for {context} tokens), tokenizer files.

Python (`pip install onnxruntime-genai`):

```python
import onnxruntime_genai as og

model = og.Model("{artifact}")
tokenizer = og.Tokenizer(model)
params = og.GeneratorParams(model)
params.set_search_options(max_length={context})
generator = og.Generator(model, params)
generator.append_tokens(tokenizer.encode("The capital of France is"))
stream = tokenizer.create_stream()
while not generator.is_done():
    generator.generate_next_token()
    print(stream.decode(generator.get_next_tokens()[0]), end="", flush=True)
```

Threads: set `"intra_op_num_threads": {threads}` under `model.decoder.session_options` in
`genai_config.json`. Android and iOS: the onnxruntime-genai mobile packages load the same folder.
Plain onnxruntime can run `model.onnx` too (inputs `input_ids`, `attention_mask`,
`past_key_values.N.key/value`), but then the application owns the KV cache and the sampling loop.
"""


# ---- validation adapter ----


def _inspect(path: Path) -> dict:
    from ..exporters.onnx_inspect import inspect_onnx

    info = inspect_onnx(path)
    info["model_path"] = info["path"]  # the worker takes the export folder
    return info


def _vocab(artifact: Path, info: dict, lm) -> None:
    n = check_count(info["n_vocab"], lm)
    tok_file = Path(info["path"]) / "tokenizer.json"
    if not tok_file.is_file():
        raise UserError(f"{info['path']} has no tokenizer.json; re-export the model")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_file))
    compare_tokens([tok.id_to_token(i) for i in range(n)], lm, n)


def _kv(kv_type: str | None, flash_attn: str | None, info: dict) -> str:
    """onnxruntime-genai keeps the KV cache in the model's I/O type; it is not a runtime choice."""
    return "f16" if info.get("quant") == "fp16" else "f32"


def _rows(art: dict) -> list[tuple[str, str]]:
    ops = ", ".join(f"{k} x{v}" for k, v in art["quantized_ops"].items()) or "none (float weights)"
    return [
        ("model files", f"{art['model_bytes'] / 2**20:.1f} MiB (weights {art['weight_bytes'] / 2**20:.1f} MiB)"),
        ("quant type (quantized ops)", f"{art.get('quant') or 'unknown'} ({ops})"),
    ]


def _default_out(p: Path) -> Path:
    folder = p if p.is_dir() else p.parent
    return folder.with_name(f"{folder.name}-validation")


VALIDATION = Format(
    "onnx",
    ONNX_WORKER,
    "onnxruntime (CPU provider) + onnxruntime-genai",
    lambda: f"{dist_version('onnxruntime')} / genai {dist_version('onnxruntime-genai')}",
    _inspect,
    _vocab,
    _kv,
    _rows,
    _default_out,
)


@register
class OnnxTarget(Target):
    name = "onnx"
    runtime = "onnxruntime"
    runtime_label = "onnxruntime-genai"
    artifact_kind = "an ONNX export (folder or .onnx)"
    default_quants = PLAN_QUANTS
    default_export_quant = "int4-mixed"
    sizes_are_exact = False
    memory_model = (
        "weights x resident ratio (measured per type) + KV buffer of the whole context + prefill logits "
        "(512-token prompt) + overhead, onnxruntime-genai CPU provider"
    )
    speed_calibration_file = "speed_calibration-onnx.json"
    export_options = ("context", "single_file")

    def check_quants(self, quants: list[str] | None) -> list[str]:
        from ..exporters.onnx import onnx_quant

        return [onnx_quant(q).name for q in (quants or self.default_quants)]

    def type_sizes(self, ms, quants: list[str], measure: bool) -> dict[str, QuantCost]:
        """Nominal bytes of each type and a resident share of 1: a lower bound on its memory."""
        from ..exporters.onnx import onnx_quant

        out = {}
        for q in quants:
            bpw = onnx_quant(q).bytes_per_weight
            out[q] = QuantCost(
                q,
                self.name,
                tuple(p * bpw for p in ms.block_params),
                ms.other_params * bpw,
                (0.0,) * ms.n_layers,
                None,
                {},
                1.0,
            )
        return out

    def quant_costs(
        self, lm, ms, sizes, quants, *, measure, progress, calibrate_speed, log, imatrix=True
    ) -> MeasuredCosts:
        if not measure:
            from ..solver.quant_prior import PUBLISHED, SOURCE

            costs = {
                q: c.with_kl(PUBLISHED[PRIOR_AS[q]][1], source=f"prior: llama.cpp {PRIOR_AS[q]} figure")
                for q, c in sizes.items()
            }
            return MeasuredCosts(
                costs,
                f"prior: {SOURCE}, each ONNX type read as the nearest llama.cpp scheme; "
                "it does not transfer to every model",
            )
        from ..solver.onnx_probe import probe_onnx

        log("measuring each ONNX quant type on this model in onnxruntime (cached after the first plan)")
        costs = probe_onnx(lm, quants, progress=progress)
        eff = None
        if calibrate_speed and "int8" in costs:  # the speed model starts from int8's timed decode
            d = costs["int8"]
            eff = speed.calibrate(d["host_gen_tps"], sum(d["per_layer"]) + d["other"], self.name, lm.fingerprint)
        return MeasuredCosts(
            {q: QuantCost.from_json(q, self.name, d) for q, d in costs.items()},
            "measured on this model (onnxruntime-genai builder + onnxruntime quantizer, held-out KL in onnxruntime)",
            eff,
        )

    def kv_bytes(self, shape, context, quant, kv_type):
        return onnx_memory.onnx_kv_bytes(shape, context, quant)

    def predict_memory(self, shape, cost, weight_bytes, repack_bytes, context, kv_type, overhead_mb):
        return onnx_memory.predict_onnx(shape, weight_bytes, cost.resident_ratio, context, cost.quant)

    def cache_modes(self, kv_cache_type, flash_attention, head_dim):
        if kv_cache_type not in ("auto", "f32", "f16"):
            raise UserError(
                f"onnxruntime-genai keeps the KV cache in the model's I/O type (f32; f16 for fp16): a {kv_cache_type} "
                "cache is a llama.cpp choice; use --kv-type auto (or f32/f16) with an onnxruntime profile"
            )
        return [self.kv_cache_label(kv_cache_type)]

    def kv_cache_label(self, kv_type: str) -> str:
        return "model I/O type (f32; f16 for fp16)"

    def validation_kv_type(self, kv_type: str) -> str | None:
        return None

    def artifact_name(self, tag: str) -> str:
        return f"{tag}-onnx"

    def export(self, lm, out, quant, *, context, progress, imatrix=False, made=None, tensor_types=None):
        from ..exporters.onnx import export_loaded_onnx

        return self.summary(export_loaded_onnx(lm, out, quant, context=context, progress=progress))

    def export_disk_bytes(self, config, quant, artifact_bytes, *, from_folder):
        """The exporter's own peak: weights, small files, and a float32 source copy for the builder
        when the model has no folder of its own to be read from."""
        from ..exporters.gguf import f32_bytes
        from ..exporters.onnx import disk_need_bytes, onnx_quant

        n_params = f32_bytes(config) // 4
        return float(disk_need_bytes(n_params, onnx_quant(quant), False, saves_source=not from_folder))

    def export_spec(self, model, out, quant, options):
        from ..exporters.onnx import export_onnx

        return self.summary(export_onnx(model, out, quant, **options))

    def summary(self, info: dict) -> ArtifactSummary:
        return ArtifactSummary(
            self.name,
            str(info.get("path", "")),
            info.get("quant"),
            int(info["block_count"]),
            int(info["model_bytes"]),
            int(info["weight_bytes"]),
            None,
            dict(info["quantized_ops"]),
            info,
        )

    def claims(self, artifact: Path) -> bool:
        return artifact.is_dir() or artifact.suffix.lower() == ".onnx"

    @property
    def validation(self) -> Format:
        return VALIDATION

    def describe_export(self, s):
        ops = ", ".join(f"{k} x{v}" for k, v in s.tensor_types.items()) or "no quantized ops"
        return (
            f"wrote {s.path}: {s.file_bytes / 2**20:.1f} MiB of model files, {s.block_count} layers, "
            f"{s.quant} ({ops}), KV cache sized for {s.raw['context']} tokens"
        )

    def report_memory(self, folder, artifact, quant, summary, plan, latency, shape, kv_type):
        ratio = plan.quant_costs[quant].get("resident_ratio", 1.0)
        weights = float(summary.weight_bytes)
        context = plan.budget.context
        dev = onnx_memory.predict_onnx(shape, weights, ratio, context, quant)
        # onnxruntime-genai allocates the whole context's KV buffer up front: the validation run is the device run
        host = onnx_memory.predict_onnx(shape, weights, ratio, context, quant, prompt_tokens=latency["prompt_tokens"])
        run = f"a {latency['prompt_tokens']}-token prompt + {latency['gen_tokens']} tokens with the KV buffer for {context}"
        return ReportMemory(dev, host, context, run, weights, onnx_memory.onnx_kv_bytes(shape, context, quant))

    def artifact_line(self, artifact, quant, summary, layers):
        ops = ", ".join(f"{k} x{v}" for k, v in summary.tensor_types.items()) or "float weights"
        return (
            f"`{artifact}/` — ONNX, {summary.file_bytes / 2**20:.1f} MiB of model files, "
            f"{summary.block_count} of {layers} layers, {quant} ({ops})"
        )

    def card_facts(self, summary):
        return {
            "how": "exported by onnxruntime-genai's model builder and quantized by onnxruntime's MatMulNBits quantizer",
            "format": "ONNX folder for onnxruntime-genai / onnxruntime (CPU provider)",
            "size": f"{summary.file_bytes / 2**20:.1f} MiB of model files",
            "provenance": "`mka_edge.json` in the folder and `mka_edge.*` metadata in model.onnx",
        }

    def write_run_files(self, folder, artifact, context, threads, cache=""):
        atomic_write_text(folder / "RUN.md", run_commands(artifact, context, threads))
