"""Is one model's held-out KL really below another's?  A paired, per-chunk comparison.

Two merged (or healed) models of the same source are scored chunk by chunk on the same held-out
text; the per-chunk KL differences give a mean and a standard error, so a 1-2% gap between, say,
fusion + healing and removal + healing (bench/heal.py) can be told from noise.

    python bench/heal_compare.py A_DIR B_DIR --chunks 8 --out bench/results/heal_compare.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from mka_edge.calibration import heldout_chunks
from mka_edge.evaluation import default_reference
from mka_edge.models.loading import load_model
from mka_edge.quality import Reference, compare


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--reference", default=None, help="default: the source in A's merge_log.json")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    ref_spec = args.reference or default_reference(args.a)
    ref = load_model(ref_spec)
    chunks = heldout_chunks(ref.tokenizer, args.chunks)
    per = {}
    with torch.no_grad():
        refs = [Reference(ref.model, chunks[i : i + 1], torch.device("cpu")) for i in range(len(chunks))]
        del ref
        for name in (args.a, args.b):
            model = load_model(name).model
            per[name] = [compare(model, r).as_dict() for r in refs]
            del model
    a = [q["kl"] for q in per[args.a]]
    b = [q["kl"] for q in per[args.b]]
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n) if n > 1 else float("nan")
    res = {
        "a": args.a,
        "b": args.b,
        "reference": ref_spec,
        "chunks": n,
        "kl_a": sum(a) / n,
        "kl_b": sum(b) / n,
        "diff_mean": mean,
        "diff_se": se,
        "a_lower_in_chunks": sum(x < 0 for x in d),
        "per_chunk": {"a": a, "b": b},
    }
    print(
        f"A {args.a}: KL {res['kl_a']:.4f}\nB {args.b}: KL {res['kl_b']:.4f}\n"
        f"A - B = {mean:+.4f} ± {se:.4f} (standard error over {n} chunks); A lower in {res['a_lower_in_chunks']} of {n}"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
