"""The README's main job against the work its artifact needs anyway (issue 22), timed in one run.

1. The main job as the README writes it (``.ci/run``'s MAIN_JOB), on an empty cache.
2. The work its artifact needs anyway, on another empty cache: load the model (the embedded GGUF
   dequantized once), one export of the plan's chosen type (with an importance matrix when the plan
   takes one) and one validation in the plan's cache mode, as ``build`` validates (threads, context,
   MMLU questions per subject); the type and mode are read from the job's plan.json.
3. With ``--measure-all``: the same job measuring every quant type and cache mode (the behaviour
   before issue 22), on a third empty cache.

Ratio = (1) / (2).  Goal: at most 3.  Prints a table and writes JSON.

    python bench/main_job_cost.py --measure-all --out bench/results/main_job_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import tempfile
import time
from pathlib import Path

from mka_edge.build import usable_cpus
from mka_edge.cache import atomic_write_text
from mka_edge.kv_cache import CacheMode

ROOT = Path(__file__).resolve().parents[1]


def main_job() -> list[str]:
    """.ci/run's MAIN_JOB (tests/test_readme.py keeps it the README's)."""
    ci = (ROOT / ".ci" / "run").read_text()
    return shlex.split(shlex.split(re.search(r"^MAIN_JOB=(.*)$", ci, re.M).group(1))[0])


def timed(cmd: list[str], cache: Path, log: Path) -> float:
    """Seconds ``cmd`` took with ``cache`` as the mka-edge cache; its output goes to ``log``."""
    env = {**os.environ, "MKA_EDGE_CACHE": str(cache)}
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measure-all", action="store_true", help="also time the job with --measure-all")
    ap.add_argument("--out", type=Path, default=Path("bench/results/main_job_cost.json"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mka-edge-main-job-"))
    job = main_job()
    out_dir = work / "job"
    job[job.index("--out") + 1] = str(out_dir)
    rows = {}
    print(f"1. main job: {' '.join(job)}", flush=True)
    rows["main job (empty cache)"] = timed(job, work / "cache-job", work / "job.log")
    plan = json.loads((out_dir / "plan.json").read_text())
    ch = plan["choice"]
    mode = CacheMode.parse(ch["cache"])
    profile = job[job.index("--profile") + 1]
    art = work / f"essential-{ch['quant']}.gguf"
    export = ["mka-edge", "export", "--format", "gguf", "--quant", ch["quant"], "--out", str(art)]
    if ch.get("imatrix"):
        export.append("--imatrix")
    validate = [
        "mka-edge",
        "validate",
        str(art),
        "--profile",
        profile,
        "--threads",
        str(usable_cpus()),
        "--context",
        str(plan["budget"]["context"]),
        "--kv-type",
        f"{mode.type_k}/{mode.type_v}",
        "--flash-attn",
        "on" if mode.flash_attn else "off",
        "--mmlu-per-subject",
        "1",
    ]
    if ch["k"]:
        print("note: the plan merges; the essential work below leaves the merge out", flush=True)
    print(f"2. essential: {' '.join(export)}; {' '.join(validate)}", flush=True)
    cache = work / "cache-essential"
    rows["export (load + one export)"] = timed(export, cache, work / "export.log")
    rows["validation"] = timed(validate, cache, work / "validate.log")
    essential = rows["export (load + one export)"] + rows["validation"]
    if args.measure_all:
        job_all = [*job, "--measure-all"]
        job_all[job_all.index("--out") + 1] = str(work / "job-all")
        print("3. main job with --measure-all", flush=True)
        rows["main job --measure-all (empty cache)"] = timed(job_all, work / "cache-all", work / "job-all.log")
    ratio = rows["main job (empty cache)"] / essential
    lines = ["| step | seconds | / essential work |", "|---|---|---|"]
    for name, sec in rows.items():
        lines.append(f"| {name} | {sec:.0f} | {sec / essential:.2f} |")
    lines.append(f"| essential work (export + validation) | {essential:.0f} | 1.00 |")
    scope = plan.get("scope", {})
    print("\n".join(lines))
    print(
        f"\nplan: K={ch['k']} {ch['quant']}{'+imatrix' if ch.get('imatrix') else ''} {ch['cache']}; "
        f"types measured: {', '.join(scope.get('measured', []))}; ratio {ratio:.2f} (goal <= 3)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        args.out,
        json.dumps(
            {
                "main_job": job,
                "essential": [export, validate],
                "seconds": rows,
                "essential_seconds": essential,
                "ratio": ratio,
                "choice": ch,
                "scope": scope,
                "cpus": usable_cpus(),
            },
            indent=2,
        ),
    )
    print(f"wrote {args.out} (work folder {work})")


if __name__ == "__main__":
    main()
