"""The mixed-plan lever end to end (issue 25): the user's `mka-edge build` at a few budgets, with and
without `--mixed`, on the same cache: which plan each chooses, its predicted and measured KL in
llama.cpp, and the artifact's bytes.  What `bench/mixed_quant.py` measures on the unmerged model
at fixed weight budgets, this measures through the planner, where the lever competes with layer
removal, the cache modes and llama.cpp's `_M` mixes for the same device budget.

    python bench/mixed_lever.py --out bench/results/mixed_lever --budgets 190 200 215 240

Each build is a child process (`python -m mka_edge.cli build`); the table goes to stdout and
``mixed_lever.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# a profile without a speed floor (a CPU-timed floor is not what this compares), context 1024
PROFILE_PATCH = ("min_tokens_per_s: 10", "min_tokens_per_s: 0")


def profile(folder: Path) -> str:
    from mka_edge.profiles import load_profile

    src = Path(load_profile("laptop-8gb").path).read_text()
    path = folder / "laptop-8gb-nofloor.yaml"
    path.write_text(src.replace("name: laptop-8gb", "name: laptop-8gb-nofloor").replace(*PROFILE_PATCH))
    return str(path)


def build(prof: str, budget: float, mixed: bool, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "mka_edge.cli", "build", "--profile", prof, "--budget-mb", str(budget)]
    cmd += ["--context", "1024", "--mmlu-per-subject", "0", *extra, "--out", str(out)]
    cmd += ["--mixed"] if mixed else []
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    row = {"budget_mb": budget, "mixed": mixed, "seconds": round(time.time() - t0, 1)}
    if r.returncode != 0:
        return {**row, "error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    m = json.loads((out / "manifest.json").read_text())
    plan = json.loads((out / "plan.json").read_text())
    val = json.loads((out / "validation.json").read_text())
    tried = m["attempts"][-1]
    types = plan["choice"].get("tensor_types") or {}
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    return {
        **row,
        "k": tried["k"],
        "quant": tried["quant"],
        "imatrix": tried["imatrix"],
        "cache": tried["cache"],
        "predicted_kl": tried["predicted_kl"],
        "measured_kl": tried["measured_kl"],
        "tries": len(m["attempts"]),
        "artifact_bytes": m["files"][m["artifact"]]["bytes"],
        "predicted_device_mb": m["device_predictions"]["memory_mb"],
        "allocation": counts,
        "host_decode_tps": val["latency"]["gen_tps"]["median"] if "latency" in val else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budgets", type=float, nargs="+", default=[190, 200, 215, 240])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("extra", nargs="*", help="more build options, after --")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    prof = profile(args.out)
    rows = []
    for budget in args.budgets:
        for mixed in (False, True):
            out = args.out / f"b{budget:g}-{'mixed' if mixed else 'uniform'}"
            if out.exists():
                import shutil

                shutil.rmtree(out)
            row = build(prof, budget, mixed, out, args.extra)
            rows.append(row)
            print(json.dumps(row), flush=True)
    (args.out / "mixed_lever.json").write_text(json.dumps(rows, indent=1))
    print(f"\n{'budget MB':>9} | {'plan':<34} | {'pred. KL':>8} | {'measured KL':>11} | {'MiB':>6} | allocation")
    for r in rows:
        if "error" in r:
            print(f"{r['budget_mb']:9g} | {'mixed' if r['mixed'] else 'uniform'}: {r['error'][:90]}")
            continue
        label = f"{'--mixed ' if r['mixed'] else ''}K={r['k']} {r['quant']}{'+im' if r['imatrix'] else ''} {r['cache']}"
        alloc = ", ".join(f"{n} {t}" for t, n in sorted(r["allocation"].items(), key=lambda kv: -kv[1]))
        print(
            f"{r['budget_mb']:9g} | {label:<34} | {r['predicted_kl']:8.4f} | {r['measured_kl']:11.4f} "
            f"| {r['artifact_bytes'] / 2**20:6.1f} | {alloc}"
        )


if __name__ == "__main__":
    main()
