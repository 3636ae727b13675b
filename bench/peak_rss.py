"""Peak host memory of one `mka-edge` command, in the project's measure (mka_edge/memory_use.py):

    ratio = (peak RSS - RSS right after imports) / float32 weight bytes of the model

The command runs in this process (click, standalone_mode=False) after the heavy imports every
command pays (torch, transformers, gguf, the mka_edge pipeline); child processes (llama.cpp's
quantizer and validation, the ONNX builder) are sampled and reported beside it.

    python bench/peak_rss.py --out bench/results/peak_rss_build.json -- \\
        build --profile raspberry-pi-zero-2w --out /tmp/pi0
    python bench/peak_rss.py --model /tmp/llama-1b -- merge --model /tmp/llama-1b --merge-layers 1 ...
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="the model whose float32 bytes divide (default: the embedded one)")
    ap.add_argument("--out", type=Path, default=None, help="JSON to write")
    ap.add_argument("--where", action="store_true", help="print where (mka_edge frames) the sampled peak was")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the mka-edge command's arguments")
    args = ap.parse_args()
    argv = args.command[1:] if args.command[:1] == ["--"] else args.command

    import gguf  # noqa: F401 - the imports every command pays, before the baseline
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import mka_edge.build  # noqa: F401
    import mka_edge.merging  # noqa: F401
    from mka_edge.cli import cli
    from mka_edge.exporters.gguf import f32_bytes
    from mka_edge.memory_use import MemoryMeter, rss_bytes
    from mka_edge.models.loading import load_config

    weights = f32_bytes(load_config(args.model))
    base = rss_bytes()
    t0 = time.perf_counter()
    with MemoryMeter(weights, base, where=args.where) as meter:
        cli.main(argv, standalone_mode=False)
    use = meter.use
    row = {"command": "mka-edge " + shlex.join(argv), "seconds": round(time.perf_counter() - t0, 1), **use.as_dict()}
    print(
        f"\n{row['command']}\n  {row['seconds']} s; RSS after imports {row['baseline_gb']} GB, peak {row['peak_gb']} GB, "
        f"float32 weights {row['weights_f32_gb']} GB -> ratio {row['ratio']}; child processes' peak "
        f"{row['children_peak_gb']} GB"
    )
    if args.where:
        row["peak_at"] = meter.peak_at
        print("  sampled peak at:\n    " + "\n    ".join(meter.peak_at))
        row["growth"] = meter.growth
        print(
            "  RSS growth (s, GB, where):\n    " + "\n    ".join(f"{t:7.1f} {g:6.2f} {w}" for t, g, w in meter.growth)
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
