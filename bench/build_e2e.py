"""The user's own command end to end at a real shape (issue 23 item 6): `mka-edge build --profile P
--model <hub id>` on a random model with Llama-3-8B's config (or narrower, for a quick try), a
Llama-3-style 128,256-token BPE, bf16 safetensors in the Hugging Face cache layout, reached offline
by hub id through a recipe.  Time and memory per stage of the build, which runs as a child process
exactly as a user runs it.

Memory is sampled every 0.5 s over the build's process tree (the build and its llama.cpp and
dequantization children), from /proc/<pid>/status: RssAnon (memory only RAM can hold: what
decides whether a host is large enough) and RssFile (pages mapped from files: the safetensors
torch maps when it loads a checkpoint in its own dtype, llama.cpp's mapped GGUF; the kernel drops
them under pressure and reads them again).  A stage starts at the build's own marker line
("[1/5] plan" ... "[5/5] package"); the plan's sub-steps are in the saved, timestamped log.

    python bench/build_e2e.py --shape 8b --workdir /tmp/e2e-8b -- --method shortgpt --samples 4 \
        --seq-len 128 --positions 128 --no-imatrix --no-attention-removal --mmlu-per-subject 0 \
        --repeats 1 --max-tries 1 --max-quality-loss 5

Everything after ``--`` goes to `mka-edge build`.  The model is written once per --workdir and kept
(16 GB at 8b); the build's cache and package are made afresh each run.  JSON and the log go to
bench/results/build_e2e-<shape>.json(.log) unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

# config.json fields over models/synthetic.LLAMA3_8B_CONFIG ("8b": Llama-3-8B itself)
SHAPES = {
    "8b": {},
    "1b": dict(num_hidden_layers=16, hidden_size=2048, intermediate_size=8192),
    "tiny": dict(
        num_hidden_layers=6, hidden_size=128, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2
    ),
}
HUB_ID = "mka-bench/llama3-shaped"
REV = "0123456789abcdef0123456789abcdef01234567"
GB = 1e9


def hub_layout(root: Path, model: Path) -> Path:
    """``model``'s files as huggingface_hub's cache holds a download (snapshot files moved in, not
    copied: 16 GB); returns HF_HOME."""
    base = root / "hf" / "hub" / f"models--{HUB_ID.replace('/', '--')}"
    snap = base / "snapshots" / REV
    if not snap.is_dir():
        snap.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(model), str(snap))
        (base / "refs").mkdir(exist_ok=True)
        (base / "refs" / "main").write_text(REV)
    return root / "hf"


def _status(pid: int) -> tuple[int, int]:
    anon = file = 0
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) * 1024
                elif line.startswith("RssFile:"):
                    file = int(line.split()[1]) * 1024
    except OSError:
        pass
    return anon, file


def _tree(pid: int) -> list[int]:
    import psutil

    try:
        p = psutil.Process(pid)
        return [pid, *(c.pid for c in p.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


class Sampler(threading.Thread):
    """Process-tree RssAnon and RssFile every 0.5 s, peaks kept per stage (the stage the log is in)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.stage, self.stop = pid, "start", threading.Event()
        self.peaks: dict[str, dict] = {}

    def run(self) -> None:
        while not self.stop.is_set():
            pids = _tree(self.pid)
            if not pids:
                break
            tree = [_status(p) for p in pids]
            anon, file = sum(a for a, _ in tree), sum(f for _, f in tree)
            main_anon, main_file = tree[0]
            pk = self.peaks.setdefault(
                self.stage, {"tree_anon": 0, "tree_file": 0, "tree_rss": 0, "build_anon": 0, "build_rss": 0}
            )
            pk["tree_anon"] = max(pk["tree_anon"], anon)
            pk["tree_file"] = max(pk["tree_file"], file)
            pk["tree_rss"] = max(pk["tree_rss"], anon + file)
            pk["build_anon"] = max(pk["build_anon"], main_anon)
            pk["build_rss"] = max(pk["build_rss"], main_anon + main_file)
            self.stop.wait(0.5)


