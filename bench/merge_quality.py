"""Merge quality on SmolLM2-135M: every method and alpha rule at K in {3, 6, 9, 12}.

Prints a Markdown table and writes one JSON per row under --out (a rerun skips finished rows),
plus summary.json and table.md. Also times the merge phases at the stated calibration size.

    python bench/merge_quality.py --out bench/results/merge_quality
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import torch

from mka_edge.calibration import heldout_chunks
from mka_edge.mka.context import MergeContext, MergeSettings
from mka_edge.mka.fusion import identity, realize
from mka_edge.mka.layers import base_model, temporary_stack
from mka_edge.mka.trajectory import trajectory
from mka_edge.models.loading import load_model
from mka_edge.quality import Reference, compare, mmlu

ROWS = [
    ("drop-last", "-"),
    ("shortgpt", "-"),
    ("angular", "-"),
    ("sleb", "-"),
    ("mka-guided", "calibrated"),
    ("auto", "calibrated"),
    ("mka", "paper"),
    ("mka", "calibrated"),
    ("mka-oneshot", "paper"),
    ("mka-oneshot", "calibrated"),
]


def alpha_histogram(steps) -> dict:
    bins = Counter()
    for s in steps:
        if s.get("action") == "fuse":
            a = s["alpha"]
            bins[
                "0 (drop lower)"
                if a == 0
                else "1 (drop upper)"
                if a == 1
                else f"{a:.2f}"
                if a in (0.25, 0.5, 0.75)
                else "other"
            ] += 1
    return dict(bins)


def phase_timing(ctx: MergeContext) -> dict:
    """One calibration forward pass vs the non-forward work of one similarity + one fusion."""
    ctx.reset()
    base = base_model(ctx.model, ctx.arch)
    with torch.no_grad():
        t0 = time.perf_counter()
        for i in range(0, len(ctx.ids), ctx.settings.batch_size):
            base(input_ids=ctx.ids[i : i + ctx.settings.batch_size], use_cache=False)
        fwd = time.perf_counter() - t0
    ctx.timer.seconds.clear()
    ctx.timer.counts.clear()
    ctx.similarity()
    from mka_edge.mka.fusion import fuse

    ctx.apply(fuse(identity(ctx.n_original), 10, 0.5), refresh=False)
    ctx.reset()
    t = dict(ctx.timer.seconds)
    non_fwd = t.get("diffusion", 0) + t.get("similarity", 0) + t.get("fusion", 0)
    return {
        "calibration_tokens": f"{ctx.settings.samples} x {ctx.settings.seq_len}",
        "positions_per_map": ctx.settings.positions,
        "repeats": ctx.settings.repeats,
        "one_forward_pass_s": round(fwd, 3),
        "similarity_forward_s": round(t.get("forward", 0), 3),
        "diffusion_s": round(t.get("diffusion", 0), 3),
        "nmi_kmeans_s": round(t.get("similarity", 0), 3),
        "fusion_s": round(t.get("fusion", 0), 4),
        "non_forward_over_forward": round(non_fwd / fwd, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="bench/results/merge_quality")
    ap.add_argument("--ks", default="3,6,9,12")
    ap.add_argument("--heldout-chunks", type=int, default=8)
    ap.add_argument("--mmlu-per-subject", type=int, default=2)
    ap.add_argument("--rows", default="", help="comma list of method:alpha to run (default: all)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ks = [int(k) for k in args.ks.split(",")]
    dev = torch.device("cpu")
    torch.manual_seed(0)
    lm = load_model(None, dev)
    ctx = MergeContext(lm, MergeSettings(), dev)
    summary = {
        "settings": ctx.settings.key(),
        "heldout_chunks": args.heldout_chunks,
        "mmlu_per_subject": args.mmlu_per_subject,
        "threads": torch.get_num_threads(),
    }
    summary["phases"] = phase_timing(ctx)
    chunks = heldout_chunks(lm.tokenizer, args.heldout_chunks)
    ctx.reset()
    ref = Reference(ctx.model, chunks, dev)

    def evaluate(comp):
        with temporary_stack(ctx.model, ctx.arch, realize(ctx.originals, comp, ctx.names)):
            q = compare(ctx.model, ref).as_dict()
            if args.mmlu_per_subject:
                q.update(mmlu(ctx.model, lm.tokenizer, dev, args.mmlu_per_subject))
        return q

    base_path = out / "unmerged.json"
    if not base_path.exists():
        base_path.write_text(json.dumps({"method": "unmerged", "k": 0, **evaluate(identity(ctx.n_original))}))
    rows = [r for r in ROWS if not args.rows or f"{r[0]}:{r[1]}" in args.rows.split(",")]
    for method, alpha in rows:
        pending = [k for k in ks if not (out / f"{method}-{alpha}-k{k}.json").exists()]
        if not pending:
            continue
        t0 = time.perf_counter()
        traj = trajectory(ctx, method, max(ks), alpha if alpha != "-" else "calibrated")
        wall = time.perf_counter() - t0
        for k in pending:
            step = traj["steps"][k - 1]
            row = {
                "method": method,
                "alpha": alpha,
                "k": k,
                "layers": ctx.n_original - k,
                "trajectory_seconds_to_k": step.get("elapsed_s"),
                "trajectory_cached": traj["cached"],
                "wall_this_run_s": round(wall, 2),
                "calib_kl": step["calib_kl"],
                "chosen": step.get("method"),
                "alpha_histogram": alpha_histogram(traj["steps"][:k]),
                "layer_map": [sorted(c) for c in step["composition"]],
                **evaluate(step["composition"]),
            }
            (out / f"{method}-{alpha}-k{k}.json").write_text(json.dumps(row))
            print(
                f"{method:12} {alpha:10} K={k:>2}  KL {row['kl']:.4f}  ppl {row['ppl']:.2f}  top1 {row['top1']:.3f}",
                flush=True,
            )
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    table = render(out, ks)
    (out / "table.md").write_text(table)
    print(table)


def render(out: Path, ks) -> str:
    base = json.loads((out / "unmerged.json").read_text())
    lines = [
        "| method | alpha | K | layers | KL (nats) | ppl | Δppl % | top-1 | MMLU | MMLU cloze | calib KL | time to K (s) | alphas chosen | picked |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def mm(r, n):
        return (
            f"{100 * r[n]['accuracy']:.1f} [{100 * r[n]['ci95'][0]:.0f}-{100 * r[n]['ci95'][1]:.0f}]" if n in r else "-"
        )

    lines.append(
        f"| unmerged | - | 0 | 30 | 0 | {base['ppl']:.2f} | 0 | 1.000 | {mm(base, 'mmlu')} | {mm(base, 'mmlu_cloze')} | - | - | - | - |"
    )
    for k in ks:
        rows = []
        for method, alpha in ROWS:
            p = out / f"{method}-{alpha}-k{k}.json"
            if p.exists():
                rows.append(json.loads(p.read_text()))
        best_baseline = min(
            (r["kl"] for r in rows if r["method"] in ("drop-last", "shortgpt", "angular", "sleb")), default=None
        )
        for r in rows:
            kl = (
                f"**{r['kl']:.4f}**"
                if best_baseline is not None and r["kl"] <= min(x["kl"] for x in rows)
                else f"{r['kl']:.4f}"
            )
            hist = (
                "-"
                if r["method"] == "auto"
                else ", ".join(f"{a}: {n}" for a, n in sorted(r["alpha_histogram"].items())) or "-"
            )
            picked = r["chosen"] if r["method"] == "auto" else "-"
            lines.append(
                f"| {r['method']} | {r['alpha']} | {k} | {r['layers']} | {kl} | {r['ppl']:.2f} | {r['ppl_change_pct']:+.1f} | "
                f"{r['top1']:.3f} | {mm(r, 'mmlu')} | {mm(r, 'mmlu_cloze')} | {r['calib_kl']:.4f} | "
                f"{r['trajectory_seconds_to_k'] if r['trajectory_seconds_to_k'] is not None else '-'} | {hist} | {picked} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
