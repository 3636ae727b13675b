"""Command line: each command is a thin shell over one library call."""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import sys
from pathlib import Path

import click

from . import __version__
from .errors import UserError
from .heal_modes import MODES as HEAL_MODES
from .mka.method_table import ALL_METHODS, AUTO_POOL, TABLE
from .targets import TARGETS, get_target


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")


def _max_memory_arg(ctx, param, value):
    """Parse --max-memory at once (a bad one is refused before anything loads) and record it for the
    process: every model this command loads is then placed by it."""
    from .device import parse_max_memory, set_max_memory

    try:
        caps = parse_max_memory(value)
    except UserError as exc:
        raise click.UsageError(str(exc), ctx) from None
    set_max_memory(caps)
    ctx.call_on_close(lambda: set_max_memory(None))  # the cap is this command's, not the process's after it
    return caps


MAX_MEMORY_HELP = (
    'Cap the memory the weights may take on each device, e.g. "cuda:0=20GiB,cpu=16GiB" (GPUs as cuda or '
    "cuda:N; sizes in B, KB, MB, GB, TB or KiB, MiB, GiB, TiB): Hugging Face accelerate fills the GPUs named, "
    "then the CPU, and leaves the rest on disk (in the mka-edge cache), bringing each layer's weights in for "
    "its forward pass, so a model larger than the GPU or the RAM still runs (slower). Every device named must "
    "hold one layer. Default: no cap, the whole model on --device."
)


def _check_kv_type(value):
    """A KV cache type or K/V label, checked against kv_cache's table when the command line is read."""
    if value is None or value == "auto":
        return value
    from .kv_cache import CacheMode

    try:
        CacheMode.parse(value)
    except UserError as exc:
        raise click.BadParameter(str(exc)) from None
    return value.lower()


def max_memory_option(f):
    return click.option(
        "--max-memory",
        "max_memory",
        default=None,
        metavar="DEV=SIZE,...",
        expose_value=False,
        callback=_max_memory_arg,
        help=MAX_MEMORY_HELP,
    )(f)


def _check_device_caps(device: str) -> None:
    """--device and --max-memory agree (checked before anything loads)."""
    from .device import check_placement, current_max_memory, resolve_device

    resolve_device(device)
    check_placement(device, current_max_memory())


def model_options(f):
    """Options shared by every command that loads a model and calibration text."""
    opts = [
        click.option(
            "--model",
            "model",
            default=None,
            metavar="M",
            help="Recipe name (see `mka-edge recipes`), recipe .yaml, Hugging Face directory, .gguf file or hub id. Default: the embedded SmolLM2-135M.",
        ),
        click.option("--device", default="auto", show_default=True, help="Where tensor work runs: auto, cpu or cuda."),
        click.option(
            "--dtype",
            default="auto",
            show_default=True,
            help="Weights dtype: auto (float32 on CPU, or the checkpoint's own 16-bit type where a float32 copy would not fit this host's RAM; bfloat16 on CUDA), float32, bfloat16, float16.",
        ),
        click.option(
            "--calibration",
            type=click.Path(),
            default=None,
            help="Your calibration text: .txt (documents split by two blank lines) or .jsonl with a 'text' field. Default: packaged Wikipedia articles.",
        ),
        click.option(
            "--samples", type=int, default=None, help="Calibration sequences (default from the recipe, else 32)."
        ),
        click.option(
            "--seq-len",
            type=int,
            default=None,
            help="Tokens per calibration sequence (default from the recipe, else 256).",
        ),
        click.option(
            "--positions",
            type=int,
            default=None,
            help="Token vectors sampled per layer for the diffusion maps (default 512; position 0 is never sampled).",
        ),
        click.option(
            "--repeats",
            type=int,
            default=8,
            show_default=True,
            help="Independent position subsamples whose NMI matrices are averaged (steadier ranking).",
        ),
        click.option(
            "--seed", type=int, default=0, show_default=True, help="Seed for window and position sampling and k-means."
        ),
        click.option(
            "--trust-remote-code", is_flag=True, help="Allow model code from the hub to run (off unless you ask)."
        ),
        max_memory_option,
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _context(**opts):
    from .mka.context import build_context

    return build_context(**opts)


def handle_errors(f):
    @functools.wraps(f)
    def wrapper(*a, **kw):
        try:
            return f(*a, **kw)
        except UserError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("error: interrupted; nothing was written", err=True)
            sys.exit(130)
        except torch_oom() as exc:  # type: ignore[misc]
            click.echo(
                f"error: out of memory ({str(exc).splitlines()[0][:120]}); use fewer --samples or a smaller --seq-len",
                err=True,
            )
            sys.exit(3)
        except OSError as exc:  # a folder that cannot be written, a full disk
            where = f" ({exc.filename})" if exc.filename else ""
            if exc.errno == errno.ENOSPC:
                click.echo(
                    f"error: no space left on a device{where}; free space where --out, the cache "
                    f"({os.environ.get('MKA_EDGE_CACHE') or '~/.cache/mka-edge'}) and the temporary folder "
                    "(TMPDIR) live; nothing half-written was left",
                    err=True,
                )
                sys.exit(2)
            click.echo(f"error: {exc.strerror or exc}{where}; check the path, its permissions and free space", err=True)
            sys.exit(2)

    return wrapper


def torch_oom():
    try:
        import torch

        return torch.OutOfMemoryError
    except (ImportError, AttributeError):
        return MemoryError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="mka-edge")
