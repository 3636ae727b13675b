"""ONNX memory model against measurement: predicted peak RSS (mka_edge/solver/onnx_memory.py) vs
the measured peak of onnxruntime-genai runs (the validation's latency child: 512-token held-out
prompt, 32 generated tokens, KV buffer for the whole context).

What is fitted and where: the overhead is the peak of a run of a 1 MB model (row "tiny");
each quant type's resident ratio is measured on the unmerged SmolLM2 at context 1024 (the
solver's ONNX probe, rows marked "fit").  Every other row is a prediction: other contexts, the
merged models (their own weight bytes, the unmerged model's ratio), and a synthetic ~1B llama
(random weights, untied 49k vocabulary, hidden 2048) with SmolLM2's ratios.

    python bench/onnx_memory.py --out bench/results/onnx_memory
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch

from mka_edge.cache import atomic_write_text
from mka_edge.exporters.onnx import export_loaded_onnx
from mka_edge.exporters.onnx_inspect import inspect_onnx
from mka_edge.models.loading import load_model
from mka_edge.models.synthetic import make_tiny
from mka_edge.produce import merged_folder
from mka_edge.solver.memory import Shape
from mka_edge.solver.onnx_memory import ONNX_OVERHEAD_MB, predict_onnx
from mka_edge.solver.onnx_probe import RATIO_CONTEXT, WORKER, probe_onnx
from mka_edge.validate.jobs import LatencyJob
from mka_edge.validate.reference import compact_reference
from mka_edge.validate.runner import run_child

QUANTS = ["fp32", "int8", "int4-mixed", "int4"]


def _merged(work: Path, k: int) -> Path:
    return merged_folder(work / f"mka-guided-k{k}", k, "mka-guided")


def _export(lm, path: Path, q: str) -> Path:
    if not (path / "mka_edge.json").is_file():
        export_loaded_onnx(lm, path, q, progress=False)
    return path


def _peak(art: Path, ctx: int, prompt: list[int], threads: int) -> dict:
    return run_child(
        WORKER,
        LatencyJob(str(art), threads, context=ctx, prompt_ids=prompt, gen_tokens=32, repeats=1),
        1800,
        "latency",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/results/onnx_memory"))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--no-synthetic", action="store_true", help="skip the synthetic 1B model")
    args = ap.parse_args()
    work = args.out / "artifacts"
    work.mkdir(parents=True, exist_ok=True)
    rows = []

    # overhead: a 1 MB model

    tiny_dir = work / "tiny"
    if not (tiny_dir / "config.json").is_file():
        make_tiny(tiny_dir, "llama", layers=2)
    tiny = load_model(str(tiny_dir))
    lat = _peak(_export(tiny, work / "tiny-fp32", "fp32"), 512, list(range(3, 67)), args.threads)
    rows.append(
        {
            "model": "tiny (1 MB)",
            "quant": "fp32",
            "context": 512,
            "predicted_mb": ONNX_OVERHEAD_MB,
            "measured_mb": lat["peak_rss_mb"],
            "role": "overhead",
        }
    )

    lm = load_model("smollm2-135m", "cpu", torch.float32)
    ref_path, _ = compact_reference(lm, 2, progress=False)
    prompt = np.load(ref_path)["ids"].reshape(-1)[:512].tolist()
    costs = probe_onnx(lm, QUANTS, threads=args.threads, progress=False)
    shape = Shape.from_config(lm.model.config)
    models = [("SmolLM2-135M", lm, shape)]
    for k in (6, 12):
        mlm = load_model(str(_merged(work, k)), "cpu", torch.float32)
        models.append((f"SmolLM2 mka-guided K={k}", mlm, Shape.from_config(mlm.model.config)))
    for name, m, sh in models:
        for q in QUANTS:
            art = _export(m, work / f"{name.replace(' ', '_').replace('=', '')}-{q}", q)
            info = inspect_onnx(art)
            for ctx in (RATIO_CONTEXT, 4096) if m is lm else (2048,):
                lat = _peak(art, ctx, prompt, args.threads)
                pred = predict_onnx(sh, info["weight_bytes"], costs[q]["resident_ratio"], ctx, q)
                rows.append(
                    {
                        "model": name,
                        "quant": q,
                        "context": ctx,
                        "weights_mb": info["weight_bytes"] / 2**20,
                        "predicted": pred.as_dict(),
                        "predicted_mb": pred.total_mb,
                        "measured_mb": lat["peak_rss_mb"],
                        "loaded_mb": lat["loaded_rss_mb"],
                        "role": "fit" if (m is lm and ctx == RATIO_CONTEXT) else "prediction",
                    }
                )
                print(
                    f"{name:20} {q:10} ctx {ctx:5} predicted {pred.total_mb:7.1f} measured {lat['peak_rss_mb']:7.1f}",
                    flush=True,
                )
        if m is not lm:
            del m
    if not args.no_synthetic:
        from memory_model import synthetic_1b  # bench/ is the script's folder, so on the path

        syn = load_model(str(synthetic_1b(work, Path(lm.source["model_dir"]))), "cpu", torch.float32)
        sh = Shape.from_config(syn.model.config)
        for q in ("int8", "int4"):
            art = _export(syn, work / f"synthetic-1b-{q}", q)
            info = inspect_onnx(art)
            lat = _peak(art, 2048, prompt, args.threads)
            pred = predict_onnx(sh, info["weight_bytes"], costs[q]["resident_ratio"], 2048, q)
            rows.append(
                {
                    "model": "synthetic 1B",
                    "quant": q,
                    "context": 2048,
                    "weights_mb": info["weight_bytes"] / 2**20,
                    "predicted": pred.as_dict(),
                    "predicted_mb": pred.total_mb,
                    "measured_mb": lat["peak_rss_mb"],
                    "loaded_mb": lat["loaded_rss_mb"],
                    "role": "prediction (SmolLM2's ratio)",
                }
            )
            print(f"synthetic 1B {q:10} predicted {pred.total_mb:7.1f} measured {lat['peak_rss_mb']:7.1f}", flush=True)
    for r in rows:
        r["error_pct"] = 100 * (r["predicted_mb"] / r["measured_mb"] - 1)
    ratios = {q: costs[q]["resident_ratio"] for q in QUANTS}
    (args.out / "results.json").write_text(
        json.dumps({"resident_ratio": ratios, "overhead_mb": ONNX_OVERHEAD_MB, "rows": rows}, indent=2)
    )
    lines = [
        "| model | quant | context | weights MiB | resident extra MiB | KV MiB | prefill MiB | overhead MiB "
        "| predicted MiB | measured peak RSS MiB | error | role |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = r.get("predicted") or {}
        cells = (
            [
                f"{r['weights_mb']:.1f}",
                f"{p['repack_mb']:+.1f}",
                f"{p['kv_mb']:.1f}",
                f"{p['attention_mb']:.1f}",
                f"{p['overhead_mb']:.1f}",
            ]
            if p
            else ["", "", "", "", f"{r['predicted_mb']:.1f}"]
        )
        lines.append(
            f"| {r['model']} | {r['quant']} | {r['context']} | "
            + " | ".join(cells)
            + f" | {r['predicted_mb']:.1f} | {r['measured_mb']:.1f} | {r['error_pct']:+.1f}% | {r['role']} |"
        )
    table = (
        "\n".join(lines)
        + "\n\nResident ratios (measured on unmerged SmolLM2, context 1024): "
        + ", ".join(f"{q} {v:.3f}" for q, v in ratios.items())
        + "\n"
    )
    atomic_write_text(args.out / "table.md", table)
    print(table)


if __name__ == "__main__":
    main()
