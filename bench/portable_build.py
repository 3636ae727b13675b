"""What the portable llama.cpp build costs (issue 22): prefill and decode tokens/s of SmolLM2-135M
as Q8_0 and Q4_K_M GGUFs under two llama-cpp-python installs on this machine, the default one (the
README's portable x86-64-v3 build, ``mka_edge.cpu.PORTABLE_CMAKE_ARGS``) and another one, normally
a native build installed beside it with ``--target``:

    CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=ON" pip install --no-cache-dir --no-deps \\
        --target /tmp/llama-native llama-cpp-python==0.3.36
    python bench/portable_build.py --other-site /tmp/llama-native --out bench/results/portable_build.json

Every measurement is `mka-edge validate`'s latency run (``validate/gguf_worker.py``, one child
process each; the other build by prepending --other-site to the child's PYTHONPATH), one repeat per
child, interleaved: each round runs every (type, build) once, the builds' order alternating between
rounds, so drift on a shared machine hits both builds alike.  The prompt is fixed token ids (speed
does not depend on which tokens).  The GGUFs are made once by the project's own CLI
(``mka-edge export --format gguf --quant TYPE``, default model) into --work and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mka_edge.cache import atomic_write_text, runtime_slot
from mka_edge.child_exit import explain_exit
from mka_edge.cpu import PORTABLE_CMAKE_ARGS, cpu_flags, flag_summary
from mka_edge.runtime_check import check_llama_cpp
from mka_edge.validate.jobs import LatencyJob

WORKER = "mka_edge.validate.gguf_worker"
TYPES = ["Q8_0", "Q4_K_M"]
# what the child reports about the llama.cpp it loaded: where from, its version, its compiled features
_BUILD_INFO = (
    "import json, llama_cpp; print(json.dumps({'file': llama_cpp.__file__, 'version': llama_cpp.__version__, "
    "'system_info': llama_cpp.llama_print_system_info().decode().strip()}))"
)


def child_env(site: Path | None) -> dict:
    """The environment of a child of ``site``'s llama-cpp-python (None: the default install)."""
    env = dict(os.environ)
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH", "")) if p)
    return env


def build_info(site: Path | None) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _BUILD_INFO], capture_output=True, text=True, env=child_env(site), timeout=120
    )
    if proc.returncode != 0:
        why = explain_exit(proc.returncode, "loading llama_cpp") or (proc.stderr.strip().splitlines() or ["?"])[-1]
        sys.exit(f"error: the llama-cpp-python of {site or 'the default install'} does not load: {why}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_gguf(work: Path, quant: str) -> Path:
    """SmolLM2-135M (the default model) as ``quant``, written once by `mka-edge export`."""
    path = work / f"smollm2-{quant}.gguf"
    if not path.is_file():
        print(f"exporting {path.name} (once)", flush=True)
        cmd = [sys.executable, "-m", "mka_edge.cli", "export", "--format", "gguf", "--quant", quant, "--out", str(path)]
        subprocess.run(cmd, check=True)
    return path


def vocab_size(path: Path) -> int:
    import gguf

    return len(gguf.GGUFReader(str(path)).fields["tokenizer.ggml.tokens"].data)


def latency(artifact: Path, site: Path | None, args: argparse.Namespace, prompt: list[int]) -> dict:
    """One latency run of the project's llama.cpp worker, under ``site``'s llama-cpp-python."""
    job = LatencyJob(
        str(artifact),
        args.threads,
        context=args.prompt_tokens + args.gen_tokens + 16,
        prompt_ids=prompt,
        gen_tokens=args.gen_tokens,
        repeats=1,
    )
    with tempfile.TemporaryDirectory(prefix="mka-edge-bench-") as tmp:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_path.write_text(json.dumps(job.to_json()))
        with runtime_slot():  # one measurement at a time on this machine (the project's rule)
            proc = subprocess.run(
                [sys.executable, "-m", WORKER, str(job_path), str(out_path)],
                capture_output=True,
                text=True,
                env=child_env(site),
                timeout=1200,
            )
        if proc.returncode != 0 or not out_path.is_file():
            last = (proc.stderr.strip().splitlines() or [""])[-1]
            why = explain_exit(proc.returncode, f"latency run of {artifact.name}", last) or last
            sys.exit(f"error: {why}")
        res = json.loads(out_path.read_text())
    return {"prefill_tps": res["prompt_tps"]["median"], "decode_tps": res["gen_tps"]["median"]}


def _stats(vals: list[float]) -> dict:
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "runs": vals}


