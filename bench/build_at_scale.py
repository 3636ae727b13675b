"""A whole `mka-edge build` on a synthetic model of a real shape, timed from an empty cache (issue 22:
"a 1.5B model's build whose plan merges nothing takes at most about 15 minutes on two cores").

The model: random weights (bench/scale.py's ``build_model``: normal(0, 0.02), bfloat16 safetensors)
at Qwen2.5-1.5B's shape (28 layers, 1536 wide, FFN 8960, 12 heads, 2 KV heads, 151,936-row tied
embedding) written as a llama (the shape, not the architecture, sets the cost), with SmolLM2's
tokenizer (a real BPE llama.cpp's pre-tokenizer table knows; the rows past its 49,152 tokens are
written as padding).  Random weights make every quality figure meaningless; the plan's choices are
what such a model gives, and the timing is what a plan and build of this size cost.

Each line the build prints is stamped with the seconds since the start, so the stages' shares show.
Prints the timeline and the total, writes JSON.

    python bench/build_at_scale.py --out bench/results/build_at_scale-1.5b.json
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = {
    "1.5b": dict(
        layers=28,
        hidden=1536,
        intermediate=8960,
        heads=12,
        kv_heads=2,
        vocab=151936,
        tied=True,
        max_positions=32768,
        rope={"rope_type": "default", "rope_theta": 1000000.0},
    ),
}


def make_model(shape: dict, folder: Path) -> None:
    """The synthetic model, once per folder (bench/scale.py's builder with SmolLM2's tokenizer)."""
    import scale
    import torch
    from transformers import AutoModelForCausalLM

    from mka_edge.models.loading import load_model

    if (folder / "config.json").is_file():
        return
    tok = load_model(None).tokenizer
    cfg = scale.make_config(shape, tok.bos_token_id, tok.eos_token_id)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.to_empty(device="cpu")
    model.lm_head.weight = model.model.embed_tokens.weight
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            (p.uniform_(0.8, 1.2, generator=gen) if "norm" in name else p.normal_(0.0, 0.02, generator=gen))
    tmp = folder.with_name(folder.name + ".part")
    model.save_pretrained(tmp, max_shard_size="2GB")
    tok.save_pretrained(tmp)
    tmp.rename(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1.5b")
    ap.add_argument("--profile", default="laptop-8gb")
    ap.add_argument("--budget-mb", type=float, default=1000)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "mka-edge-build-at-scale")
    ap.add_argument("--extra", default="", help="more build options, e.g. --measure-all")
    ap.add_argument("--out", type=Path, default=Path("bench/results/build_at_scale-1.5b.json"))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    folder = args.work / f"model-{args.shape}"
    t0 = time.perf_counter()
    make_model(SHAPES[args.shape], folder)
    made = time.perf_counter() - t0
    out = Path(tempfile.mkdtemp(prefix="pkg-", dir=args.work))
    cmd = ["mka-edge", "build", "--profile", args.profile, "--budget-mb", str(args.budget_mb), "--model", str(folder)]
    cmd += ["--out", str(out / "pkg"), *args.extra.split()]
    cache = Path(tempfile.mkdtemp(prefix="cache-", dir=args.work))
    env = {**os.environ, "MKA_EDGE_CACHE": str(cache), "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    print(f"model ready ({made:.0f} s); running: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    timeline = []
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            stamp = time.perf_counter() - t0
            timeline.append((round(stamp, 1), line.rstrip()))
            print(f"{stamp:7.1f}s  {line.rstrip()}", flush=True)
    total = time.perf_counter() - t0
    plan = out / "pkg" / "plan.json"
    result = {
        "command": cmd,
        "shape": SHAPES[args.shape],
        "exit_code": proc.returncode,
        "seconds": total,
        "timeline": timeline,
        "plan": json.loads(plan.read_text())["choice"] if plan.is_file() else None,
        "scope": json.loads(plan.read_text()).get("scope") if plan.is_file() else None,
        "cpus": os.cpu_count(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"build exit {proc.returncode} after {total:.0f} s ({total / 60:.1f} min); wrote {args.out}")


if __name__ == "__main__":
    main()
