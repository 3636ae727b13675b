"""The pipeline's stages on a synthetic Llama (random weights, real shapes): wall time, peak host RSS
and peak GPU memory per stage, at Llama-3.2-1B or Llama-3-8B size.

Random weights make every quality figure meaningless (plan choices, merge KL, validation KL);
what this measures is what a stage costs at a given size.  Stages, each on what the one before
left (a stage whose input or package is missing is skipped with the reason):

  build            random model saved as a Hugging Face folder (sharded safetensors + byte-level BPE
                   tokenizer, embedding padded to the real vocabulary); setup, not a pipeline stage
  load             mka_edge.models.loading.load_model (float32 on CPU, bfloat16 on CUDA)
  plan             planning.resolve_settings(quality_prior=True) -> cheap_facts -> measure -> solve
                   (llama.cpp's published quant-cost prior, no probing; the merge curve on this
                   script's reduced calibration; raspberry-pi-4-4gb at 750 MB for 1b, laptop-8gb
                   for 8b: budgets no unmerged plan fits, so the whole curve is computed)
  trajectory       mka.trajectory.trajectory(MergeContext(lm, MergeSettings(--samples, --seq-len,
                   --loss-samples)), --method, --merge-layers, --alpha, use_cache=False)
  gguf-bf16        exporters.gguf.write_float_gguf(lm, path, "BF16")  (needs the gguf package)
  quantize-q4_k_m  exporters.llama_quantize.quantize (llama.cpp's quantizer, a child process;
                   needs llama-cpp-python)
  validate         validate.core.validate_artifact on the quantized file: KL against the model and
                   tokens/s in llama.cpp (CPU only, with --validate)

Host memory is the project's measure (mka_edge/memory_use.py, MemoryMeter, one per stage): peak
host RSS is this process's kernel high-water mark (VmHWM, reset per stage through
/proc/self/clear_refs; sampled every 50 ms where it cannot be reset); "ratio" is
(peak RSS - RSS after imports) / float32 weight bytes; the child processes' peak (sampled, and the
kernel's figure for a child that ended in the stage) is reported beside it, never added.  Peak GPU
memory is torch.cuda.max_memory_allocated, reset per stage.  GB = 10^9 bytes.

CPU, Llama-3.2-1B shape, reduced calibration (the defaults on CPU: 2 x 64 tokens, K = 2):

    .venv/bin/python bench/scale.py --shape 1b --device cpu --validate

GPU, Llama-3-8B shape (defaults on CUDA: 4 x 256 tokens, K = 4; bfloat16; no validation):

    python bench/scale.py --shape 8b --device cuda

(without the gguf package, `build`, `load` and `trajectory` run; `plan` and `gguf-bf16` need it
(solver/feasibility.py and the exporters import it), `quantize-q4_k_m` needs llama-cpp-python.)

A quick try: ``.venv/bin/python bench/scale.py --shape tiny --validate``.

The user's whole command (`mka-edge build` as a child process, hub layout, per-stage time and
process-tree RssAnon/RssFile) at the 8B shape is bench/build_e2e.py; this script times the
library's stages one by one in this process.  JSON goes to
bench/results/scale-<shape>-<device>.json unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # library progress bars off (tqdm reads TQDM_* defaults)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local

GB = 1e9
SHAPES = {
    # Llama-3.2-1B: tied embeddings, llama3 rope scaling (factor 32 over an 8192 original context)
    "1b": dict(
        layers=16,
        hidden=2048,
        intermediate=8192,
        heads=32,
        kv_heads=8,
        vocab=128256,
        tied=True,
        max_positions=131072,
        rope={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_theta": 500000.0,
        },
    ),
    # Llama-3-8B: untied, plain rope
    "8b": dict(
        layers=32,
        hidden=4096,
        intermediate=14336,
        heads=32,
        kv_heads=8,
        vocab=128256,
        tied=False,
        max_positions=8192,
        rope={"rope_type": "default", "rope_theta": 500000.0},
    ),
}
# the 1B layout (tied, llama3 rope, full vocabulary) at a size that runs in seconds
SHAPES["tiny"] = dict(SHAPES["1b"], layers=6, hidden=256, intermediate=512, heads=4, kv_heads=2)
# (profile, budget MB or None for the profile's): chosen so that no unmerged plan fits and some
# merged one does, so the planner needs its whole merge curve (its costly case).  At 1B every shipped
# profile fits the unmerged model at F16, and the plan would then score no merge at all.
PLAN_DEFAULTS = {"tiny": ("raspberry-pi-4-4gb", 115), "1b": ("raspberry-pi-4-4gb", 750), "8b": ("laptop-8gb", None)}
PLAN_QUANT = "Q4_K_M"
BPE_VOCAB = 4096  # trained tokens; the embedding keeps the shape's full vocabulary


# ---------------------------------------------------------------- results


@dataclass
class Stage:
    name: str
    status: str = "ok"  # ok | skipped | failed
    seconds: float | None = None
    peak_rss_gb: float | None = None  # this process's peak RSS (children not included)
    peak_children_rss_gb: float | None = None  # child processes' peak RSS, beside it (None: no child seen)
    ratio: float | None = None
    peak_gpu_gb: float | None = None
    notes: str = ""
    extra: dict = field(default_factory=dict)


class Bench:
    def __init__(self, args, device) -> None:
        self.args, self.device = args, device
        self.stages: list[Stage] = []
        self.rss_after_imports = 0
        self.weight_bytes_f32 = 0
        self.state: dict = {}
        self.missing: dict[str, str] = {}  # module -> why it did not import

    def skip(self, name: str, why: str) -> None:
        print(f"[{name}] skipped: {why}", flush=True)
        self.stages.append(Stage(name, "skipped", notes=why))

    def run(self, name: str, fn, *, pipeline: bool = True) -> Stage:
        import torch

        from mka_edge.memory_use import MemoryMeter

        cuda = self.device.type == "cuda"
        gc.collect()
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        st = Stage(name)
        print(f"[{name}] running", flush=True)
        with MemoryMeter(self.weight_bytes_f32, self.rss_after_imports) as meter:
            t0 = time.perf_counter()
            try:
                out = fn() or {}
                if cuda:
                    torch.cuda.synchronize(self.device)
            except Exception as exc:  # noqa: BLE001 - a failed stage is reported, the rest go on
                st.status = "failed"
                out = {"notes": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
                st.extra["traceback"] = traceback.format_exc(limit=8)
                print(st.extra["traceback"], file=sys.stderr, flush=True)
            st.seconds = round(time.perf_counter() - t0, 2)
        use = meter.use
        st.peak_rss_gb = round(use.peak / GB, 3)
        st.peak_children_rss_gb = round(use.children_peak / GB, 3) if use.children_peak else None
        st.ratio = None if use.ratio is None else round(use.ratio, 3)
        if cuda:
            st.peak_gpu_gb = round(torch.cuda.max_memory_allocated(self.device) / GB, 3)
        st.notes = out.pop("notes", "")
        if not pipeline:
            st.notes = ("setup, not a pipeline stage; " + st.notes).rstrip("; ")
        st.extra.update(out)
        kids = f", children {st.peak_children_rss_gb} GB" if st.peak_children_rss_gb else ""
        print(f"[{name}] {st.status} in {st.seconds} s, peak RSS {st.peak_rss_gb} GB{kids}; {st.notes}", flush=True)
        self.stages.append(st)
        return st

    def need(self, name: str, *modules: str) -> bool:
        """False (and the stage skipped with the reason) when a module it needs did not import."""
        for m in modules:
            if m in self.missing:
                self.skip(name, f"cannot import {m}: {self.missing[m]}")
                return False
        return True


# ---------------------------------------------------------------- helpers


def try_imports(bench: Bench, modules: list[str]) -> None:
    """Import everything the stages use now, so 'RSS after imports' is the baseline of every stage;
    a module that fails is remembered and the stages needing it are skipped."""
    for m in modules:
        try:
            importlib.import_module(m)
        except Exception as exc:  # noqa: BLE001
            inner = [f for f in traceback.extract_tb(exc.__traceback__) if "/mka_edge/" in f.filename]
            where = (
                f" (imported at mka_edge/{inner[-1].filename.split('/mka_edge/')[-1]}:{inner[-1].lineno})"
                if inner
                else ""
            )
            bench.missing[m] = f"{type(exc).__name__}: {exc}{where}"


def make_config(shape: dict, bos: int, eos: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        head_dim=shape["hidden"] // shape["heads"],
        max_position_embeddings=shape["max_positions"],
        rms_norm_eps=1e-5,
        tie_word_embeddings=shape["tied"],
        rope_parameters=dict(shape["rope"]),
        bos_token_id=bos,
        eos_token_id=eos,
        attention_bias=False,
        mlp_bias=False,
    )


def byte_bpe_tokenizer():
    """A byte-level BPE (GPT-2 pre-tokenizer) of BPE_VOCAB tokens trained on the packaged
    calibration text.  The model's embedding keeps the shape's full vocabulary: ids past the
    tokenizer's are never produced, and the GGUF exporter writes them as UNUSED padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from mka_edge.calibration import load_texts

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(load_texts()[:20], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def build_model(shape: dict, folder: Path, device, seed: int) -> dict:
    """Random weights at ``shape`` made in place (meta device -> empty bfloat16 tensors on
    ``device`` -> normal(0, 0.02) per tensor, norms uniform in [0.8, 1.2]), saved sharded."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = byte_bpe_tokenizer()
    cfg = make_config(shape, tok.bos_token_id, tok.eos_token_id)
    if len(tok) > cfg.vocab_size:
        raise ValueError(f"--vocab {cfg.vocab_size} is smaller than the tokenizer ({len(tok)} tokens)")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.to_empty(device=device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # to_empty leaves two tensors
    gen = torch.Generator(device=device).manual_seed(seed)
    std = float(cfg.initializer_range)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.8, 1.2, generator=gen)
            else:
                p.normal_(0.0, std, generator=gen)
    n_params = sum(p.numel() for p in model.parameters())  # a tied tensor once
    model.eval()
    model.save_pretrained(folder, max_shard_size="2GB")
    tok.save_pretrained(folder)
    del model
    shards = sorted(folder.glob("*.safetensors"))
    return {
        "params": n_params,
        "tokenizer_tokens": len(tok),
        "shards": len(shards),
        "folder_bytes": sum(f.stat().st_size for f in folder.iterdir() if f.is_file()),
        "notes": f"{n_params / 1e9:.3f} B params, {len(shards)} shard(s), bf16 safetensors, "
        f"{len(tok)}-token BPE in a {cfg.vocab_size}-row embedding",
    }


# ---------------------------------------------------------------- stages


def stage_load(b: Bench) -> dict:
    import torch

    from mka_edge.models.loading import load_model

    dtype = torch.bfloat16 if b.device.type == "cuda" else torch.float32
    lm = load_model(str(b.state["folder"]), b.device, dtype)
    b.state["lm"] = lm
    return {"dtype": str(dtype), "notes": f"{dtype} on {b.device}"}


def merge_settings(b: Bench):
    from mka_edge.mka.context import MergeSettings

    a = b.args
    return MergeSettings(samples=a.samples, seq_len=a.seq_len, loss_samples=a.loss_samples)


def stage_plan(b: Bench) -> dict:
    from mka_edge.mka.context import MergeContext
    from mka_edge.planning import cheap_facts, measure, resolve_settings
    from mka_edge.solver.solve import solve

    a, lm = b.args, b.state["lm"]
    s = resolve_settings(
        a.profile,
        str(b.state["folder"]),
        budget_mb=a.budget_mb,
        method=a.method,
        alpha=a.alpha,
        k_max=a.plan_k_max,
        quality_prior=True,
        heal=None,
    )
    cheap = cheap_facts(s)
    lines: list[str] = []
    ctx = MergeContext(lm, merge_settings(b), b.device)
    try:
        facts = measure(s, cheap, ctx, progress=False, log=lines.append)
        plan = solve(facts, s)
    finally:
        ctx.reset()
        del ctx
    ch = plan.choice
    curve = plan.curve
    return {
        "profile": a.profile,
        "prior": not cheap.measure,
        "k_max": cheap.k_max,
        "curve_points": len(curve["kl"]) - 1,
        "curve_complete": curve["complete"],
        "choice": {"k": ch.k, "quant": ch.quant, "layers_after": ch.layers_after},
        "reason": plan.reason,
        "log": lines,
        "budget_mb": s.budget.memory_mb,
        "notes": f"{a.profile} at {s.budget.memory_mb:.0f} MB, {'prior' if not cheap.measure else 'MEASURED'} quant costs, curve to "
        f"K={len(curve['kl']) - 1} of {cheap.k_max}; chose K={ch.k} {ch.quant}",
    }


def stage_trajectory(b: Bench) -> dict:
    from mka_edge.mka.context import MergeContext
    from mka_edge.mka.trajectory import trajectory

    a, lm = b.args, b.state["lm"]
    ctx = MergeContext(lm, merge_settings(b), b.device)
    try:
        traj = trajectory(ctx, a.method, a.merge_layers, a.alpha, use_cache=False, progress=False)
        phases = ctx.timer.as_dict()
    finally:
        ctx.reset()
        del ctx
    return {
        "method": a.method,
        "k": len(traj["steps"]),
        "trajectory_seconds": traj["seconds"],
        "phases": phases,
        "notes": f"{a.method} to K={len(traj['steps'])} on {a.samples} x {a.seq_len} tokens ({a.loss_samples} scoring)",
    }


def stage_gguf(b: Bench) -> dict:
    from mka_edge.exporters.gguf import write_float_gguf

    path = b.state["work"] / f"model-{b.args.gguf_type.lower()}.gguf"
    # the synthetic BPE is in no llama.cpp table: its pre-tokenizer (GPT-2's byte-level regex) is named
    tok = write_float_gguf(b.state["lm"], path, b.args.gguf_type, pre_tokenizer="gpt-2")
    b.state["base_gguf"] = path
    size = path.stat().st_size
    return {
        "file_bytes": size,
        "tokenizer": tok,
        "notes": f"{size / GB:.3f} GB file, n_vocab {tok.get('n_vocab') if isinstance(tok, dict) else '?'}",
    }


def stage_quantize(b: Bench) -> dict:
    from mka_edge.exporters.llama_quantize import quantize
    from mka_edge.exporters.quant_types import quant_type

    q = quant_type(PLAN_QUANT)
    out = b.state["work"] / f"model-{q.name.lower()}.gguf"
    quantize(b.state["base_gguf"], out, q.ftype, b.args.threads)
    b.state["quant_gguf"] = out
    size = out.stat().st_size
    return {
        "file_bytes": size,
        "ftype": q.ftype,
        "threads": b.args.threads,
        "notes": f"{size / GB:.3f} GB file, ftype {q.ftype}, {b.args.threads} threads, llama.cpp in a child",
    }


def stage_validate(b: Bench) -> dict:
    from mka_edge.validate.core import validate_artifact

    a = b.args
    # the reference is loaded again by validate_artifact (as `mka-edge validate` does): drop ours first
    b.state.pop("lm", None)
    gc.collect()
    r = validate_artifact(
        b.state["quant_gguf"],
        reference=str(b.state["folder"]),
        threads=a.threads,
        context=a.val_prompt + a.val_gen + 16,
        out=b.state["work"] / "validation",
        repeats=1,
        chunks=1,
        gen_tokens=a.val_gen,
        prompt_tokens=a.val_prompt,
        mmlu_per_subject=0,
        progress=False,
    )
    acc, lat = r["accuracy"], r["latency"]
    return {
        "kl": acc["kl"],
        "top1": acc.get("top1"),
        "gen_tps": lat["gen_tps"]["median"],
        "prompt_tps": lat["prompt_tps"]["median"],
        "load_s": lat["load_s"],
        "runtime_peak_rss_mb": lat["peak_rss_mb"],
        "notes": f"gen {lat['gen_tps']['median']:.1f} tok/s, prompt {lat['prompt_tps']['median']:.1f} tok/s, "
        f"KL {acc['kl']:.4f} (random weights), {a.threads} threads",
    }


# ---------------------------------------------------------------- main


def table(stages: list[Stage]) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    rows = [
        f"{'stage':<16} {'seconds':>8} {'peak RSS GB':>11} {'ratio':>6} {'children GB':>11} {'peak GPU GB':>11}  notes"
    ]
    for s in stages:
        note = s.notes if s.status == "ok" else f"{s.status.upper()}: {s.notes}"
        rows.append(
            f"{s.name:<16} {f(s.seconds, '.2f'):>8} {f(s.peak_rss_gb, '.3f'):>11} {f(s.ratio, '.2f'):>6} "
            f"{f(s.peak_children_rss_gb, '.3f'):>11} {f(s.peak_gpu_gb, '.2f'):>11}  {note}"
        )
    return "\n".join(rows)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    ap.add_argument("--layers", type=int, help="override the shape's layer count")
    ap.add_argument("--hidden", type=int, help="override the hidden size (keeps the head count)")
    ap.add_argument("--intermediate", type=int, help="override the MLP size")
    ap.add_argument("--heads", type=int, help="override the attention heads")
    ap.add_argument("--kv-heads", type=int, help="override the key/value heads")
    ap.add_argument("--vocab", type=int, help="override the embedding rows")
    ap.add_argument("--tied", action=argparse.BooleanOptionalAction, default=None, help="tie the embeddings")
    ap.add_argument(
        "--profile", help="device profile for the plan (default: laptop-8gb for 8b, else raspberry-pi-4-4gb)"
    )
    ap.add_argument(
        "--budget-mb",
        type=float,
        help="plan's memory budget (default: 115 for tiny, 750 for 1b, the profile's for 8b; see PLAN_DEFAULTS)",
    )
    ap.add_argument("--method", default="sleb-fast", help="merge method for plan and trajectory")
    ap.add_argument("--alpha", default="calibrated", help="alpha rule of fusing methods (mka, mka-guided, ...)")
    ap.add_argument("--merge-layers", type=int, help="trajectory K (default 2 on CPU, 4 on CUDA)")
    ap.add_argument("--plan-k-max", type=int, help="plan's K limit (default: the planner's rule, min(8, layers // 3))")
    ap.add_argument("--samples", type=int, help="calibration sequences (default 2 on CPU, 4 on CUDA)")
    ap.add_argument("--seq-len", type=int, help="calibration length (default 64 on CPU, 256 on CUDA)")
    ap.add_argument("--loss-samples", type=int, help="sequences scoring each candidate (default: --samples)")
    ap.add_argument("--gguf-type", default="BF16", choices=["BF16", "F16", "F32"], help="float type of the GGUF")
    ap.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    ap.add_argument("--validate", action="store_true", help="run the quantized file in llama.cpp (CPU only)")
    ap.add_argument("--val-prompt", type=int, default=64, help="validation prompt tokens")
    ap.add_argument("--val-gen", type=int, default=32, help="validation generated tokens")
    ap.add_argument(
        "--skip", default="", help="comma list of stages to leave out: plan,trajectory,gguf,quantize,validate"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="where the model and files go (default: a temp dir, removed unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    ap.add_argument("--out", help="JSON path (default bench/results/scale-<shape>-<device>.json)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()

    from mka_edge.device import resolve_device

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    args.samples = args.samples or (4 if cuda else 2)
    args.seq_len = args.seq_len or (256 if cuda else 64)
    args.loss_samples = min(args.loss_samples or args.samples, args.samples)
    args.merge_layers = args.merge_layers or (4 if cuda else 2)
    if args.profile is None:
        args.profile, default_budget = PLAN_DEFAULTS[args.shape]
        args.budget_mb = args.budget_mb if args.budget_mb is not None else default_budget
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    shape = dict(SHAPES[args.shape])
    for key in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab", "tied"):
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix=f"mka-scale-{args.shape}-"))
    work.mkdir(parents=True, exist_ok=True)
    # a cache of its own: a second run on the same seeded weights must not reuse the first one's curve
    os.environ["MKA_EDGE_CACHE"] = str(work / "cache")
    out = Path(args.out or f"bench/results/scale-{args.shape}-{device.type}.json")

    bench = Bench(args, device)
    bench.state["work"] = work
    bench.state["folder"] = work / "model"
    try_imports(
        bench,
        [
            "psutil",
            "mka_edge.memory_use",
            "mka_edge.calibration",
            "mka_edge.models.loading",
            "mka_edge.mka.context",
            "mka_edge.mka.trajectory",
            "mka_edge.planning",
            "gguf",
            "mka_edge.exporters.gguf",
            "mka_edge.exporters.llama_quantize",
            "mka_edge.validate.core",
        ],
    )
    try:  # not imported here: llama.cpp runs in child processes, and its library would add to every stage's RSS
        has_llama = importlib.util.find_spec("llama_cpp") is not None
    except (ImportError, ValueError):
        has_llama = False
    if not has_llama:
        bench.missing["llama_cpp"] = "llama-cpp-python is not installed"
    if "mka_edge.memory_use" in bench.missing:
        print(
            f"mka_edge.memory_use is needed to measure memory: {bench.missing['mka_edge.memory_use']}", file=sys.stderr
        )
        return 2
    if cuda:
        torch.zeros(1, device=device)  # the CUDA context belongs to the baseline, not to a stage
    from mka_edge.memory_use import rss_bytes

    bench.rss_after_imports = rss_bytes()
    print(f"RSS after imports: {bench.rss_after_imports / GB:.3f} GB; work dir {work}", flush=True)
    for m, why in bench.missing.items():
        print(f"not importable: {m}: {why}", flush=True)

    try:
        if bench.need("build", "mka_edge.calibration"):
            st = bench.run(
                "build", lambda: build_model(shape, bench.state["folder"], device, args.seed), pipeline=False
            )
            if st.status == "ok":
                bench.weight_bytes_f32 = 4 * st.extra["params"]
        have_model = bench.weight_bytes_f32 > 0
        if not have_model:
            bench.skip("load", "no model was built")
        elif bench.need("load", "mka_edge.models.loading"):
            bench.run("load", lambda: stage_load(bench))
        loaded = "lm" in bench.state
        for name, fn, mods in (
            ("plan", stage_plan, ("mka_edge.planning", "mka_edge.mka.context")),
            ("trajectory", stage_trajectory, ("mka_edge.mka.trajectory", "mka_edge.mka.context")),
        ):
            if name in skip:
                bench.skip(name, "--skip")
            elif not loaded:
                bench.skip(name, "no loaded model")
            elif bench.need(name, *mods):
                bench.run(name, lambda fn=fn: fn(bench))
        gname = f"gguf-{args.gguf_type.lower()}"
        if "gguf" in skip:
            bench.skip(gname, "--skip")
        elif not loaded:
            bench.skip(gname, "no loaded model")
        elif bench.need(gname, "gguf", "mka_edge.exporters.gguf"):
            bench.run(gname, lambda: stage_gguf(bench))
        qname = f"quantize-{PLAN_QUANT.lower()}"
        if "quantize" in skip:
            bench.skip(qname, "--skip")
        elif "base_gguf" not in bench.state:
            bench.skip(qname, f"no {args.gguf_type} GGUF to quantize")
        elif bench.need(qname, "llama_cpp", "mka_edge.exporters.llama_quantize"):
            bench.run(qname, lambda: stage_quantize(bench))
        if not args.validate or "validate" in skip:
            bench.skip("validate", "not asked for (--validate)")
        elif cuda:
            bench.skip("validate", "CPU only (llama.cpp runs on the CPU here; the GPU run measures the rest)")
        elif "quant_gguf" not in bench.state:
            bench.skip("validate", "no quantized GGUF")
        elif bench.need("validate", "llama_cpp", "mka_edge.validate.core"):
            bench.run("validate", lambda: stage_validate(bench))
    finally:
        bench.state.pop("lm", None)
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    res = {
        "shape": args.shape,
        "config": shape,
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({os.cpu_count()} cores)",
        "dtype": "bfloat16" if cuda else "float32",
        "params": bench.weight_bytes_f32 // 4,
        "float32_weight_bytes": bench.weight_bytes_f32,
        "rss_after_imports_gb": round(bench.rss_after_imports / GB, 3),
        "settings": {
            "profile": args.profile,
            "budget_mb": args.budget_mb,
            "method": args.method,
            "alpha": args.alpha,
            "merge_layers": args.merge_layers,
            "plan_k_max": args.plan_k_max,
            "calibration": f"{args.samples} x {args.seq_len}",
            "loss_samples": args.loss_samples,
            "gguf_type": args.gguf_type,
            "threads": args.threads,
        },
        "not_importable": bench.missing,
        "stages": [s.__dict__ for s in bench.stages],
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "mka_edge": importlib.import_module("mka_edge").__version__,
        },
        "work_dir": str(work) if (args.keep or args.workdir) else None,
        "measure": "mka_edge.memory_use: ratio = (peak RSS - RSS after imports) / float32 weight bytes; "
        "peak RSS is this process's, child processes' peak beside it (not added); GB = 1e9 bytes",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str))
    print()
    print(
        f"{args.shape}: {res['params'] / 1e9:.3f} B params ({bench.weight_bytes_f32 / GB:.2f} GB float32), "
        f"{res['device']}, RSS after imports {res['rss_after_imports_gb']:.3f} GB"
    )
    print(table(bench.stages))
    print(f"JSON: {out}")
    return 1 if any(s.status == "failed" for s in bench.stages) else 0


if __name__ == "__main__":
    sys.exit(main())
