"""Search cost vs quality: exhaustive sleb against sleb-fast (block-influence shortlist), one run.

Both trajectories run uncached on the same loaded model and calibration batch (the merge context
of `mka-edge merge`'s defaults), one after the other, to K_max; then the held-out KL of each at
the chosen K (the same held-out chunks as the plan's curve).  Prints a table and writes JSON.

    python bench/search_cost.py --k-max 9 --ks 3,6,9 --out bench/results/search_cost.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mka_edge.merging import heldout_reference, step_quality
from mka_edge.mka.context import build_context
from mka_edge.mka.methods import shortlist_size
from mka_edge.mka.trajectory import trajectory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    ap.add_argument("--k-max", type=int, default=9)
    ap.add_argument("--ks", default="3,6,9", help="K at which held-out KL is compared")
    ap.add_argument("--chunks", type=int, default=2, help="512-token held-out chunks (the plan's curve uses 2)")
    ap.add_argument("--methods", default="sleb,sleb-fast")
    ap.add_argument("--out", type=Path, default=Path("bench/results/search_cost.json"))
    args = ap.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    ctx = build_context(model=args.model)
    ref = heldout_reference(ctx, args.chunks)
    rows = {}
    for method in args.methods.split(","):
        traj = trajectory(ctx, method, args.k_max, use_cache=False, progress=True)
        steps = traj["steps"]
        rows[method] = {
            "seconds": traj["seconds"],
            "removed": steps[-1]["removed"],
            "heldout_kl": {k: step_quality(ctx, ref, steps[k - 1])["kl"] for k in ks},
            "calib_kl": [round(s["calib_kl"], 6) for s in steps],
        }
        print(f"{method}: {traj['seconds']:.1f} s to K={args.k_max}, removed {steps[-1]['removed']}", flush=True)
    base = rows.get("sleb")
    print(f"\nmodel {ctx.lm.source.get('spec')}, {ctx.n_original} layers, shortlist {shortlist_size(ctx.n_original)}")
    print(f"{'method':<10} {'time s':>8} {'x faster':>9} " + " ".join(f"{'KL K=' + str(k):>10}" for k in ks))
    for method, r in rows.items():
        speed = f"{base['seconds'] / r['seconds']:.2f}" if base else "-"
        kl = " ".join(f"{r['heldout_kl'][k]:>10.4f}" for k in ks)
        print(f"{method:<10} {r['seconds']:>8.1f} {speed:>9} {kl}")
        if base and method != "sleb":
            print(
                f"{'':<29}" + " ".join(f"{100 * (r['heldout_kl'][k] / base['heldout_kl'][k] - 1):>+9.1f}%" for k in ks)
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"k_max": args.k_max, "chunks": args.chunks, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
