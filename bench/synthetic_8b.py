"""Time `analyze` + `merge` on a synthetic Llama-3-8B-shaped model (random weights, real shapes).

For GPU machines: quality is meaningless on random weights; this measures wall time per phase
and peak GPU memory. ``--scale`` shrinks hidden/intermediate sizes to try the script on a CPU.

    python bench/synthetic_8b.py --device cuda --merge-layers 4 --out bench/results/synthetic_8b.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mka_edge.calibration import load_texts
from mka_edge.mka.context import MergeContext, MergeSettings
from mka_edge.mka.trajectory import trajectory
from mka_edge.models.architectures import arch_for
from mka_edge.models.loading import LoadedModel


def byte_tokenizer():
    """A small BPE trained on the packaged calibration text: any ids are valid for a 128k vocab."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(load_texts()[:20], trainers.BpeTrainer(vocab_size=2000, special_tokens=["<unk>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--scale", type=int, default=1, help="divide hidden and intermediate sizes by this")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--merge-layers", type=int, default=4)
    ap.add_argument("--method", default="mka")
    ap.add_argument("--alpha", default="paper")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--out", default="bench/results/synthetic_8b.json")
    args = ap.parse_args()
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    s = args.scale
    cfg = LlamaConfig(
        hidden_size=4096 // s,
        intermediate_size=14336 // s,
        num_hidden_layers=args.layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        head_dim=128 // s,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    )
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    build_s = time.perf_counter() - t0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    lm = LoadedModel(
        model=model,
        tokenizer=byte_tokenizer(),
        arch=arch_for("llama"),
        source={"kind": "synthetic", "spec": f"llama3-8b-shape/{s}"},
        fingerprint=f"synthetic-{s}-{args.layers}",
    )
    ctx = MergeContext(lm, MergeSettings(samples=args.samples, seq_len=args.seq_len), dev)
    t0 = time.perf_counter()
    ctx.similarity()
    analyze_s = time.perf_counter() - t0
    analyze_phases = ctx.timer.as_dict()
    ctx.timer.seconds.clear()
    ctx.timer.counts.clear()
    t0 = time.perf_counter()
    trajectory(ctx, args.method, args.merge_layers, args.alpha, use_cache=False)
    merge_s = time.perf_counter() - t0
    res = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "dtype": str(dtype),
        "params_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
        "scale": s,
        "calibration": f"{args.samples} x {args.seq_len}",
        "build_model_s": round(build_s, 2),
        "analyze_s": round(analyze_s, 2),
        "analyze_phases": analyze_phases,
        "merge_s": round(merge_s, 2),
        "merge_layers": args.merge_layers,
        "method": args.method,
        "alpha": args.alpha,
        "merge_phases": ctx.timer.as_dict(),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if dev.type == "cuda" else None,
        "torch": torch.__version__,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