def run_build(hf_home: Path, work: Path, profile: str, extra: list[str], log_path: Path) -> dict:
    recipe = work / "llama3-shaped.yaml"
    recipe.write_text(
        f"name: llama3-shaped\nsource:\n  kind: hub\n  hub_id: {HUB_ID}\narchitecture: llama\n"
        "llama_cpp:\n  pre_tokenizer: llama-bpe\n"
    )
    cache, out = work / "cache", work / "pkg"
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", MKA_EDGE_CACHE=str(cache))
    cmd = [sys.executable, "-m", "mka_edge.cli", "build", "--profile", profile, "--model", str(recipe)]
    cmd += ["--out", str(out), *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=work)
    sampler = Sampler(proc.pid)
    sampler.start()
    starts: list[tuple[str, float]] = [("start", 0.0)]
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n")
        buf = ""
        assert proc.stdout is not None
        while True:
            ch = proc.stdout.read(1)
            if not ch:
                break
            if ch not in "\r\n":
                buf += ch
                continue
            line, buf = buf, ""
            if not line.strip():
                continue
            t = time.perf_counter() - t0
            if ch == "\n" or "%|" not in line:  # progress bars: keep their last state only
                log.write(f"{t:8.1f}  {line}\n")
                log.flush()
                print(f"{t:8.1f}  {line}", flush=True)
            if line.startswith("[") and "/5]" in line[:6]:
                stage = line[6:].strip().split(":")[0].split(" ")[0]
                starts.append((stage, t))
                sampler.stage = stage
    rc = proc.wait()
    total = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join(2)
    stages = []
    for i, (name, t) in enumerate(starts):
        end = starts[i + 1][1] if i + 1 < len(starts) else total
        pk = sampler.peaks.get(name, {})
        stages.append({"stage": name, "seconds": round(end - t, 1), **{k: round(v / GB, 2) for k, v in pk.items()}})
    manifest = out / "manifest.json"
    return {
        "command": " ".join(cmd),
        "rc": rc,
        "seconds": round(total, 1),
        "stages": stages,
        "manifest": json.loads(manifest.read_text()) if manifest.is_file() else None,
    }


def table(res: dict, weights_gb: float) -> str:
    rows = [
        "| stage | seconds | tree peak RssAnon GB | tree peak RssFile GB | tree peak RSS GB | build process peak RSS GB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for s in res["stages"]:
        rows.append(
            f"| {s['stage']} | {s['seconds']} | {s.get('tree_anon', '-')} | {s.get('tree_file', '-')} | "
            f"{s.get('tree_rss', '-')} | {s.get('build_rss', '-')} |"
        )
    peak_anon = max((s.get("tree_anon", 0) for s in res["stages"]), default=0)
    rows.append(
        f"| **total** | **{res['seconds']}** | {peak_anon} ({peak_anon / weights_gb:.2f}x the bf16 weights) | | | |"
    )
    return "\n".join(rows)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--profile", default="laptop-8gb")
    ap.add_argument("--workdir", required=True, help="model (kept), cache and package")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="JSON path (default bench/results/build_e2e-<shape>.json)")
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out or f"bench/results/build_e2e-{args.shape}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    made = work / "made.json"
    if not made.is_file():
        t = time.perf_counter()
        print(f"writing the {args.shape} model (once per workdir)", flush=True)
        from mka_edge.models.synthetic import make_llama3_shaped

        folder = make_llama3_shaped(work / "model", seed=args.seed, **SHAPES[args.shape])
        size = json.loads((folder / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
        facts = {"params": size / 2, "bytes": size}
        hub_layout(work, folder)
        facts["seconds"] = round(time.perf_counter() - t, 1)
        made.write_text(json.dumps(facts))
    facts = json.loads(made.read_text())
    res = run_build(work / "hf", work, args.profile, extra, out.with_suffix(".log"))
    res.update(shape=args.shape, shape_fields=SHAPES[args.shape], model=facts, profile=args.profile)
    out.write_text(json.dumps(res, indent=2))
    print(table(res, facts["bytes"] / GB))
    print(f"rc {res['rc']}; JSON {out}; log {out.with_suffix('.log')}")
    return 0 if res["rc"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
