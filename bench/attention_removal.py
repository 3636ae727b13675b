"""Attention-only removal against whole-layer removal at equal reference bytes: sleb-attn vs sleb-fast.

sleb-fast runs to K_max whole layers; sleb-attn (units of an attention sub-block or a whole layer,
chosen by calibration KL per reference byte) runs until its bytes saved reach the bytes of K_max
whole layers.  Reference bytes: F16 weights (2 a parameter) plus the f16 KV cache at --ref-context
tokens, the same figure for every device (mka/attention.py).  At the bytes of each K in --ks whole
layers, the table gives the held-out KL of sleb-fast at K and of sleb-attn at the first step whose
bytes saved reach that figure (the same held-out chunks as the plan's curve), the KL per MB saved,
and how many attention and whole-layer units sleb-attn had taken by then.  Prints a table, writes JSON.

    python bench/attention_removal.py --k-max 9 --ks 3,6,9 --out bench/results/attention_removal.json

A quick run on a tiny saved llama (what the options are for; not a measurement):

    python bench/attention_removal.py --model DIR --k-max 3 --ks 1,2,3 --samples 4 --seq-len 64 \\
        --loss-samples 2 --positions 96 --repeats 2 --chunks 1 --out /tmp/attention_removal.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mka_edge.merging import heldout_reference, step_quality
from mka_edge.mka.context import build_context
from mka_edge.mka.trajectory import trajectory
from mka_edge.solver.quality import reference_bytes_saved

MB = 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    ap.add_argument(
        "--k-max", type=int, default=9, help="whole layers sleb-fast removes; sleb-attn runs to their bytes"
    )
    ap.add_argument("--ks", default="3,6,9", help="whole-layer counts whose bytes the two are compared at")
    ap.add_argument("--ref-context", type=int, default=4096, help="context of the KV cache bytes (tokens)")
    ap.add_argument("--chunks", type=int, default=2, help="512-token held-out chunks (the plan's curve uses 2)")
    ap.add_argument("--samples", type=int, default=None, help="calibration sequences (default: the recipe's)")
    ap.add_argument("--seq-len", type=int, default=None, help="calibration sequence length (default: the recipe's)")
    ap.add_argument("--loss-samples", type=int, default=4, help="calibration sequences that score candidates")
    ap.add_argument("--positions", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--no-cache", action="store_true", help="recompute the trajectories even if cached")
    ap.add_argument("--out", type=Path, default=Path("bench/results/attention_removal.json"))
    args = ap.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    if max(ks) > args.k_max:
        ap.error(f"--ks goes beyond --k-max {args.k_max}")
    ctx = build_context(
        model=args.model,
        samples=args.samples,
        seq_len=args.seq_len,
        positions=args.positions,
        repeats=args.repeats,
        loss_samples=args.loss_samples,
        ref_context=args.ref_context,
    )
    use_cache = not args.no_cache
    ref = heldout_reference(ctx, args.chunks)

    fast = trajectory(ctx, "sleb-fast", args.k_max, use_cache=use_cache, progress=True)["steps"]
    if len(fast) < args.k_max:
        raise SystemExit(f"sleb-fast stopped at K={len(fast)}")
    target = {k: reference_bytes_saved(ctx, fast[k - 1]) for k in range(1, args.k_max + 1)}
    attn = trajectory(
        ctx,
        "sleb-attn",
        2 * ctx.n_original - 2,
        use_cache=use_cache,
        progress=True,
        enough=lambda st: st["bytes_saved"] >= target[args.k_max],
    )["steps"]

    rows = []
    for k in ks:
        f = fast[k - 1]
        fq = step_quality(ctx, ref, f)
        a = next((s for s in attn if s["bytes_saved"] >= target[k]), None)
        row = {
            "k": k,
            "target_bytes": target[k],
            "sleb_fast": {
                "removed": f["removed"],
                "bytes_saved": target[k],
                "heldout_kl": fq["kl"],
                "kl_per_mb": fq["kl"] / (target[k] / MB),
                "elapsed_s": f.get("elapsed_s"),
            },
            "sleb_attn": None,
        }
        if a is not None:
            aq = step_quality(ctx, ref, a)
            taken = attn[: a["k"]]
            row["sleb_attn"] = {
                "step": a["k"],
                "bytes_saved": a["bytes_saved"],
                "heldout_kl": aq["kl"],
                "kl_per_mb": aq["kl"] / (a["bytes_saved"] / MB),
                "attention_units": sum(s["unit"] == "attention" for s in taken),
                "layer_units": sum(s["unit"] == "layer" for s in taken),
                "attn_removed": a["attn_removed"],
                "removed": a["removed"],
                "elapsed_s": a.get("elapsed_s"),
            }
        rows.append(row)

    print(
        f"\nmodel {ctx.lm.source.get('spec')}, {ctx.n_original} layers, reference bytes: F16 weights + f16 KV cache "
        f"at {args.ref_context} tokens; one layer {target[1] / MB:.2f} MB"
    )
    head = (
        f"{'K':>3} {'MB':>8} | {'fast KL':>9} {'KL/MB':>8} | {'attn step':>9} {'MB':>8} {'attn KL':>9} "
        f"{'KL/MB':>8} {'attn':>5} {'layer':>5}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        f, a = r["sleb_fast"], r["sleb_attn"]
        left = f"{r['k']:>3} {r['target_bytes'] / MB:>8.2f} | {f['heldout_kl']:>9.4f} {f['kl_per_mb']:>8.4f} | "
        if a is None:
            print(left + "sleb-attn did not reach these bytes")
            continue
        print(
            left + f"{a['step']:>9} {a['bytes_saved'] / MB:>8.2f} {a['heldout_kl']:>9.4f} {a['kl_per_mb']:>8.4f} "
            f"{a['attention_units']:>5} {a['layer_units']:>5}"
        )
    units = " ".join(f"{'A' if s['unit'] == 'attention' else 'L'}{s['layer']}" for s in attn)
    print(f"sleb-attn units in order (A: attention, L: whole layer; original numbering): {units}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "model": ctx.lm.source.get("spec"),
                "layers": ctx.n_original,
                "k_max": args.k_max,
                "ref_context": args.ref_context,
                "chunks": args.chunks,
                "settings": ctx.settings.key(),
                "rows": rows,
                "sleb_fast_removed": fast[-1]["removed"],
                "sleb_attn_units": [
                    {k: s[k] for k in ("k", "unit", "layer", "bytes_saved", "calib_kl", "elapsed_s") if k in s}
                    for s in attn
                ],
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
