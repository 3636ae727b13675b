"""Memory model against llama.cpp: each predicted term against what llama.cpp reports for its
buffers, and the predicted total against measured peak RSS (llama-cpp-python, no all-position
logits), on SmolLM2 at F16 / Q8_0 / Q4_0 and two context lengths, plus a synthetic ~1B-parameter
llama (random weights) where the weights dominate.  The overhead term is fitted on one
configuration (SmolLM2 Q8_0, context 512) and the error reported on all the others.

    python bench/memory_model.py --out bench/results/memory_model
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from mka_edge.cache import atomic_write_text
from mka_edge.exporters.gguf import export_loaded
from mka_edge.exporters.gguf_inspect import inspect_gguf
from mka_edge.kv_cache import CacheMode
from mka_edge.models.loading import load_model
from mka_edge.solver.memory import MIB, Shape, predict, reserved_compute_bytes
from mka_edge.solver.quant_probe import tensor_bytes_split
from mka_edge.validate.jobs import LatencyJob
from mka_edge.validate.llama_buffers import reported_buffers
from mka_edge.validate.runner import run_child
from mka_edge.validate.workers import GGUF_WORKER as WORKER


def synthetic_1b(work: Path, tokenizer_dir: Path) -> Path:
    """A llama with ~1B parameters and random weights, SmolLM2's tokenizer (so export needs nothing else)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = work / "synthetic-1b"
    if (out / "config.json").is_file():
        return out
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = AutoConfig.for_model(
        "llama",
        vocab_size=len(tok),
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=18,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/results/memory_model"))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    work = args.out / "artifacts"
    work.mkdir(parents=True, exist_ok=True)
    lm = load_model("smollm2-135m", "cpu", torch.float32)
    # prompts fill the context, so the whole KV cache is touched and counts in RSS
    long_ids = lm.tokenizer("The history of the region and its people, told in order. " * 800)["input_ids"]
    configs = []
    for q in ("F16", "Q8_0", "Q4_0"):
        art = work / f"smollm2-{q}.gguf"
        if not art.is_file():
            export_loaded(lm, art, q, progress=False)
        configs += [("SmolLM2-135M", art, Shape.from_config(lm.model.config), ctx) for ctx in (512, 4096)]
        if q == "Q8_0":  # the cache modes (flash attention, quantized caches) on one file
            configs += [
                ("SmolLM2-135M", art, Shape.from_config(lm.model.config), ctx, mode)
                for mode in ("f16/f16+fa", "q8_0/q8_0+fa", "q4_0/q4_0+fa")
                for ctx in (512, 4096)
            ]
    syn_dir = synthetic_1b(work, Path(lm.source["model_dir"]))
    syn = load_model(str(syn_dir), "cpu", torch.float32)
    art = work / "synthetic-1b-Q8_0.gguf"
    if not art.is_file():
        export_loaded(syn, art, "Q8_0", pre_tokenizer="smollm", progress=False)
    configs += [("synthetic 1B", art, Shape.from_config(syn.model.config), ctx) for ctx in (512, 2048)]
    del lm, syn
    rows = []
    for name, art, shape, ctx, *rest in configs:
        mode = CacheMode.parse(rest[0] if rest else "f16/f16")
        info = inspect_gguf(art)
        rep = reported_buffers(
            str(art), ctx, args.threads, kv_type=mode.llama_kwargs()["type_k"], flash_attn=mode.flash_attn
        )
        lat = run_child(
            WORKER,
            LatencyJob(
                str(art),
                args.threads,
                context=ctx,
                prompt_ids=long_ids[: ctx - 48],
                gen_tokens=32,
                repeats=1,
                cache_mode=mode.label,
            ),
            1800,
            "latency",
        )
        repack = float(sum(tensor_bytes_split(art)["repack_per_layer"]))
        pred = predict(shape, info["tensor_bytes"], ctx, mode, repack_bytes=repack, overhead_mb=0.0)
        rows.append(
            {
                "model": name,
                "cache": mode.label,
                "quant": info["file_type"],
                "file": art.name,
                "context": ctx,
                "params": info["n_params"],
                "predicted": pred.as_dict(),
                "reported": rep,
                "predicted_reserved_compute_mb": reserved_compute_bytes(shape, ctx) / MIB,
                "measured_rss_mb": lat["peak_rss_mb"],
                "baseline_rss_mb": lat["baseline_rss_mb"],
            }
        )
        print(
            f"{name:14} {art.name:28} {mode.label:13} ctx {ctx:5}  measured {lat['peak_rss_mb']:8.1f} MiB  predicted w/o overhead {pred.total_mb:8.1f}",
            flush=True,
        )
    fit = next(r for r in rows if r["file"] == "smollm2-Q8_0.gguf" and r["context"] == 512 and r["cache"] == "f16/f16")
    overhead = fit["measured_rss_mb"] - fit["predicted"]["total_mb"]
    for r in rows:
        r["predicted"]["overhead_mb"] = round(overhead, 2)
        r["predicted"]["total_mb"] = round(r["predicted"]["total_mb"] + overhead, 2)
        r["error_pct"] = 100 * (r["predicted"]["total_mb"] / r["measured_rss_mb"] - 1)
        r["fitted_here"] = r is fit
    (args.out / "results.json").write_text(json.dumps({"overhead_mb": overhead, "rows": rows}, indent=2))
    lines = [
        "| model | file | KV cache | context | weights + repack MiB (llama.cpp model buffers) | KV MiB (llama.cpp) "
        "| reserved compute MiB (llama.cpp) | resident attention MiB | overhead MiB | predicted MiB | measured peak RSS MiB | error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p, rep = r["predicted"], r["reported"]
        lines.append(
            f"| {r['model']} | {r['file']} | {r['cache']} | {r['context']} | {p['weights_mb'] + p['repack_mb']:.1f} ({rep.get('model_mb', 0):.1f}) "
            f"| {p['kv_mb']:.2f} ({rep.get('kv_mb', 0):.2f}) | {r['predicted_reserved_compute_mb']:.1f} ({rep.get('compute_mb', 0):.1f}) "
            f"| {p['attention_mb']:.1f} "
            f"| {p['overhead_mb']:.1f} | {p['total_mb']:.1f} | {r['measured_rss_mb']:.1f} "
            f"| {r['error_pct']:+.1f}%{' (fit)' if r['fitted_here'] else ''} |"
        )
    table = "\n".join(lines) + (
        f"\n\nOverhead fitted on SmolLM2 Q8_0 at context 512: {overhead:.1f} MiB; "
        f"KQ_FACTOR in mka_edge/solver/memory.py fitted on the context slope of SmolLM2 F16.\n"
    )
    atomic_write_text(args.out / "table.md", table)
    print(table)


if __name__ == "__main__":
    main()