def markdown(rows: list[dict], meta: dict) -> str:
    head = (
        "| type | build | prefill tok/s (min-max) | decode tok/s (min-max) | ratio portable/native (prefill, decode) |"
    )
    lines = [head, "|---|---|---|---|---|"]
    for r in rows:
        ratio = r.get("ratio")
        cell = f"{ratio['prefill']:.3f}, {ratio['decode']:.3f}" if ratio else ""
        p, d = r["prefill_tps"], r["decode_tps"]
        lines.append(
            f"| {r['type']} | {r['build']} | {p['median']:.0f} ({p['min']:.0f}-{p['max']:.0f}) "
            f"| {d['median']:.1f} ({d['min']:.1f}-{d['max']:.1f}) | {cell} |"
        )
    lines.append("")
    lines.append(
        f"host figures: {meta['host']['cpus']} CPUs ({meta['host']['cpu_flags']}), {meta['threads']} threads, "
        f"{meta['rounds']} interleaved rounds (median, min-max), {meta['prompt_tokens']}-token prompt, "
        f"{meta['gen_tokens']} generated tokens; run took {meta['seconds']} s."
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--other-site", type=Path, default=None, help="folder holding the other llama_cpp package")
    ap.add_argument("--other-label", default="native", help="the other build's name in the table")
    ap.add_argument("--default-label", default="portable", help="the default install's name in the table")
    ap.add_argument("--work", type=Path, default=Path("bench/results/portable_build_work"), help="where the GGUFs live")
    ap.add_argument("--types", default=",".join(TYPES), help="GGUF quant types")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (each runs every type and build once)")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", type=Path, default=Path("bench/results/portable_build.json"))
    args = ap.parse_args()
    if args.other_site is not None and not (args.other_site / "llama_cpp" / "__init__.py").is_file():
        sys.exit(f"error: no llama_cpp package in --other-site {args.other_site}; install one there with pip --target")

    t_start = time.time()
    check_llama_cpp()  # the default build runs on this CPU (the other one is what is measured)
    builds = {args.default_label: None}
    if args.other_site is not None:
        builds[args.other_label] = args.other_site.resolve()
    info = {name: build_info(site) | {"site": str(site) if site else None} for name, site in builds.items()}
    for name, b in info.items():
        print(f"{name}: {b['file']} ({b['version']}): {b['system_info']}", flush=True)
    if len(info) == 2 and len({b["file"] for b in info.values()}) == 1:
        sys.exit("error: both builds load the same llama_cpp; check --other-site")

    args.work.mkdir(parents=True, exist_ok=True)
    types = [t for t in args.types.split(",") if t]
    files = {t: make_gguf(args.work, t) for t in types}
    n_vocab = min(vocab_size(p) for p in files.values())
    prompt = [100 + (i * 7919) % (n_vocab - 100) for i in range(args.prompt_tokens)]

    runs: dict[tuple[str, str], list[dict]] = {(t, b): [] for t in types for b in builds}
    for i in range(args.rounds):
        order = list(builds) if i % 2 == 0 else list(reversed(builds))
        for t in types:
            for b in order:
                runs[(t, b)].append(latency(files[t], builds[b], args, prompt))
        print(f"round {i + 1}/{args.rounds} done", flush=True)

    rows = []
    for t in types:
        for b in builds:
            rs = runs[(t, b)]
            rows.append(
                {
                    "type": t,
                    "build": b,
                    "prefill_tps": _stats([r["prefill_tps"] for r in rs]),
                    "decode_tps": _stats([r["decode_tps"] for r in rs]),
                }
            )
        if len(builds) == 2:
            default, other = rows[-2], rows[-1]
            default["ratio"] = {
                k: default[f"{k}_tps"]["median"] / other[f"{k}_tps"]["median"] for k in ("prefill", "decode")
            }
    meta = {
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "cpu_flags": flag_summary(cpu_flags())},
        "builds": info,
        "portable_cmake_args": PORTABLE_CMAKE_ARGS,
        "threads": args.threads,
        "rounds": args.rounds,
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "seconds": round(time.time() - t_start),
        "label": "host figures (this machine's CPU), not device predictions",
    }
    atomic_write_text(args.out, json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