def cli() -> None:
    """mka-edge: shrink a language model to fit an edge device by merging layers (MKA) and
    quantizing, and check the result in its real runtime."""
    from .memory_use import bound_heap

    _quiet_libraries()
    bound_heap()


@cli.command()
@handle_errors
def recipes() -> None:
    """List the model recipes shipped with mka-edge."""
    from .models.recipes import find_recipe, known_recipes

    for name in known_recipes():
        r = find_recipe(name)
        src = r["source"].get("hub_id") or r["source"].get("path") or ""
        click.echo(f"{name:16} {r.get('architecture', '?'):8} {r.get('num_layers', '?'):>3} layers  {src}")


@cli.command()
@model_options
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=".",
    show_default=True,
    help="Folder for similarity.json and similarity.png.",
)
@click.option(
    "--seeds",
    type=int,
    default=1,
    show_default=True,
    help="Also rank the top adjacent pairs under this many seeds in all, to check stability.",
)
@handle_errors
def analyze(out, seeds, **opts) -> None:
    """Layer similarity: diffusion maps of each layer's activations, NMI of their k-means labels.

    One forward pass per calibration batch gathers every layer; writes similarity.json (the LxL
    matrix) and a heatmap PNG, and prints the most similar adjacent pairs."""
    from .analysis import analyze as run

    ctx = _context(**opts)
    res = run(ctx, Path(out), seeds=seeds)
    click.echo(f"{res['num_layers']} layers; most similar adjacent pairs (NMI):")
    for row in res["top_adjacent"]:
        click.echo(f"  layers {row['pair'][0]:>2}-{row['pair'][1]:<2}  {row['similarity']:.3f}")
    for s, rows in res.get("seed_check", {}).items():
        click.echo(f"  seed {s}: " + ", ".join(f"{r['pair'][0]}-{r['pair'][1]}" for r in rows))
    click.echo(f"wrote {Path(out) / 'similarity.json'} and {Path(out) / 'similarity.png'}")


