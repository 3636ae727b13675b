"""QLoRA against LoRA (and no heal) on one merged model: held-out KL before and after, seconds a
step and the heal process's peak RSS, each heal a child process (`mka-edge heal`).

    python bench/qlora_heal.py --k 6 --steps 30 --out docs/data/qlora_heal.json

The merged model is SmolLM2-135M with K layers removed by ``sleb-fast`` (the embedded default).
What it answers: does a 4-bit NF4 base with a cached top-256 teacher heal as well as LoRA over the
16-bit (here float32) weights with the teacher in memory, and what does it cost on a CPU?  The
memory win QLoRA exists for is a GPU's (heal/footprint.py); on a CPU the NF4 matmuls are a
dequantize-then-multiply fallback, so its speed here says nothing about a GPU's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil


def run(argv: list[str]) -> tuple[float, float]:
    """Seconds and peak RSS (MB, the process tree's sum, sampled every 100 ms) of ``argv``."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]))
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.1)
    if proc.returncode:
        sys.exit(f"{' '.join(argv)} failed ({proc.returncode})")
    return time.perf_counter() - t0, peak / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=6)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", type=Path, default=Path("bench/results/qlora_heal.json"))
    args = ap.parse_args()
    cli = [sys.executable, "-m", "mka_edge.cli"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        merged = Path(tmp) / "merged"
        run([*cli, "merge", "-k", str(args.k), "--method", "sleb-fast", "--out", str(merged)])
        for train in ("lora", "qlora"):
            out = Path(tmp) / train
            argv = [*cli, "heal", "--model", str(merged), "--steps", str(args.steps), "--train", train]
            argv += ["--lr", str(args.lr), "--heldout-chunks", "2", "--out", str(out)]
            seconds, peak = run(argv)
            log = json.loads((out / "heal_log.json").read_text())
            rows.append(
                {
                    "train": train,
                    "kl_before": log["heldout_before"]["kl"],
                    "kl_after": log["heldout_after"]["kl"],
                    "kl_after_on_nf4_base": log.get("heldout_after_on_nf4_base", {}).get("kl"),
                    "kl_ratio": round(log["heldout_after"]["kl"] / log["heldout_before"]["kl"], 4),
                    "ppl_after": log["heldout_after"]["ppl"],
                    "seconds_per_step": log["seconds_per_step"],
                    "seconds_total": round(seconds, 1),
                    "peak_rss_mb": round(peak),
                    "teacher": log["teacher"],
                    "trained": log["trained"],
                }
            )
    print(f"SmolLM2-135M, K={args.k} (sleb-fast), {args.steps} steps, lr {args.lr}, {os.cpu_count()} CPUs")
    print("KL: full vocabulary for lora (teacher in memory), top-256 + tail for qlora (cached teacher)")
    print(
        f"{'train':7} {'KL before':>9} {'KL after':>9} {'after/before':>12} {'on NF4':>8} {'s/step':>7} {'total s':>8} {'peak MB':>8}"
    )
    for r in rows:
        nf4 = f"{r['kl_after_on_nf4_base']:8.4f}" if r["kl_after_on_nf4_base"] is not None else f"{'':8}"
        print(
            f"{r['train']:7} {r['kl_before']:9.4f} {r['kl_after']:9.4f} {r['kl_ratio']:12.3f} {nf4} "
            f"{r['seconds_per_step']:7.2f} {r['seconds_total']:8.1f} {r['peak_rss_mb']:8d}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"k": args.k, "steps": args.steps, "lr": args.lr, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
