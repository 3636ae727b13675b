"""Every tensor its own type (issue 25): a measured bit allocation against the best uniform type and
llama.cpp's ``_M`` mixes, at budgets from the Q3_K_M size to the Q6_K size.

Steps, each through llama.cpp's own quantizer and runtime, on the unmerged model:

1. the probe's float base file, held-out reference and importance matrix (as a plan makes them);
2. one file per candidate ggml type (every weight requested at it, on the Q8_0 file type so no
   mix rule applies; llama.cpp's fallbacks where rows cannot take it), each read back with
   gguf-py: the imatrix-weighted error and the exact bytes of every tensor at every type;
3. one calibration file per tensor kind (that kind at ``--calibrate-type``, the rest Q8_0), whose
   measured KL, shared by the kind's layers, gives each tensor's nats per unit of error
   (``tensor_sensitivity.tensor_scales``);
4. at each budget (weight bytes): the allocation of least predicted KL (``allocate``), written in
   one quantize call with per-tensor overrides, its bytes checked against the plan's;
5. KL (and decode tokens/s with ``--speed``) of every file in llama.cpp against the reference.

The uniform baselines are llama.cpp's own file types from the quant probe (plain or with the
importance matrix, the better, as a plan measures them) and the single-type requests of step 2.
Predicted against measured KL is reported for every file that was not used to calibrate.

    python bench/mixed_quant.py --out bench/results/mixed_quant-smollm2
    python bench/mixed_quant.py --model models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf --out bench/results/mixed_quant-qwen
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np

from mka_edge.exporters.imatrix import ensure_imatrix, imatrix_key, read_imatrix
from mka_edge.exporters.llama_quantize import quantize
from mka_edge.exporters.quant_types import quant_type
from mka_edge.models.loading import load_model
from mka_edge.plots import allocation_heatmap
from mka_edge.solver import tensor_sensitivity as ts
from mka_edge.solver.allocate import allocate
from mka_edge.solver.quant_probe import ProbeSession
from mka_edge.solver.tensor_probe import CANDIDATES, measure_file, write_request, write_types
from mka_edge.validate.jobs import LatencyJob
from mka_edge.validate.runner import run_child
from mka_edge.validate.workers import GGUF_WORKER as WORKER

# llama.cpp file types the probe measures as uniform baselines; the _M mixes separately
UNIFORM_FTYPES = ("Q8_0", "Q6_K", "Q5_K_S", "Q5_0", "Q4_K_S", "IQ4_XS", "Q4_0", "IQ4_NL", "Q3_K_S")
MIXES = ("Q5_K_M", "Q4_K_M", "Q3_K_M")
MIB = 2**20


def decode_tps(art: Path, ref_ids: list[int], threads: int) -> float:
    job = LatencyJob(str(art), threads, context=512, prompt_ids=ref_ids, gen_tokens=64, repeats=3)
    return float(run_child(WORKER, job, 900, f"decode speed of {art.name}")["gen_tps"]["median"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="recipe, folder or GGUF (default: the embedded SmolLM2)")
    ap.add_argument("--budgets", type=int, default=5)
    ap.add_argument(
        "--calibrate-type", default="Q4_0", choices=CANDIDATES, help="the low type each kind is calibrated at"
    )
    ap.add_argument("--random-mixes", type=int, default=4, help="random mixes measured for the prediction check")
    ap.add_argument("--speed", action="store_true", help="time decode tokens/s of the compared files")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--summarize", type=Path, help="only summarize a run's mixed_quant-raw.json into --out")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.summarize:
        summarize(json.loads(args.summarize.read_text()), args.out)
        return
    t0 = time.time()
    lm = load_model(args.model)
    rows: list[dict] = []
    with ProbeSession(lm, threads=args.threads, progress=False) as session, tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base, _, ref_path = session.base()
        matrix = ensure_imatrix(lm, imatrix_key(lm), progress=False)
        importance = read_imatrix(matrix)[0]
        prompt = np.load(ref_path)["ids"].reshape(-1)[:64].tolist()

        def run(label: str, kind: str, art: Path, predicted: float | None = None, **extra) -> dict:
            m = measure_file(art, ref_path, args.threads)
            row = {"label": label, "kind": kind, **m, "predicted_kl": predicted, **extra}
            if args.speed and kind in ("uniform", "mix", "mixed"):
                row["decode_tps"] = decode_tps(art, prompt, args.threads)
            rows.append(row)
            pk = f"{predicted:.4f}" if predicted is not None else "-"
            print(f"{label:28s} {m['tensor_bytes'] / MIB:8.2f} MiB  KL {m['kl']:.4f}  predicted {pk}", flush=True)
            return row

        # 1. llama.cpp's file types, as a plan measures them (cached entries)
        probe = session.measure(list(UNIFORM_FTYPES + MIXES))
        for q, e in probe.items():
            row = {
                "label": q + ("+imatrix" if e.get("imatrix") else ""),
                "kind": "mix" if q in MIXES else "uniform",
                "kl": e["kl"],
                "tensor_bytes": sum(e["per_layer"]) + e["other"],
                "predicted_kl": None,
                "from_probe": True,
            }
            if args.speed:  # the probe keeps no file: the same one again, for its decode speed
                art = tmp / f"ftype-{q}.gguf"
                quantize(base, art, quant_type(q).ftype, args.threads, matrix if e.get("imatrix") else None)
                row["decode_tps"] = decode_tps(art, prompt, args.threads)
                art.unlink()
            rows.append(row)
        # 2. one file per candidate type: the table of errors and bytes
        files = {q: write_request(base, tmp / f"req-{q}.gguf", q, matrix, args.threads) for q in CANDIDATES}
        table = ts.tensor_table(base, files, importance)
        t_table = time.time() - t0
        # 3. per-kind calibration
        kinds = sorted({r.kind for r in table.values()})
        floor = run("all Q8_0", "calibration", files["Q8_0"])
        isolated = {}
        for kind in kinds:
            types = {n: (args.calibrate_type if r.kind == kind else "Q8_0") for n, r in table.items()}
            art = write_types(base, tmp / f"cal-{kind}.gguf", types, matrix, args.threads)
            isolated[kind] = (args.calibrate_type, run(f"{kind} at {args.calibrate_type}", "calibration", art)["kl"])
        fl = ("Q8_0", floor["kl"])
        scales = ts.tensor_scales(table, isolated, fl)
        # 4. the single-type requests (prediction check and uniform baselines)
        for q, art in files.items():
            if q == "Q8_0":
                continue
            types = {n: q for n in table}
            run(
                f"request {q}",
                "uniform",
                art,
                ts.predict(table, scales, types, fl),
                actual=sorted({r.actual[q] for r in table.values()}),
            )
        rng = random.Random(0)
        for i in range(args.random_mixes):
            types = {n: rng.choice(list(files)) for n in table}
            art = write_types(base, tmp / f"rand-{i}.gguf", types, matrix, args.threads)
            run(f"random mix {i}", "random", art, ts.predict(table, scales, types, fl))
        # 5. the allocations
        by = {r["label"].split("+")[0]: r for r in rows if r.get("from_probe")}
        lo, hi = by["Q3_K_M"]["tensor_bytes"], by["Q6_K"]["tensor_bytes"]
        opts = ts.options(table, scales)
        # every 2-D weight is allocated; the 1-D tensors (norms) stay F32 in every file
        norms = floor["tensor_bytes"] - sum(table[n].bytes["Q8_0"] for n in table)
        for j, budget in enumerate(np.linspace(lo, hi, args.budgets)):
            alloc = allocate(opts, budget - norms)
            if alloc is None:
                print(f"nothing fits {budget / MIB:.1f} MiB")
                continue
            art = write_types(base, tmp / f"mixed-{j}.gguf", alloc.types, matrix, args.threads)
            row = run(
                f"mixed @ {budget / MIB:.1f} MiB",
                "mixed",
                art,
                ts.predict(table, scales, alloc.types, fl),
                budget=float(budget),
                planned_bytes=alloc.bytes + norms,
                allocation=alloc.summary(),
                types=alloc.types,
            )
            row["bytes_exact"] = row["tensor_bytes"] == row["planned_bytes"]
            actual = {n: table[n].actual[q] for n, q in alloc.types.items()}
            row["actual_types"] = actual
            kind_bytes: dict[str, int] = {}
            for n, q in alloc.types.items():
                kind_bytes[table[n].kind] = kind_bytes.get(table[n].kind, 0) + table[n].bytes[q]
            n_layers = 1 + max(r.layer for r in table.values() if r.layer is not None)
            allocation_heatmap(
                {(table[n].layer, table[n].kind): t for n, t in actual.items() if table[n].layer is not None},
                {table[n].kind: t for n, t in actual.items() if table[n].layer is None},
                n_layers,
                [],
                args.out / f"allocation-{j}.png",
                f"{args.model or 'smollm2-135m'}: per-tensor types at {budget / MIB:.1f} MiB of weights",
                kind_bytes,
            )
    raw = {
        "model": args.model or "smollm2-135m",
        "candidates": list(files),
        "calibrate_type": args.calibrate_type,
        "isolated": isolated,
        "scales": scales,
        "fallbacks": {q: sorted({r.actual[q] for r in table.values()}) for q in files},
        "rows": rows,
        "table_seconds": t_table,
        # per tensor and candidate: [the type llama.cpp wrote, its bytes, its imatrix-weighted error]
        "tensors": {n: {q: [r.actual[q], r.bytes[q], r.err[q]] for q in r.err} for n, r in table.items()},
        "total_seconds": time.time() - t0,
    }
    (args.out / "mixed_quant-raw.json").write_text(json.dumps(raw))  # first: a summary that fails loses nothing
    summarize(raw, args.out)


def summarize(raw: dict, out: Path) -> None:
    """The comparison per budget (best uniform and best _M mix that fit, the mixed plan), the
    prediction check, the JSON, the table and the plot, from the raw measurements."""
    rows = raw["rows"]
    table_rows = []
    for r in [r for r in rows if r["kind"] == "mixed"]:
        fit = [u for u in rows if u["kind"] == "uniform" and u["tensor_bytes"] <= r["budget"]]
        mixes = [u for u in rows if u["kind"] == "mix" and u["tensor_bytes"] <= r["budget"]]
        bu = min(fit, key=lambda u: u["kl"]) if fit else None
        bm = min(mixes, key=lambda u: u["kl"]) if mixes else None
        table_rows.append(
            {
                "budget_mib": r["budget"] / MIB,
                "uniform": bu and _pick(bu, ("label", "kl", "tensor_bytes", "decode_tps")),
                "m_mix": bm and _pick(bm, ("label", "kl", "tensor_bytes", "decode_tps")),
                "mixed": _pick(
                    r, ("label", "kl", "tensor_bytes", "predicted_kl", "allocation", "bytes_exact", "decode_tps")
                ),
                "ratio_to_uniform": r["kl"] / bu["kl"] if bu else None,
            }
        )
    checked = [r for r in rows if r["predicted_kl"] is not None and r["kind"] != "calibration"]
    result = {
        **{k: v for k, v in raw.items() if k not in ("rows", "tensors")},
        "rows": [{k: v for k, v in r.items() if k not in ("types", "actual_types")} for r in rows],
        "allocations": {r["label"]: r["actual_types"] for r in rows if r["kind"] == "mixed"},
        "comparison": table_rows,
        "prediction": [{"label": r["label"], "predicted": r["predicted_kl"], "measured": r["kl"]} for r in checked],
    }
    (out / "mixed_quant.json").write_text(json.dumps(result, indent=1))
    print(
        f"\n{'budget MiB':>10} | {'best uniform':>24} | {'best _M mix':>24} | {'mixed: measured / predicted':>34} | ratio"
    )
    for t in table_rows:
        u, m, x = t["uniform"], t["m_mix"], t["mixed"]
        us = f"{u['label']} {u['kl']:.4f}" if u else "none fits"
        ms = f"{m['label']} {m['kl']:.4f}" if m else "none fits"
        ratio = f"{t['ratio_to_uniform']:.2f}" if t["ratio_to_uniform"] else "-"
        exact = "bytes exact" if x["bytes_exact"] else "BYTES DIFFER"
        print(
            f"{t['budget_mib']:10.1f} | {us:>24} | {ms:>24} | {x['kl']:.4f} / {x['predicted_kl']:.4f} {exact} | {ratio}"
        )
    pred = np.array([[c["predicted"], c["measured"]] for c in result["prediction"]])
    if len(pred):
        err = np.abs(pred[:, 0] - pred[:, 1]) / pred[:, 1]
        print(
            f"\nprediction over {len(pred)} files: median relative error {np.median(err):.2f}, largest {err.max():.2f}"
        )
    _plot(rows, out / "mixed_quant.png", result["model"])
    print(f"wrote {out}/mixed_quant.json and .png ({raw['total_seconds']:.0f} s)")


def _pick(row: dict, keys: tuple[str, ...]) -> dict:
    return {k: row[k] for k in keys if k in row}


def _plot(rows: list[dict], path: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, style, label in (
        ("uniform", "o", "uniform type"),
        ("mix", "s", "llama.cpp _M mix"),
        ("mixed", "D-", "mixed (per tensor)"),
    ):
        pts = sorted((r["tensor_bytes"] / MIB, r["kl"]) for r in rows if r["kind"] == kind)
        if pts:
            ax.plot(*zip(*pts), style, label=label)
    ax.set_xlabel("weight bytes (MiB)")
    ax.set_ylabel("KL to the float model (nats)")
    ax.set_yscale("log")
    ax.set_title(f"{model}: per-tensor types against one type")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