def heal_options(f):
    """Options of a heal, shared by `heal` and the commands that can heal as they go."""
    opts = [
        click.option(
            "--train",
            "heal_train",
            type=click.Choice(list(HEAL_MODES)),
            default="all",
            show_default=True,
            help="What the heal trains: all parameters; only the layers the merge changed and their neighbours; "
            "LoRA adapters on every block's linear layers, merged back at the end; or qlora: the same adapters "
            "over a 4-bit NF4 copy of those layers (bitsandbytes) against the teacher's cached top-256 "
            "log-probs, merged into the original weights (what fits an 8B heal on a 24 GB GPU). A recipe's heal: "
            "section may set another default (and steps, lr, lora_rank); what you pass here wins.",
        ),
        click.option(
            "--lr", "heal_lr", type=float, default=5e-5, show_default=True, help="AdamW learning rate (constant)."
        ),
        click.option("--heal-batch", type=int, default=2, show_default=True, help="Calibration windows per step."),
        click.option("--heal-seq-len", type=int, default=256, show_default=True, help="Tokens per calibration window."),
        click.option(
            "--lora-rank",
            type=int,
            default=16,
            show_default=True,
            help="Rank of the LoRA adapters (--train lora or qlora).",
        ),
        click.option(
            "--checkpoint-every",
            type=int,
            default=10,
            show_default=True,
            help="Steps between checkpoints (in the cache, keyed by the settings); an interrupted heal rerun with the same settings resumes.",
        ),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


HEAL_KEYS = ("heal_train", "heal_lr", "heal_batch", "heal_seq_len", "lora_rank", "checkpoint_every")


def _heal_config(steps, opts: dict, calibration=None, seed=0, heldout_chunks=2, model_spec: str | None = None):
    """The heal settings from the command line; heal.distill.heal_config applies the precedence
    (an option given here, else the recipe's ``heal:`` default, else the option's default)."""
    from click.core import ParameterSource

    from .heal.distill import heal_config

    h = {key: opts.pop(key) for key in HEAL_KEYS}  # the heal options leave opts (the rest are model options)
    ctx = click.get_current_context(silent=True)
    names = {
        "steps": ("steps", "heal_steps"),
        "train": ("heal_train",),
        "lr": ("heal_lr",),
        "lora_rank": ("lora_rank",),
    }
    given = {
        key
        for key, params in names.items()
        if ctx is None or any(ctx.get_parameter_source(n) not in (None, ParameterSource.DEFAULT) for n in params)
    }
    return heal_config(
        dict(
            steps=steps,
            train=h["heal_train"],
            lr=h["heal_lr"],
            batch=h["heal_batch"],
            seq_len=h["heal_seq_len"],
            seed=seed,
            lora_rank=h["lora_rank"],
            checkpoint_every=h["checkpoint_every"],
            calibration=calibration,
            heldout_chunks=heldout_chunks,
        ),
        given,
        model_spec,
    )


@cli.command()
@model_options
@click.option(
    "--merge-layers",
    "-k",
    "k",
    type=int,
    required=True,
    help="How many layers to merge away (K): the result has L - K layers. With sleb-attn, K counts removal "
    "units (an attention sub-block or a whole layer).",
)
@click.option(
    "--method",
    type=click.Choice(ALL_METHODS),
    default="auto",
    show_default=True,
    help=f"auto: per K the least calibration-loss plan among {', '.join(AUTO_POOL)}. "
    + " ".join(f"{r.name}: {r.summary}." for r in TABLE),
)
@click.option(
    "--alpha",
    default="calibrated",
    show_default=True,
    help="Fusion weight rule: paper (alpha = NMI of the pair on the lower layer), calibrated (grid search "
    "on calibration loss), or a number in [0, 1].",
)
@click.option(
    "--loss-samples",
    type=int,
    default=4,
    show_default=True,
    help="Calibration sequences used to score candidate merges.",
)
@click.option(
    "--heldout-chunks",
    type=int,
    default=4,
    show_default=True,
    help="512-token held-out chunks for the quality after each step (0: skip).",
)
@click.option("--no-cache", is_flag=True, help="Recompute the trajectory even if it is cached.")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    required=True,
    help="Folder for the merged Hugging Face model and merge_log.json.",
)
@click.option(
    "--heal-steps",
    type=int,
    default=0,
    show_default=True,
    help="Heal the merged model by this many distillation steps from the original (see `mka-edge heal --help`); "
    "default: the recipe's heal.steps, else 0 (no healing).",
)
@heal_options
@handle_errors
def merge(
    k,
    method,
    alpha,
    loss_samples,
    heldout_chunks,
    no_cache,
    out,
    heal_steps,
    **opts,
) -> None:
    """Merge K layers away and write a Hugging Face model directory that transformers loads
    (healed by a short distillation when --heal-steps is given)."""
    from .merge_log import MergeStep
    from .merging import check_out
    from .mka.methods import check_alpha
    from .produce import produce

    alpha = check_alpha(alpha)
    if k < 1:
        raise UserError(f"--merge-layers must be at least 1 (got {k})")
    if heal_steps < 0:
        raise UserError(f"--heal-steps must be 0 or more (got {heal_steps})")
    cfg = _heal_config(heal_steps, opts, opts.get("calibration"), opts.get("seed") or 0, model_spec=opts.get("model"))
    cfg = cfg if cfg.steps else None
    out = Path(out)
    check_out(out)
    ctx = _context(loss_samples=loss_samples, **opts)
    made = produce(
        ctx,
        k,
        method,
        alpha,
        out,
        cfg,
        heldout=heldout_chunks,
        use_cache=not no_cache,
        log=lambda m: click.echo(m, err=True),
    )
    log = made.merge_log
    if made.heal:
        b, a = made.heal["heldout_before"], made.heal["heldout_after"]
        click.echo(
            f"healed {cfg.steps} steps ({cfg.train}): held-out KL {b['kl']:.4f} -> {a['kl']:.4f}, "
            f"perplexity {b['ppl']:.2f} -> {a['ppl']:.2f}"
        )
    click.echo(f"{log['layers_before']} -> {log['layers_after']} layers with {method} (alpha {alpha})")
    for st in log["steps"]:
        what = MergeStep.from_json(st).describe()
        q = st.get("heldout") or {}
        extra = f"  held-out KL {q['kl']:.4f}  ppl {q['ppl']:.2f}  top-1 {q['top1']:.3f}" if q else ""
        click.echo(f"  K={st['k']:>2} [{st['method']}] {what:34} calib KL {st['calib_kl']:.4f}{extra}")
    click.echo(f"wrote {out} (merge_log.json inside)")


