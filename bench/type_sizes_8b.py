"""llama.cpp's dry-run type sizes at real size: a Llama-3-8B-shaped config (no weights) against the
published Llama-3-8B GGUF file sizes, and the time the early plan check takes.

    python bench/type_sizes_8b.py --out bench/results/type_sizes_8b.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from mka_edge.models.synthetic import LLAMA3_8B_CONFIG
from mka_edge.solver.feasibility import gguf_type_sizes, read_shape
from mka_edge.solver.quant_prior import PUBLISHED, PUBLISHED_IMATRIX
from mka_edge.targets.gguf import PLAN_QUANTS as GGUF_QUANTS

# Meta-Llama-3-8B as published (8,192 positions, no rope scaling): the GGUF sizes it is checked against
LLAMA3_8B = {k: v for k, v in LLAMA3_8B_CONFIG.items() if k != "rope_scaling"} | {"max_position_embeddings": 8192}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("bench/results/type_sizes_8b.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(LLAMA3_8B))
        t0 = time.perf_counter()
        ms = read_shape(tmp)
        t1 = time.perf_counter()
        sizes = gguf_type_sizes(ms, list(GGUF_QUANTS))
        t2 = time.perf_counter()
    rows = []
    print(f"{'type':8} {'dry run GiB':>12} {'published GiB':>14} {'diff':>7}")
    for q, e in sizes.items():
        gib = (sum(e["per_layer"]) + e["other"]) / 2**30
        # the IQ types are published only among the importance-matrix files (same sizes either way)
        pub = (PUBLISHED.get(q) or PUBLISHED_IMATRIX.get(q) or (None,))[0]
        rows.append({"quant": q, "dry_run_gib": round(gib, 4), "published_gib": pub, "tensor_types": e["tensor_types"]})
        if pub is None:
            print(f"{q:8} {gib:12.2f} {'(none)':>14}")
        else:
            print(f"{q:8} {gib:12.2f} {pub:14.2f} {gib - pub:+7.2f}")
    print(f"shape from config {t1 - t0:.1f} s, dry run of {len(sizes)} types {t2 - t1:.1f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "params": sum(ms.block_params) + ms.other_params,
                "shape_s": round(t1 - t0, 2),
                "dry_run_s": round(t2 - t1, 2),
                "types": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
