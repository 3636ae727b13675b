"""The package a build hands over: the artifact plus the evidence (manifest.json for machines;
report.md, plots and a model card for people; ready-to-run commands)."""

from __future__ import annotations

import hashlib
import json
import shutil
from importlib import metadata
from pathlib import Path

from . import __version__
from .cache import atomic_write_text


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict:
    out = {"mka-edge": __version__}
    for dist in ("torch", "transformers", "gguf", "llama-cpp-python", "onnx", "onnxruntime", "onnxruntime-genai", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


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


def onnx_run_commands(artifact: str, context: int, threads: int) -> str:
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


def _artifact_line(chosen: dict, summary: dict, layers: int) -> str:
    if summary.get("format") == "onnx":
        ops = ", ".join(f"{k} x{v}" for k, v in summary["quantized_ops"].items()) or "float weights"
        return (f"`{chosen['artifact']}/` — ONNX, {summary['model_bytes'] / 2**20:.1f} MiB of model files, "
                f"{summary['block_count']} of {layers} layers, {chosen['quant']} ({ops})")
    return (f"`{chosen['artifact']}` — {summary['file_bytes'] / 2**20:.1f} MiB, {summary['block_count']} of "
            f"{layers} layers, {summary['bits_per_weight']:.2f} bits/weight")


def _report(plan: dict, chosen: dict, summary: dict, val: dict, attempts: list, mem: dict, device_tps: float) -> str:
    p, ch, a, lat = plan["profile"], plan["choice"], val["accuracy"], val["latency"]
    pred = next((c for c in plan["candidates"] if (c["k"], c["quant"]) == (chosen["k"], chosen["quant"])), ch["predicted"])
    lines = [f"# mka-edge build report: {plan['model']['spec']} for {p['name']}", "",
             f"{p['description']}", "",
             f"**Artifact:** {_artifact_line(chosen, summary, plan['model']['layers'])}.", "",
             f"**Why this plan:** {plan['reason']}.", "",
             "## Predicted on the device vs measured on the build host", "",
             "| measure | predicted (device) | measured (build host) |", "|---|---|---|",
             f"| peak memory ({mem['runtime']}) | {mem['predicted_device_mb']:.0f} MB of {plan['budget']['memory_mb']:.0f} MB budget "
             f"| {mem['measured_host_rss_mb']:.0f} MB peak RSS over {mem['host_run']} (predicted for that run: {mem['predicted_host_mb']:.0f} MB) |",
             f"| generation tokens/s | {device_tps:.1f} (from {p['bandwidth_gbps']:g} GB/s) | {lat['gen_tps']['median']:.1f} (host, not the device) |",
             f"| quality loss (mean KL, nats) | {pred['kl']:.3f} | {a['kl']:.3f} (bar {plan['budget']['max_quality_loss']:g}) |",
             f"| perplexity change | | {a['ppl_change_pct']:+.1f}% ({a['ppl']:.2f} vs {a['ref_ppl']:.2f}) |",
             f"| top-1 agreement | | {100 * a['top1']:.1f}% |"]
    if "mmlu" in a:
        m = a["mmlu"]
        lines.append(f"| MMLU letter accuracy | | {100 * m['accuracy']:.1f}% [{100 * m['ci95'][0]:.0f}-{100 * m['ci95'][1]:.0f}], chance 25% |")
    h = attempts[-1].get("heal") if attempts else None
    if h:
        unhealed = plan["curve"].get("unhealed_kl") or []
        pred_u = unhealed[chosen["k"]] if chosen["k"] < len(unhealed) else float("nan")
        lines += ["", f"## Healing ({h['steps']} distillation steps, {h['train']})", "",
                  "| merged model, held-out KL to the source (nats) | before healing | after healing |", "|---|---|---|",
                  f"| predicted by the plan (merge curve) | {pred_u:.3f} | {plan['curve']['kl'][chosen['k']]:.3f} |",
                  f"| measured on this merge (PyTorch, before export) | {h['heldout_kl_before']:.3f} | {h['heldout_kl_after']:.3f} |"]
    lines += ["", "## Plans considered (Pareto front: memory vs predicted quality)", "",
              "| K | layers | quant | memory MB | device tok/s (pred.) | KL (pred.) | fits |", "|---|---|---|---|---|---|---|"]
    for c in plan["pareto"]:
        fits = "yes" if c["fits_memory"] and c["fits_speed"] else ("no: memory" if not c["fits_memory"] else "no: speed")
        star = " **chosen**" if (c["k"], c["quant"]) == (chosen["k"], chosen["quant"]) else ""
        lines.append(f"| {c['k']} | {c['layers']} | {c['quant']}{star} | {c['memory_mb']:.1f} | {c['tps']:.1f} | {c['kl']:.3f} | {fits} |")
    lines += ["", "![Pareto plot](pareto.png)", "", "![Layer similarity](similarity.png)", "",
              "## Attempts", "", "| K | quant | measured KL | passed |", "|---|---|---|---|"]
    lines += [f"| {t['k']} | {t['quant']} | {t['measured_kl']:.4f} | {t['passed']} |" for t in attempts]
    lines += ["", "## How the predictions are made", ""] + [f"- {k}: {v}" for k, v in plan["models"].items()]
    lines += ["", "Host figures were measured on the machine that ran the build; they are not device figures."]
    return "\n".join(lines) + "\n"


def _model_card(plan: dict, chosen: dict, summary: dict, val: dict) -> str:
    if summary.get("format") == "onnx":
        how = "exported by onnxruntime-genai's model builder and quantized by onnxruntime's MatMulNBits quantizer"
        fmt = "ONNX folder for onnxruntime-genai / onnxruntime (CPU provider)"
        size = f"{summary['model_bytes'] / 2**20:.1f} MiB of model files"
        prov = "`mka_edge.json` in the folder and `mka_edge.*` metadata in model.onnx"
    else:
        how = "quantized by llama.cpp's quantizer"
        fmt = "GGUF (llama.cpp, llama-cpp-python, Ollama, LM Studio)"
        size = f"{summary['file_bytes'] / 2**20:.1f} MiB, {summary['bits_per_weight']:.2f} bits/weight"
        prov = "the GGUF's `mka_edge.*` metadata"
    return f"""# {Path(chosen['artifact']).stem}

{plan['model']['spec']} packaged by mka-edge {__version__} for **{plan['profile']['name']}**:
{chosen['k']} of {plan['model']['layers']} transformer layers merged away ({plan['choice']['method']}), then
{chosen['quant']}, {how}.

- Format: {fmt}
- Size: {size}
- Quality loss against the source model: mean KL {val['accuracy']['kl']:.3f} nats, perplexity {val['accuracy']['ppl_change_pct']:+.1f}%,
  top-1 agreement {100 * val['accuracy']['top1']:.1f}% on held-out Wikipedia text
- Licence: that of the source model; calibration text: Wikipedia (CC BY-SA)
- Provenance: {prov} (method, merged-layer map, source hash); details in report.md

Merged models lose knowledge and fluency in ways the figures above only sample: test on your task.
"""


def _modelfile(artifact: str, context: int) -> str:
    return f"FROM ./{artifact}\nPARAMETER num_ctx {context}\n"


def package(folder: Path, plan: dict, ctx, chosen: dict, summary: dict, val: dict, attempts: list,
            merged_dir: Path | None, prof) -> dict:
    """Write everything beside the artifact in ``folder`` and return the manifest."""
    from .plots import pareto_plot, similarity_heatmap
    from .solver.memory import Shape, kv_bytes, predict
    from .solver.speed import bytes_per_token, efficiency, predict_tps

    folder = Path(folder)
    context = plan["budget"]["context"]
    shape = Shape.from_config(ctx.model.config).with_layers(summary["block_count"])
    onnx = summary.get("format") == "onnx"
    if onnx:
        from .solver.onnx_memory import onnx_kv_bytes, predict_onnx

        ratio = plan["quant_costs"][chosen["quant"]].get("resident_ratio", 1.0)
        weights = float(summary["weight_bytes"])
        dev = predict_onnx(shape, weights, ratio, context, chosen["quant"])
        # onnxruntime-genai allocates the whole context's KV buffer up front: the validation run is the device run
        used = context
        host = predict_onnx(shape, weights, ratio, context, chosen["quant"], prompt_tokens=val["latency"]["prompt_tokens"])
        kv_full = onnx_kv_bytes(shape, context, chosen["quant"])
    else:
        from .solver.quant_probe import tensor_bytes_split

        split = tensor_bytes_split(folder / chosen["artifact"])
        repack = float(sum(split["repack_per_layer"]))
        weights = float(summary["tensor_bytes"])
        dev = predict(shape, weights, context, prof.kv_cache_type, repack_bytes=repack)
        # the validation run fills only prompt + generated tokens of the cache; predict that run too
        used = min(context, val["latency"]["prompt_tokens"] + val["latency"]["gen_tokens"])
        host = predict(shape, weights, context, prof.kv_cache_type, repack_bytes=repack, kv_tokens=used)
        kv_full = kv_bytes(shape, context, prof.kv_cache_type)
    eff, eff_src = efficiency(prof.format)
    device_tps = predict_tps(prof.bandwidth_gbps, bytes_per_token(weights, kv_full, shape.tied_embeddings), eff)
    lat = val["latency"]
    run = (f"a {lat['prompt_tokens']}-token prompt + {lat['gen_tokens']} tokens with the KV buffer for {context}" if onnx
           else f"a {used}-token run")
    mem = {"runtime": "onnxruntime-genai" if onnx else "llama.cpp", "host_run": run,
           "predicted_device_mb": dev.total_mb, "predicted_device_terms": dev.as_dict(),
           "predicted_host_mb": host.total_mb, "predicted_host_context": used,
           "measured_host_rss_mb": val["latency"]["peak_rss_mb"],
           "host_error_pct": 100 * (host.total_mb / val["latency"]["peak_rss_mb"] - 1)}
    atomic_write_text(folder / "plan.json", json.dumps(plan, indent=2))
    atomic_write_text(folder / "validation.json", json.dumps(val, indent=2))
    if merged_dir is not None:
        shutil.copy(merged_dir / "merge_log.json", folder / "merge_log.json")
    sim = ctx.similarity()
    similarity_heatmap(sim.matrix.numpy(), folder / "similarity.png", f"{plan['model']['spec']}: layer similarity (NMI)")
    chosen_c = next(c for c in plan["candidates"] if (c["k"], c["quant"]) == (chosen["k"], chosen["quant"]))
    pareto_plot(plan["candidates"], plan["pareto"], chosen_c, plan["budget"]["memory_mb"], folder / "pareto.png",
                f"{plan['model']['spec']} on {prof.name}: plans")
    atomic_write_text(folder / "report.md", _report(plan, chosen, summary, val, attempts, mem, device_tps))
    atomic_write_text(folder / "README.md", _model_card(plan, chosen, summary, val))
    if onnx:
        atomic_write_text(folder / "RUN.md", onnx_run_commands(chosen["artifact"], context, prof.threads))
    else:
        atomic_write_text(folder / "RUN.md", run_commands(chosen["artifact"], context, prof.threads))
        atomic_write_text(folder / "Modelfile", _modelfile(chosen["artifact"], context))
    files = {}
    for f in sorted(folder.rglob("*")):
        rel = f.relative_to(folder).as_posix()
        if f.is_file() and rel != "manifest.json" and not any(part.startswith(".") for part in f.relative_to(folder).parts):
            files[rel] = {"sha256": _sha256(f), "bytes": f.stat().st_size}
    manifest = {
        "mka_edge": __version__, "versions": _versions(), "profile": prof.name, "model": plan["model"],
        "format": summary.get("format", "gguf"),
        "artifact": chosen["artifact"], "files": files, "plan": plan["choice"], "reason": plan["reason"],
        "host_figures": {"label": "measured on the build host, not the device", "latency": val["latency"],
                         "accuracy": val["accuracy"]},
        "device_predictions": {"label": "predicted for the device from its profile", "memory_mb": dev.total_mb,
                               "generation_tps": device_tps, "efficiency_source": eff_src},
        "memory": mem, "attempts": attempts,
    }
    atomic_write_text(folder / "manifest.json", json.dumps(manifest, indent=2))
    return manifest