@cli.command()
@click.option(
    "--model", "model", required=True, metavar="DIR", help="The merged model folder (from `mka-edge merge`) to heal."
)
@click.option(
    "--reference",
    default=None,
    metavar="REF",
    help="The model to distil from (recipe, folder, .gguf, hub id). Default: the source in the folder's merge_log.json.",
)
@click.option(
    "--steps",
    type=int,
    required=True,
    help="Optimizer steps (each on --heal-batch calibration windows; every window is used once).",
)
@heal_options
@click.option(
    "--calibration",
    type=click.Path(),
    default=None,
    help="Training text (.txt or .jsonl with 'text'). Default: the packaged Wikipedia calibration articles (never the held-out ones).",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed for the order and choice of calibration windows."
)
@click.option(
    "--heldout-chunks",
    type=int,
    default=2,
    show_default=True,
    help="512-token held-out chunks for the quality before and after.",
)
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu or cuda.")
@max_memory_option
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    required=True,
    help="Folder for the healed Hugging Face model (merge_log.json and heal_log.json inside).",
)
@handle_errors
def heal(
    model,
    reference,
    steps,
    calibration,
    seed,
    heldout_chunks,
    device,
    out,
    **opts,
) -> None:
    """Heal a merged model: a short distillation from the original model's next-token
    distributions (loss KL(reference || model) on calibration text). Prints the running loss,
    checkpoints as it goes, and reports held-out KL and perplexity before and after."""
    from .heal.distill import heal as run

    _check_device_caps(device)
    cfg = _heal_config(steps, opts, calibration, seed, heldout_chunks, model_spec=model)
    rec = run(model, Path(out), cfg, reference=reference, device=device, log=lambda m: click.echo(m, err=True))
    b, a = rec["heldout_before"], rec["heldout_after"]
    click.echo(
        f"healed {model} -> {out}: {rec['trained'][0]}, {rec['steps_run_here']} steps in {rec['seconds']:.0f} s "
        f"({rec['seconds_per_step']:.2f} s/step)"
    )
    click.echo(
        f"held-out KL {b['kl']:.4f} -> {a['kl']:.4f}; perplexity {b['ppl']:.2f} -> {a['ppl']:.2f} "
        f"(reference {a['ref_ppl']:.2f}); top-1 {100 * b['top1']:.1f}% -> {100 * a['top1']:.1f}%"
    )


