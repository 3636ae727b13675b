"""Speed and quality on SmolLM2-135M in both runtimes, one run, one table: the unmerged model and
its merges (K = 6, 12), as GGUF (F16, Q8_0, Q4_0, Q4_K_M; llama.cpp) and as ONNX (fp32, int8,
int4, int4-mixed; onnxruntime-genai on the CPU provider).

Every artifact is measured by `mka-edge validate`'s own code (child processes): prompt and
generation tokens/s, time to first token, peak RSS, KL / perplexity / top-1 against the unmerged
F32 reference on held-out text.  Speeds come from interleaved rounds over all artifacts, so drift
on a shared machine hits every row alike.  Ratios are against the unmerged model in the same
format and quant type, measured in the same run.  All figures are host figures (this machine's CPU).

    python bench/speed_quality.py --out bench/results/speed_quality
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from mka_edge.cache import atomic_write_text
from mka_edge.calibration import heldout_chunks
from mka_edge.exporters.gguf import export_loaded
from mka_edge.exporters.onnx import export_loaded_onnx
from mka_edge.models.loading import load_model
from mka_edge.produce import merged_folder
from mka_edge.targets import get_target
from mka_edge.validate.core import validate_artifact
from mka_edge.validate.jobs import LatencyJob
from mka_edge.validate.runner import run_child

QUANTS = ["F16", "Q8_0", "Q4_0", "Q4_K_M"]
ONNX_QUANTS = ["fp32", "int8", "int4", "int4-mixed"]
WORKERS = {name: get_target(name).validation.worker for name in ("gguf", "onnx")}


def merged_dir(work: Path, k: int, method: str) -> Path:
    """The merged model (its trajectory cache makes reruns cheap)."""
    return merged_folder(work / f"{method}-k{k}", k, method)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/results/speed_quality"))
    ap.add_argument("--method", default="mka-guided", help="merge method for the merged rows")
    ap.add_argument("--ks", default="6,12")
    ap.add_argument("--quants", default=",".join(QUANTS), help="GGUF types ('' for none)")
    ap.add_argument("--onnx-quants", default=",".join(ONNX_QUANTS), help="ONNX types ('' for none)")
    ap.add_argument("--repeats", type=int, default=3, help="latency runs inside each validation")
    ap.add_argument(
        "--rounds", type=int, default=5, help="interleaved latency rounds over all artifacts (the reported speeds)"
    )
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--mmlu-per-subject", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "artifacts"
    work.mkdir(exist_ok=True)
    arts = [("gguf", q) for q in args.quants.split(",") if q] + [("onnx", q) for q in args.onnx_quants.split(",") if q]
    models = [("unmerged", "smollm2-135m", 0)] + [(f"{args.method} K={k}", None, int(k)) for k in args.ks.split(",")]
    rows = []
    t_start = time.time()
    for label, spec, k in models:
        spec = spec or str(merged_dir(work, k, args.method))
        lm = load_model(spec, "cpu", torch.float32)
        if k == 0:  # the same 512-token prompt validate uses: the first held-out chunk
            prompt = heldout_chunks(lm.tokenizer, 1)[0].tolist()
        n_params = sum(p.numel() for p in lm.model.parameters())
        for fmt, q in arts:
            stem = work / f"{label.replace(' ', '_').replace('=', '')}-{q}"
            if fmt == "gguf":
                art = stem.with_suffix(".gguf")
                if not art.is_file():
                    export_loaded(lm, art, q, progress=False)
            else:
                art = stem.with_name(stem.name + "-onnx")
                if not (art / "mka_edge.json").is_file():
                    export_loaded_onnx(lm, art, q, context=2048, progress=False)
            r = validate_artifact(
                art,
                "smollm2-135m",
                threads=args.threads,
                repeats=args.repeats,
                chunks=args.chunks,
                context=2048,
                mmlu_per_subject=args.mmlu_per_subject,
                progress=False,
            )
            a, lat, info = r["accuracy"], r["latency"], r["artifact"]
            if fmt == "gguf":
                size = {
                    "file_mib": info["file_bytes"] / 2**20,
                    "bpw": info["bits_per_weight"],
                    "tensor_types": info["tensor_types"],
                    "tensor_bytes": info["tensor_bytes"],
                }
            else:  # bits per weight over the model's parameters (a tied embedding counted once)
                size = {
                    "file_mib": info["model_bytes"] / 2**20,
                    "bpw": 8 * info["weight_bytes"] / n_params,
                    "tensor_types": info["quantized_ops"],
                    "tensor_bytes": info["weight_bytes"],
                }
            rows.append(
                {
                    "model": label,
                    "k": k,
                    "layers": info["block_count"],
                    "format": fmt,
                    "quant": q,
                    "artifact": str(art),
                    **size,
                    "pp_tps": lat["prompt_tps"],
                    "tg_tps": lat["gen_tps"],
                    "ttft_s": lat["ttft_s"],
                    "load_s": lat["load_s"],
                    "peak_rss_mb": lat["peak_rss_mb"],
                    "kl": a["kl"],
                    "ppl": a["ppl"],
                    "ref_ppl": a["ref_ppl"],
                    "top1": a["top1"],
                    "mmlu": a.get("mmlu", {}).get("accuracy"),
                }
            )
            print(
                f"{label:18} {fmt:4} {q:10} {rows[-1]['file_mib']:7.1f} MiB  tg {lat['gen_tps']['median']:6.1f}/s  "
                f"pp {lat['prompt_tps']['median']:6.0f}/s  KL {a['kl']:.4f}",
                flush=True,
            )
        del lm
    interleaved_latency(rows, args.rounds, args.threads, prompt)
    base = {(r["format"], r["quant"]): r for r in rows if r["k"] == 0}
    for r in rows:
        b = base[(r["format"], r["quant"])]
        r["layer_ratio"] = b["layers"] / r["layers"]
        r["bytes_ratio"] = b["tensor_bytes"] / r["tensor_bytes"]
        r["tg_speedup"] = r["tg_tps"]["median"] / b["tg_tps"]["median"]
        r["pp_speedup"] = r["pp_tps"]["median"] / b["pp_tps"]["median"]
    meta = {
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "threads": args.threads},
        "repeats": args.repeats,
        "rounds": args.rounds,
        "heldout_tokens": args.chunks * 512,
        "method": args.method,
        "seconds": round(time.time() - t_start),
        "label": "host figures (this machine's CPU), not device predictions",
    }
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    table = markdown(rows, meta)
    atomic_write_text(args.out / "table.md", table)
    print(table)


def interleaved_latency(rows: list[dict], rounds: int, threads: int, prompt: list[int]) -> None:
    """Speeds measured round-robin (every artifact once per round), so drift on a shared machine
    hits all rows alike; these replace the per-validation figures in the table."""
    import numpy as np

    per = {r["artifact"]: [] for r in rows}
    for i in range(rounds):
        for r in rows:
            job = LatencyJob(r["artifact"], threads, context=2048, prompt_ids=prompt, gen_tokens=128, repeats=1)
            per[r["artifact"]].append(run_child(WORKERS[r["format"]], job, 600, "latency run"))
        print(f"latency round {i + 1}/{rounds} done", flush=True)
    for r in rows:
        runs = per[r["artifact"]]
        for key, src in (("pp_tps", "prompt_tps"), ("tg_tps", "gen_tps"), ("ttft_s", "ttft_s")):
            vals = [x[src]["median"] for x in runs]
            r[key] = {"median": float(np.median(vals)), "min": min(vals), "max": max(vals)}
        r["peak_rss_mb"] = float(np.median([x["peak_rss_mb"] for x in runs]))


RUNTIME = {"gguf": "llama.cpp", "onnx": "onnxruntime-genai"}


def _spread(v: dict) -> str:
    return f"{v['median']:.0f} ({v['min']:.0f}-{v['max']:.0f})"


def markdown(rows: list[dict], meta: dict) -> str:
    head = (
        "| model | layers | runtime | quant | MiB | bpw | pp tok/s (min-max) | tg tok/s (min-max) | TTFT s | peak RSS MiB "
        "| KL | ppl | top-1 | MMLU | layer ratio | bytes ratio | tg speed-up | pp speed-up |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        mmlu = "" if r["mmlu"] is None else f"{100 * r['mmlu']:.0f}%"
        lines.append(
            f"| {r['model']} | {r['layers']} | {RUNTIME[r['format']]} | {r['quant']} | {r['file_mib']:.1f} | {r['bpw']:.2f} | {_spread(r['pp_tps'])} "
            f"| {_spread(r['tg_tps'])} | {r['ttft_s']['median']:.2f} | {r['peak_rss_mb']:.0f} | {r['kl']:.4f} | {r['ppl']:.2f} "
            f"| {100 * r['top1']:.1f}% | {mmlu} | {r['layer_ratio']:.3f} "
            f"| {r['bytes_ratio']:.3f} | {r['tg_speedup']:.3f} | {r['pp_speedup']:.3f} |"
        )
    lines.append("")
    lines.append(
        f"{meta['label']}; {meta['host']['cpus']} CPUs, {meta['host']['threads']} threads, {meta['rounds']} interleaved latency rounds "
        f"(median, min-max), 512-token prompt, 128 generated tokens, context 2048 (llama.cpp KV f16; onnxruntime-genai KV f32, "
        f"allocated for the whole context); ONNX MiB are model.onnx + weights, ONNX bpw are weight bytes x 8 / parameters; KL/ppl/top-1 on {meta['heldout_tokens']} held-out "
        f"tokens against the unmerged F32 reference (reference ppl {rows[0]['ref_ppl']:.2f}); run took {meta['seconds']} s."
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