@cli.command(name="eval")
@click.option(
    "--model", "model", default=None, metavar="M", help="Model to measure (recipe, directory, .gguf, hub id)."
)
@click.option(
    "--reference",
    default=None,
    metavar="R",
    help="Reference model; default: the source named in the model's merge_log.json, else the model itself.",
)
@click.option(
    "--heldout-chunks",
    type=int,
    default=8,
    show_default=True,
    help="512-token held-out chunks for KL, perplexity and top-1.",
)
@click.option(
    "--mmlu-per-subject",
    type=int,
    default=2,
    show_default=True,
    help="MMLU questions per subject (57 subjects; 0 skips MMLU).",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@max_memory_option
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the figures as JSON here.")
@handle_errors
def eval_cmd(model, reference, heldout_chunks, mmlu_per_subject, device, out) -> None:
    """Quality of a model against its reference: mean KL(ref || model) in nats on held-out text,
    perplexity change, top-1 agreement, and MMLU (letter and cloze) beside chance."""
    from .evaluation import evaluate

    _check_device_caps(device)
    res = evaluate(model, reference, heldout_chunks, mmlu_per_subject, device)
    q = res["heldout"]
    click.echo(f"model {res['model']} vs reference {res['reference']}")
    click.echo(
        f"  held-out ({q['tokens']} positions): KL {q['kl']:.4f} nats  ppl {q['ppl']:.2f} (ref {q['ref_ppl']:.2f}, "
        f"{q['ppl_change_pct']:+.1f}%)  top-1 {100 * q['top1']:.1f}%"
    )
    for name in ("mmlu", "mmlu_cloze"):
        if name in res:
            m = res[name]
            click.echo(
                f"  {name:10} {100 * m['accuracy']:.1f}% [{100 * m['ci95'][0]:.1f}, {100 * m['ci95'][1]:.1f}] "
                f"on {m['n']} questions (chance 25%)"
            )
    if out:
        from .cache import atomic_write_text

        atomic_write_text(Path(out), json.dumps(res, indent=2))


def _quant_arg(ctx, param, value):
    if value and value.lower() == "help":
        from .exporters.onnx import quant_help as onnx_help
        from .exporters.quant_types import quant_help

        click.echo(quant_help() + "\n\n" + onnx_help())
        ctx.exit(0)
    return value


@cli.command()
@click.option(
    "--format",
    "fmt",
    type=click.Choice(list(TARGETS)),
    default="gguf",
    show_default=True,
    help="Artifact format: gguf (llama.cpp, llama-cpp-python, Ollama, LM Studio) or onnx (onnxruntime and "
    "onnxruntime-genai; a folder with model.onnx, its weights, tokenizer and genai_config.json).",
)
@click.option(
    "--quant",
    default=None,
    callback=_quant_arg,
    is_eager=True,
    help="Quantization type. GGUF: F32, F16, BF16, Q8_0, Q6_K, Q5_K_M, Q4_K_M (default), Q4_0, IQ4_XS, ... "
    "(everything but F32/F16 made by llama.cpp's own quantizer). ONNX: fp32, fp16, int8, int4, "
    "int4-mixed (default; onnxruntime's MatMulNBits quantizer). `--quant help` lists all.",
)
@click.option(
    "--model",
    "model",
    default=None,
    metavar="M",
    help="A merged model folder (from `mka-edge merge`), recipe name, Hugging Face directory, .gguf or hub id. Default: the embedded SmolLM2-135M.",
)
@click.option(
    "--out",
    type=click.Path(),
    required=True,
    help="GGUF: the .gguf file to write. ONNX: the folder to write. Written under a temporary name and renamed at the end.",
)
@click.option(
    "--pre-tokenizer",
    default=None,
    metavar="NAME",
    help="GGUF only: llama.cpp pre-tokenizer name, only needed when llama.cpp's table does not recognise a byte-level BPE tokenizer.",
)
@click.option(
    "--threads", type=int, default=None, help="GGUF only: threads for llama.cpp's quantizer (default: all cores)."
)
@click.option(
    "--calibration",
    type=click.Path(),
    default=None,
    help="GGUF only: text for the importance matrix (--imatrix, and the IQ1/IQ2/IQ3_XXS/Q2_K_S types that "
    "need one) (default: packaged Wikipedia articles).",
)
@click.option(
    "--imatrix",
    is_flag=True,
    help="GGUF only: quantize with an importance matrix computed on the calibration text (cached per model "
    "and text); the file records it in quantize.imatrix.* keys, as llama-quantize does. Types that need "
    "one always get one; F16/BF16/Q8_0 ignore it.",
)
@click.option(
    "--intermediate",
    type=click.Choice(["auto", "F32", "BF16", "F16"], case_sensitive=False),
    default="auto",
    show_default=True,
    help="GGUF only: the float file handed to llama.cpp's quantizer. auto: the weights' own 16-bit type; "
    "for 32-bit weights F32 up to 2 GiB of F32 data, else BF16 (F32 doubles the scratch space: 32 GB at 8B).",
)
@click.option(
    "--context",
    type=int,
    default=None,
    help="ONNX only: the maximum sequence length onnxruntime-genai allocates its KV cache for (default: the model's).",
)
@click.option(
    "--single-file",
    is_flag=True,
    help="ONNX only: embed the weights in model.onnx instead of model.onnx.data (refused above the 2 GB protobuf limit).",
)
@max_memory_option
@handle_errors
def export(
    fmt, quant, model, out, pre_tokenizer, threads, calibration, imatrix, intermediate, context, single_file
) -> None:
    """Write a model (merged or not) as a quantized artifact for an edge runtime."""
    target = get_target(fmt)
    given = {
        "pre_tokenizer": pre_tokenizer,
        "threads": threads,
        "calibration": calibration,
        "imatrix": imatrix,
        "intermediate": None if intermediate.lower() == "auto" else intermediate.upper(),
        "context": context,
        "single_file": single_file,
    }
    wrong = [name for name, v in given.items() if v and name not in target.export_options]
    if wrong:
        owners = {name: t.name.upper() for t in TARGETS.values() for name in t.export_options}
        raise UserError(
            f"{', '.join('--' + w.replace('_', '-') for w in wrong)} "
            f"appl{'y' if len(wrong) > 1 else 'ies'} to {owners[wrong[0]]} only, not --format {fmt}"
        )
    options = {name: given[name] for name in target.export_options if given[name]}
    s = target.export_spec(model, Path(out), quant or target.default_export_quant, options)
    click.echo(target.describe_export(s))


@cli.command()
@click.argument("artifact", type=click.Path())
@click.option(
    "--reference",
    default=None,
    metavar="REF",
    help="The model to compare against (recipe, folder, .gguf, hub id). Default: the source recorded in the artifact.",
)
@click.option(
    "--profile",
    default=None,
    metavar="P",
    help="Device profile (name or .yaml): its thresholds, threads, context and KV type apply unless given here.",
)
@click.option(
    "--threads",
    type=int,
    default=None,
    help="Runtime threads, llama.cpp or onnxruntime (default: the profile's, else all cores).",
)
@click.option(
    "--context", type=int, default=None, help="Context length to allocate (default: the profile's, else 2048)."
)
@click.option(
    "--kv-type",
    default=None,
    metavar="TYPE",
    callback=lambda ctx, param, v: _check_kv_type(v),
    help="GGUF only: llama.cpp KV cache type for K and V: f16, f32, q8_0 or q4_0, or K/V apart as "
    "K/V (e.g. q8_0/f16) (default: the profile's, else f16). A quantized V cache runs with flash "
    "attention. ONNX keeps the cache in the model's I/O type.",
)
@click.option(
    "--flash-attn",
    type=click.Choice(["auto", "on", "off"]),
    default=None,
    help="GGUF only: llama.cpp's attention path. auto (default): on exactly when the V cache is quantized "
    "(llama.cpp needs it there); a profile with flash_attention: false turns it off.",
)
@click.option(
    "--max-kld", type=float, default=None, help="Fail when the mean KL to the reference (nats) is above this."
)
@click.option(
    "--min-tokens-per-s", type=float, default=None, help="Fail when generation tokens/s on this host is below this."
)
@click.option(
    "--repeats", type=int, default=3, show_default=True, help="Latency runs; median, min and max are reported."
)
@click.option(
    "--chunks", type=int, default=4, show_default=True, help="512-token held-out chunks for KL, perplexity and top-1."
)
@click.option(
    "--mmlu-per-subject",
    type=int,
    default=1,
    show_default=True,
    help="MMLU questions per subject (57 subjects; 0 skips).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder for validation.json and validation.md (default: ARTIFACT-validation beside the artifact).",
)
@max_memory_option
@handle_errors
def validate(
    artifact,
    reference,
    profile,
    threads,
    context,
    kv_type,
    flash_attn,
    max_kld,
    min_tokens_per_s,
    repeats,
    chunks,
    mmlu_per_subject,
    out,
) -> None:
    """Run ARTIFACT (a .gguf file, or an ONNX export folder) in its real runtime (each measurement in a child process) and check it: latency
    (prompt and generation tokens/s, time to first token, load time, peak RSS), accuracy against
    the reference (mean KL, perplexity change, top-1, MMLU). Exit code 1 when a threshold is missed."""
    from .profiles import load_profile
    from .validate.checks import Thresholds
    from .validate.core import validate_artifact

    if repeats < 1 or chunks < 1:
        raise UserError("--repeats and --chunks must be at least 1")
    prof = load_profile(profile) if profile else None
    r = validate_artifact(
        artifact,
        reference,
        profile=prof,
        threads=threads,
        context=context,
        out=out,
        thresholds=Thresholds(max_kld, min_tokens_per_s),
        repeats=repeats,
        chunks=chunks,
        mmlu_per_subject=mmlu_per_subject,
        kv_type=kv_type,
        flash_attn=None if flash_attn == "auto" else flash_attn,
    )
    click.echo(Path(r["out"], "validation.md").read_text())
    click.echo(f"wrote {r['out']}/validation.json")
    if not r["passed"]:
        failed = "; ".join(
            f"{c['check']}: {c['value']:.4g} vs {c['limit']:.4g}" for c in r["checks"] if not c["passed"]
        )
        click.echo(f"error: validation failed ({failed})", err=True)
        sys.exit(1)


@cli.command()
@handle_errors
def profiles() -> None:
    """List the device profiles shipped with mka-edge (profiles/*.yaml)."""
    from .profiles import known_profiles, load_profile

    click.echo(
        f"{'profile':22} {'runtime':12} {'memory':>8} {'budget':>8} {'GB/s':>7} {'ctx':>6} {'tok/s':>6} {'max KL':>7}"
    )
    for name in known_profiles():
        p = load_profile(name)
        click.echo(
            f"{p.name:22} {p.runtime:12} {p.memory_mb:>6}MB {p.budget_mb:>6}MB {p.bandwidth_gbps:>7.1f} "
            f"{p.context_length:>6} {p.min_tokens_per_s:>6g} {p.max_quality_loss:>7g}"
        )


LEVER_OPTIONS = ("kv_type", "flash_attn", "attention_removal", "imatrix", "measure_all")


def _levers(opts: dict) -> dict:
    """The solver's lever options, taken out of a command's options (the rest are merge options)."""
    return {k: opts.pop(k) for k in LEVER_OPTIONS if k in opts}


def plan_options(f):
    """The options plan and build share (what the plan is for: device, budget, candidates), declared once."""
    opts = [
        click.option(
            "--profile",
            required=True,
            metavar="P",
            help="Device profile: a name from `mka-edge profiles` or a .yaml file.",
        ),
        model_options,
        click.option(
            "--budget-mb",
            type=float,
            default=None,
            help="Memory budget in MB (default: the profile's memory minus its reserve).",
        ),
        click.option(
            "--context", type=int, default=None, help="Context length the KV cache must hold (default: the profile's)."
        ),
        click.option(
            "--max-quality-loss",
            type=float,
            default=None,
            help="Quality bar: mean KL to the reference in nats (default: the profile's).",
        ),
        click.option(
            "--method",
            default="sleb-fast",
            show_default=True,
            help=f"Merge method whose quality curve the plan uses, one of {', '.join(ALL_METHODS)} (see `mka-edge merge "
            "--help`). sleb-fast is the default here: on SmolLM2 it took sleb's layers at K = 3, 6 and 9 in "
            "4.5x less time than sleb, and sleb was never beaten on held-out quality by more than 2%.",
        ),
        click.option(
            "--max-merge",
            type=int,
            default=None,
            help="Largest K considered (default: a third of the layers, at most 8).",
        ),
        click.option(
            "--quants",
            default=None,
            help="Comma-separated quant types to consider (default: F16,Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q4_0,Q3_K_M,Q2_K,IQ4_XS,IQ3_M; "
            "onnxruntime profiles: fp32,int8,int4-mixed,int4).",
        ),
        click.option(
            "--kv-type",
            default=None,
            metavar="TYPE",
            callback=lambda ctx, param, v: _check_kv_type(v),
            help="llama.cpp KV cache: auto (the plan chooses among f16, q8_0 and q4_0 caches, with and without "
            "flash attention, by measured KL, memory and speed) or a type pinned for K and V (f16 forbids "
            "quantized caches). Default: the profile's kv_cache_type.",
        ),
        click.option(
            "--flash-attn",
            type=click.Choice(["auto", "on", "off"]),
            default="auto",
            show_default=True,
            help="llama.cpp's attention path: auto lets the plan choose (where the profile allows flash "
            "attention), on requires it, off forbids it (and with it quantized V caches).",
        ),
        click.option(
            "--attention-removal/--no-attention-removal",
            default=True,
            show_default=True,
            help="llama.cpp targets, llama architectures: also consider removing attention sub-blocks (the "
            "sleb-attn curve; such a model runs as llama.cpp's deci architecture). onnxruntime-genai has no "
            "per-layer configuration, so ONNX plans never remove attention alone.",
        ),
        click.option(
            "--imatrix/--no-imatrix",
            default=True,
            show_default=True,
            help="Consider importance-matrix quantization (computed once per model on the calibration set, "
            "cached): per type the plan takes whichever of plain and imatrix measured lower KL, and the "
            "imatrix-only types (IQ4_XS, IQ3_M) join the candidates.",
        ),
        click.option(
            "--measure-all",
            is_flag=True,
            help="Quantize and measure every quant type and cache mode on the model, even those the plan can "
            "show cannot change its choice (too large at any merge, or bounded below the best measured plan by "
            "the precision order); for benchmarks. The plan is the same; only slower.",
        ),
        click.option(
            "--quality-prior",
            is_flag=True,
            help="Use llama.cpp's published Llama-3-8B quant costs instead of measuring each type on this model "
            "(automatic above 3B parameters, where measuring costs more than the build).",
        ),
        click.option(
            "--heal-curve-points",
            type=int,
            default=4,
            show_default=True,
            help="With healing, how many K values the plan heals to predict healed quality (evenly spaced up to "
            "--max-merge; the K between are interpolated); 0: heal at every K.",
        ),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


@cli.command()
@plan_options
@click.option(
    "--out", type=click.Path(file_okay=False), default=None, help="Folder for plan.json (default: print only)."
)
@click.option(
    "--heal-steps",
    type=int,
    default=0,
    show_default=True,
    help="Predict quality after healing by this many steps (heals at --heal-curve-points values of K, cached); "
    "0: the recipe's heal.steps, else the profile's heal_steps, else none.",
)
@heal_options
@handle_errors
def plan(
    profile,
    budget_mb,
    context,
    max_quality_loss,
    method,
    max_merge,
    quants,
    quality_prior,
    out,
    heal_steps,
    heal_curve_points,
    **opts,
) -> None:
    """Pick the merge ratio and quant type that fit a device, and say why; exports nothing.

    Computes (or reads from cache) the merge-quality curve and each quant type's cost on this
    model, predicts memory, device tokens/s and quality loss for every (K, type) pair, and prints
    the Pareto table and the choice."""
    from .exporters.paths import check_creatable
    from .planning import plan_from_settings, plan_table, resolve_settings, write_plan

    if out:
        check_creatable(Path(out))
    cfg = _heal_config(heal_steps, opts, opts.get("calibration"), opts.get("seed") or 0, model_spec=opts.get("model"))
    levers = _levers(opts)
    s = resolve_settings(
        profile,
        opts.pop("model"),
        **levers,
        budget_mb=budget_mb,
        context=context,
        max_quality_loss=max_quality_loss,
        method=method,
        k_max=max_merge,
        quants=quants.split(",") if quants else None,
        merge_opts=opts,
        quality_prior=quality_prior,
        heal=cfg,
        heal_points=heal_curve_points,
    )
    p, _ = plan_from_settings(s, log=lambda m: click.echo(m, err=True))
    click.echo(plan_table(p))
    if out:
        click.echo(f"wrote {write_plan(p, Path(out))}")


@cli.command()
@plan_options
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    required=True,
    help="Package folder: artifact, manifest.json, report.md, plots, model card, run commands.",
)
@click.option("--force", is_flag=True, help="Replace --out if it exists and is not empty.")
@click.option(
    "--build-anyway",
    is_flag=True,
    help="Build even a plan predicted to miss the quality bar (without it such a build is refused as soon "
    "as the plan shows it, before any merge or export, with what would make it pass).",
)
@click.option(
    "--plan",
    "plan_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Execute this saved plan (plan.json from `mka-edge plan --out`, or a build's) instead of planning: "
    "refused if it was made for another model, profile or mka-edge version. The options that decide a "
    "plan (budget, context, quality bar, method, max merge, quants, healing) then come from the plan.",
)
@click.option(
    "--max-tries",
    type=int,
    default=3,
    show_default=True,
    help="Plans tried, best first, when an artifact misses the measured quality bar.",
)
@click.option(
    "--mmlu-per-subject",
    type=int,
    default=1,
    show_default=True,
    help="MMLU questions per subject in the validation (0 skips).",
)
@click.option(
    "--heal-steps",
    type=int,
    default=0,
    show_default=True,
    help="Heal every merged model by this many distillation steps before export (0: the recipe's heal.steps, "
    "else the profile's heal_steps, else none). The plan then predicts quality after healing, which costs --heal-curve-points heals (cached).",
)
@heal_options
@handle_errors
def build(
    profile,
    out,
    force,
    build_anyway,
    plan_file,
    budget_mb,
    context,
    max_quality_loss,
    method,
    max_merge,
    quants,
    max_tries,
    mmlu_per_subject,
    heal_steps,
    heal_curve_points,
    quality_prior,
    **opts,
) -> None:
    """Plan, merge, (heal,) export, validate and package a model for a device, in one go
    (or execute a plan saved by `mka-edge plan --out` with --plan)."""
    from click.core import ParameterSource

    from .build import build as run

    if max_tries < 1:
        raise UserError("--max-tries must be at least 1")
    if heal_steps < 0:
        raise UserError(f"--heal-steps must be 0 or more (got {heal_steps})")
    if plan_file:
        ctx = click.get_current_context()
        deciding = (
            "budget_mb",
            "context",
            "max_quality_loss",
            "method",
            "max_merge",
            "quants",
            "heal_steps",
            "heal_curve_points",
            "quality_prior",
            "heal_train",
            "heal_lr",
            "heal_batch",
            "heal_seq_len",
            "lora_rank",
            "calibration",
            "samples",
            "seq_len",
            "positions",
            "repeats",
            "seed",
            "dtype",
            *LEVER_OPTIONS,
        )
        given = [n for n in deciding if ctx.get_parameter_source(n) not in (None, ParameterSource.DEFAULT)]
        if given:
            raise UserError(
                f"--plan executes a saved plan, so {', '.join('--' + n.replace('_', '-') for n in given)} "
                "cannot change it; drop them, or plan again with them"
            )
        _levers(opts)
        m = run(
            profile,
            opts.pop("model"),
            Path(out),
            force=force,
            build_anyway=build_anyway,
            plan_file=plan_file,
            max_tries=max_tries,
            mmlu_per_subject=mmlu_per_subject,
            log=click.echo,
        )
    else:
        cfg = _heal_config(
            heal_steps, opts, opts.get("calibration"), opts.get("seed") or 0, model_spec=opts.get("model")
        )
        levers = _levers(opts)
        m = run(
            profile,
            opts.pop("model"),
            Path(out),
            force=force,
            build_anyway=build_anyway,
            **levers,
            budget_mb=budget_mb,
            context=context,
            max_quality_loss=max_quality_loss,
            method=method,
            k_max=max_merge,
            quants=quants.split(",") if quants else None,
            max_tries=max_tries,
            mmlu_per_subject=mmlu_per_subject,
            merge_opts=opts,
            heal=cfg,
            heal_points=heal_curve_points,
            quality_prior=quality_prior,
            log=click.echo,
        )
    click.echo(
        f"built {m['out']}/{m['artifact']}: K={m['plan']['k']}, {m['plan']['quant']}, KV cache {m['plan'].get('cache', 'f16/f16')}; "
        f"measured KL {m['host_figures']['accuracy']['kl']:.3f}; predicted device memory "
        f"{m['device_predictions']['memory_mb']:.0f} MB; see {m['out']}/report.md"
    )


def main() -> None:
    """The entry point: a usage error (unknown option, a value not among the choices, a missing
    required option) is one line naming what is wrong, like every other error, exit code 2."""
    try:
        rc = cli.main(standalone_mode=False)
    except click.exceptions.UsageError as exc:
        where = f"mka-edge {exc.ctx.info_name} --help" if exc.ctx and exc.ctx.parent else "mka-edge --help"
        click.echo(f"error: {exc.format_message().rstrip('.')}; see `{where}`", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("error: interrupted; nothing was written", err=True)
        sys.exit(130)
    except click.exceptions.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
