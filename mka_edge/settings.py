"""Settings as typed records, one per concern; the command line is generated from them.

Each field carries its type and default (the dataclass's), its help, its flags and where it may
come from (``sources``: the command line, a recipe, a profile). ``options(Record, ...)`` turns
the fields into click options, as mergekit's ``MergeOptions`` makes its own; ``parse`` turns what
click read back into the records and notes which fields the user gave (``given``), so that the
precedence rule (given, else recipe, else profile, else default) has an explicit "not given" and
no caller needs click. Why records and not keyword dicts: a setting is declared once, its help
is beside it, ``--plan``'s "these options cannot change a saved plan" list is a query over the
fields (``decides_plan``), and what reaches the library or plan.json is typed.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import click

from .errors import UserError
from .heal_modes import MODES as HEAL_MODES
from .mka.method_table import ALL_METHODS, AUTO_POOL, TABLE
from .records import is_a
from .targets import TARGETS


@dataclass(frozen=True)
class Spec:
    """How one field appears on the command line."""

    flags: tuple[str, ...]
    help: str
    type: Any = None  # a click type, or a Python type
    sources: tuple[str, ...] = ("cli",)  # where the value may come from: cli, recipe, profile
    is_flag: bool = False  # --x sets True
    secondary: str | None = None  # --x/--no-x
    metavar: str | None = None
    required: bool = False
    decides_plan: bool = False  # part of what a plan is made from (`build --plan` refuses it)
    callback: Callable | None = None
    eager: bool = False
    expose: bool = True  # False: the callback keeps it (--max-memory), the record does not

    @property
    def dest(self) -> str:
        """click's parameter name: the first long flag, so that fields of two records never clash."""
        return next(f for f in self.flags if f.startswith("--")).removeprefix("--").replace("-", "_")


def setting(default: Any, *flags: str, help: str, **kw) -> Any:
    """A record field with its command-line spec."""
    return field(default=default, metadata={"spec": Spec(flags, help, **kw)})


def spec_of(f: dataclasses.Field, override: dict | None = None) -> Spec:
    s = f.metadata["spec"]
    return dataclasses.replace(s, **override) if override else s


# -- checks run as click reads a value (before anything loads) ----------------------------------


def _check_kv_type(ctx, param, value):
    """A KV cache type or K/V label, checked against kv_cache's table."""
    if value is None or value == "auto":
        return value
    from .kv_cache import CacheMode

    try:
        CacheMode.parse(value)
    except UserError as exc:
        raise click.BadParameter(str(exc)) from None
    return value.lower()


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


def _quant_arg(ctx, param, value):
    """`--quant help` lists every type and exits."""
    if value and value.lower() == "help":
        from .exporters.onnx import quant_help as onnx_help
        from .exporters.quant_types import quant_help

        click.echo(quant_help() + "\n\n" + onnx_help())
        ctx.exit(0)
    return value


MAX_MEMORY_HELP = (
    'Cap the memory the weights may take on each device, e.g. "cuda:0=20GiB,cpu=16GiB" (GPUs as cuda or '
    "cuda:N; sizes in B, KB, MB, GB, TB or KiB, MiB, GiB, TiB): Hugging Face accelerate fills the GPUs named, "
    "then the CPU, and leaves the rest on disk (in the mka-edge cache), bringing each layer's weights in for "
    "its forward pass, so a model larger than the GPU or the RAM still runs (slower). Every device named must "
    "hold one layer. Default: no cap, the whole model on --device."
)


def max_memory_setting() -> Any:
    """--max-memory: parsed and set for the process as click reads it, not kept in a record."""
    return setting(
        None, "--max-memory", metavar="DEV=SIZE,...", callback=_max_memory_arg, expose=False, help=MAX_MEMORY_HELP
    )


MODEL_HELP = (
    "Recipe name (see `mka-edge recipes`), recipe .yaml, Hugging Face directory, .gguf file or hub id. "
    "Default: the embedded SmolLM2-135M."
)


@dataclass(frozen=True)
class Record:
    """Base of the settings records: ``given`` names the fields the user set on the command line."""

    given: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    @classmethod
    def specs(cls) -> list[tuple[dataclasses.Field, Spec]]:
        return [(f, f.metadata["spec"]) for f in fields(cls) if "spec" in f.metadata]

    def values(self) -> dict[str, Any]:
        """The fields as keyword arguments (``given`` and the hidden ones left out)."""
        return {f.name: getattr(self, f.name) for f, s in self.specs() if s.expose}


# -- the records --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSettings(Record):
    """The model and its calibration text: what every command that loads a model needs."""

    model: str | None = setting(None, "--model", metavar="M", help=MODEL_HELP)
    device: str = setting("auto", "--device", help="Where tensor work runs: auto, cpu or cuda.")
    dtype: str = setting(
        "auto",
        "--dtype",
        decides_plan=True,
        help="Weights dtype: auto (float32 on CPU, or the checkpoint's own 16-bit type where a float32 copy "
        "would not fit this host's RAM; bfloat16 on CUDA), float32, bfloat16, float16.",
    )
    calibration: str | None = setting(
        None,
        "--calibration",
        type=click.Path(),
        decides_plan=True,
        help="Your calibration text: .txt (documents split by two blank lines) or .jsonl with a 'text' field. "
        "Default: packaged Wikipedia articles.",
    )
    samples: int | None = setting(
        None,
        "--samples",
        type=int,
        sources=("cli", "recipe"),
        decides_plan=True,
        help="Calibration sequences (default from the recipe, else 32).",
    )
    seq_len: int | None = setting(
        None,
        "--seq-len",
        type=int,
        sources=("cli", "recipe"),
        decides_plan=True,
        help="Tokens per calibration sequence (default from the recipe, else 256).",
    )
    positions: int | None = setting(
        None,
        "--positions",
        type=int,
        sources=("cli", "recipe"),
        decides_plan=True,
        help="Token vectors sampled per layer for the diffusion maps (default 512; position 0 is never sampled).",
    )
    repeats: int = setting(
        8,
        "--repeats",
        type=int,
        decides_plan=True,
        help="Independent position subsamples whose NMI matrices are averaged (steadier ranking).",
    )
    batch_size: int = setting(
        8,
        "--batch-size",
        type=int,
        decides_plan=True,  # part of the trajectory cache's key
        help="Calibration sequences per forward pass (less memory when smaller).",
    )
    loss_samples: int = setting(
        4, "--loss-samples", type=int, decides_plan=True, help="Calibration sequences used to score candidate merges."
    )
    seed: int = setting(
        0, "--seed", type=int, decides_plan=True, help="Seed for window and position sampling and k-means."
    )
    trust_remote_code: bool = setting(
        False, "--trust-remote-code", is_flag=True, help="Allow model code from the hub to run (off unless you ask)."
    )
    max_memory: Any = max_memory_setting()

    def check(self) -> ModelSettings:
        """Counts that must be positive, refused in one line before anything loads."""
        for name in ("samples", "seq_len", "positions", "repeats", "loss_samples", "batch_size"):
            v = getattr(self, name)
            if v is not None and v < 1:
                flag = next(s for f, s in self.specs() if f.name == name).flags[0]
                raise UserError(f"{flag} must be at least 1 (got {v})")
        return self

    def load_options(self) -> dict[str, Any]:
        """What loads the model and its calibration batch (mka.context.build_context), without the
        model's name: the part of a plan's settings that plan.json records (as ``merge_opts``)."""
        return {k: v for k, v in self.values().items() if k != "model"}

    @classmethod
    def from_load_options(cls, values: dict | None, model: str | None = None) -> ModelSettings:
        """Back from ``load_options`` (plan.json is untrusted input: an unknown key or a wrong type is
        refused in one line)."""
        if values is not None and not isinstance(values, dict):
            raise UserError(f"model settings must be a mapping (got {type(values).__name__}); plan again")
        values = {k: str(v) if isinstance(v, os.PathLike) else v for k, v in (values or {}).items()}
        known = {f.name: f for f, s in cls.specs() if s.expose and f.name != "model"}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise UserError(f"unknown model setting(s) {', '.join(unknown)}; plan again with this mka-edge")
        for name, v in values.items():
            spec = known[name].metadata["spec"]
            kind = bool if spec.is_flag else int if spec.type is int else str
            if v is not None and not is_a(v, kind):
                raise UserError(f"model setting {name} = {v!r} has the wrong type; plan again")
        return cls(model=model, given=frozenset(values), **values).check()


@dataclass(frozen=True)
class HealSettings(Record):
    """A heal: steps and how it trains. Sources: the command line, else the recipe's ``heal:``
    section (steps, train, lr, lora_rank), else the profile's ``heal_steps`` (plans and builds)."""

    steps: int = setting(
        0,
        "--heal-steps",
        type=int,
        sources=("cli", "recipe", "profile"),
        decides_plan=True,
        help="Heal by this many distillation steps from the original (see `mka-edge heal --help`); "
        "default: the recipe's heal.steps, else the profile's heal_steps (plan, build), else 0 (no healing). "
        "A plan then predicts quality after healing, which costs --heal-curve-points heals (cached).",
    )
    train: str = setting(
        "all",
        "--train",
        type=click.Choice(list(HEAL_MODES)),
        sources=("cli", "recipe"),
        decides_plan=True,
        help="What the heal trains: all parameters; only the layers the merge changed and their neighbours; "
        "LoRA adapters on every block's linear layers, merged back at the end; or qlora: the same adapters "
        "over a 4-bit NF4 copy of those layers (bitsandbytes) against the teacher's cached top-256 "
        "log-probs, merged into the original weights (what fits an 8B heal on a 24 GB GPU). A recipe's heal: "
        "section may set another default (and steps, lr, lora_rank); what you pass here wins.",
    )
    lr: float = setting(
        5e-5, "--lr", type=float, sources=("cli", "recipe"), decides_plan=True, help="AdamW learning rate (constant)."
    )
    batch: int = setting(2, "--heal-batch", type=int, decides_plan=True, help="Calibration windows per step.")
    seq_len: int = setting(256, "--heal-seq-len", type=int, decides_plan=True, help="Tokens per calibration window.")
    lora_rank: int = setting(
        16,
        "--lora-rank",
        type=int,
        sources=("cli", "recipe"),
        decides_plan=True,
        help="Rank of the LoRA adapters (--train lora or qlora).",
    )
    checkpoint_every: int = setting(
        10,
        "--checkpoint-every",
        type=int,
        help="Steps between checkpoints (in the cache, keyed by the settings); an interrupted heal rerun with "
        "the same settings resumes.",
    )

    def config(
        self, model_spec: str | None, calibration=None, seed: int = 0, heldout_chunks: int = 2, flag="--heal-steps"
    ):
        """heal.distill's HealConfig, the recipe's defaults applied to what was not given. ``flag``:
        the steps option's name in this command (`heal` calls it --steps)."""
        from .heal.distill import heal_config

        if self.steps < 0:
            raise UserError(f"{flag} must be 0 or more (got {self.steps})")
        values = self.values()
        values.update(calibration=calibration, seed=seed, heldout_chunks=heldout_chunks)
        return heal_config(values, set(self.given), model_spec)


@dataclass(frozen=True)
class PlanOptions(Record):
    """What a plan is for (device, budget, quality bar) and which levers it may pull."""

    profile: str = setting(
        None,
        "--profile",
        required=True,
        metavar="P",
        help="Device profile: a name from `mka-edge profiles` or a .yaml file.",
    )
    budget_mb: float | None = setting(
        None,
        "--budget-mb",
        type=float,
        sources=("cli", "profile"),
        decides_plan=True,
        help="Memory budget in MB (default: the profile's memory minus its reserve).",
    )
    context: int | None = setting(
        None,
        "--context",
        type=int,
        sources=("cli", "profile"),
        decides_plan=True,
        help="Context length the KV cache must hold (default: the profile's).",
    )
    max_quality_loss: float | None = setting(
        None,
        "--max-quality-loss",
        type=float,
        sources=("cli", "profile"),
        decides_plan=True,
        help="Quality bar: mean KL to the reference in nats (default: the profile's).",
    )
    method: str = setting(
        "sleb-fast",
        "--method",
        decides_plan=True,  # checked by planning.resolve_settings, which names the known ones
        help=f"Merge method whose quality curve the plan uses, one of {', '.join(ALL_METHODS)} (see `mka-edge merge "
        "--help`). sleb-fast is the "
        "default here: on SmolLM2 it took sleb's layers at K = 3, 6 and 9 in 4.5x less time than sleb, and sleb "
        "was never beaten on held-out quality by more than 2%.",
    )
    k_max: int | None = setting(
        None,
        "--max-merge",
        type=int,
        decides_plan=True,
        help="Largest K considered (default: a third of the layers, at most 8).",
    )
    quants: str | None = setting(
        None,
        "--quants",
        decides_plan=True,
        help="Comma-separated quant types to consider (default: F16,Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q4_0,Q3_K_M,Q2_K,"
        "IQ4_XS,IQ3_M; onnxruntime profiles: fp32,int8,int4-mixed,int4).",
    )
    kv_type: str | None = setting(
        None,
        "--kv-type",
        metavar="TYPE",
        callback=_check_kv_type,
        sources=("cli", "profile"),
        decides_plan=True,
        help="llama.cpp KV cache: auto (the plan chooses among f16, q8_0 and q4_0 caches, with and without "
        "flash attention, by measured KL, memory and speed) or a type pinned for K and V (f16 forbids "
        "quantized caches). Default: the profile's kv_cache_type.",
    )
    flash_attn: str = setting(
        "auto",
        "--flash-attn",
        type=click.Choice(["auto", "on", "off"]),
        decides_plan=True,
        help="llama.cpp's attention path: auto lets the plan choose (where the profile allows flash "
        "attention), on requires it, off forbids it (and with it quantized V caches).",
    )
    attention_removal: bool = setting(
        True,
        "--attention-removal",
        secondary="--no-attention-removal",
        decides_plan=True,
        help="llama.cpp targets, llama architectures: also consider removing attention sub-blocks (the "
        "sleb-attn curve; such a model runs as llama.cpp's deci architecture). onnxruntime-genai has no "
        "per-layer configuration, so ONNX plans never remove attention alone.",
    )
    imatrix: bool = setting(
        True,
        "--imatrix",
        secondary="--no-imatrix",
        decides_plan=True,
        help="Consider importance-matrix quantization (computed once per model on the calibration set, "
        "cached): per type the plan takes whichever of plain and imatrix measured lower KL, and the "
        "imatrix-only types (IQ4_XS, IQ3_M) join the candidates.",
    )
    mixed: bool = setting(
        False,
        "--mixed",
        secondary="--no-mixed",
        decides_plan=True,
        help="llama.cpp targets: also consider mixed plans, every weight tensor its own type, allocated under "
        "the budget left for the weights (with the edit sets' layer and attention removal as the zero-bit end). "
        "Measures each tensor's importance-matrix-weighted error at each --mixed-types type in llama.cpp's own "
        "quantizer and one KL per tensor kind: about 7 min on SmolLM2-135M, cached per model. Off by default.",
    )
    mixed_types: str = setting(
        "Q8_0,Q6_K,Q5_K,Q5_0,Q4_K,IQ4_NL,Q4_0,Q3_K,Q2_K",
        "--mixed-types",
        decides_plan=True,
        help="With --mixed: comma-separated ggml tensor types a tensor may take (Q8_0, the floor, must be "
        "one). Fewer types measure faster; llama.cpp falls back from a K-quant where a tensor's rows "
        "cannot take it, and the plan counts the type it really writes.",
    )
    measure_all: bool = setting(
        False,
        "--measure-all",
        is_flag=True,
        decides_plan=True,
        help="Quantize and measure every quant type and cache mode on the model, even those the plan can "
        "show cannot change its choice (too large at any merge, or bounded below the best measured plan by "
        "the precision order); for benchmarks. The plan is the same; only slower.",
    )
    quality_prior: bool = setting(
        False,
        "--quality-prior",
        is_flag=True,
        decides_plan=True,
        help="Use llama.cpp's published Llama-3-8B quant costs instead of measuring each type on this model "
        "(automatic above 3B parameters, where measuring costs more than the build).",
    )
    heal_points: int = setting(
        4,
        "--heal-curve-points",
        type=int,
        decides_plan=True,
        help="With healing, how many K values the plan heals to predict healed quality (evenly spaced up to "
        "--max-merge; the K between are interpolated); 0: heal at every K.",
    )

    def solver_options(self) -> dict[str, Any]:
        """planning.resolve_settings' keyword arguments (the profile is its first argument)."""
        out = {k: v for k, v in self.values().items() if k != "profile"}
        out["quants"] = self.quants.split(",") if self.quants else None
        out["mixed_types"] = tuple(self.mixed_types.split(","))
        return out


@dataclass(frozen=True)
class PlanRun(Record):
    """`mka-edge plan`: where plan.json goes, if anywhere."""

    out: str | None = setting(
        None, "--out", type=click.Path(file_okay=False), help="Folder for plan.json (default: print only)."
    )


@dataclass(frozen=True)
class MergeRun(Record):
    """`mka-edge merge`: how many layers, by which method, written where."""

    k: int = setting(
        None,
        "--merge-layers",
        "-k",
        type=int,
        required=True,
        help="How many layers to merge away (K): the result has L - K layers. With sleb-attn, K counts removal "
        "units (an attention sub-block or a whole layer).",
    )
    method: str = setting(
        "auto",
        "--method",
        type=click.Choice(ALL_METHODS),
        help=f"auto: per K the least calibration-loss plan among {', '.join(AUTO_POOL)}. "
        + " ".join(f"{r.name}: {r.summary}." for r in TABLE),
    )
    alpha: str = setting(
        "calibrated",
        "--alpha",
        help="Fusion weight rule: paper (alpha = NMI of the pair on the lower layer), calibrated (grid search "
        "on calibration loss), or a number in [0, 1].",
    )
    heldout_chunks: int = setting(
        4, "--heldout-chunks", type=int, help="512-token held-out chunks for the quality after each step (0: skip)."
    )
    no_cache: bool = setting(False, "--no-cache", is_flag=True, help="Recompute the trajectory even if it is cached.")
    out: str = setting(
        None,
        "--out",
        type=click.Path(file_okay=False),
        required=True,
        help="Folder for the merged Hugging Face model and merge_log.json.",
    )


@dataclass(frozen=True)
class BuildRun(Record):
    """`mka-edge build`: where the package goes and how hard to try."""

    out: str = setting(
        None,
        "--out",
        type=click.Path(file_okay=False),
        required=True,
        help="Package folder: artifact, manifest.json, report.md, plots, model card, run commands.",
    )
    force: bool = setting(False, "--force", is_flag=True, help="Replace --out if it exists and is not empty.")
    build_anyway: bool = setting(
        False,
        "--build-anyway",
        is_flag=True,
        help="Build even a plan predicted to miss the quality bar (without it such a build is refused as soon "
        "as the plan shows it, before any merge or export, with what would make it pass).",
    )
    plan_file: str | None = setting(
        None,
        "--plan",
        type=click.Path(dir_okay=False),
        help="Execute this saved plan (plan.json from `mka-edge plan --out`, or a build's) instead of planning: "
        "refused if it was made for another model, profile or mka-edge version. The options that decide a "
        "plan (budget, context, quality bar, method, max merge, quants, healing) then come from the plan.",
    )
    max_tries: int = setting(
        3, "--max-tries", type=int, help="Plans tried, best first, when an artifact misses the measured quality bar."
    )
    mmlu_per_subject: int = setting(
        1, "--mmlu-per-subject", type=int, help="MMLU questions per subject in the validation (0 skips)."
    )


@dataclass(frozen=True)
class HealRun(Record):
    """`mka-edge heal`: which merged model, against which reference, on what text."""

    model: str = setting(
        None, "--model", required=True, metavar="DIR", help="The merged model folder (from `mka-edge merge`) to heal."
    )
    reference: str | None = setting(
        None,
        "--reference",
        metavar="REF",
        help="The model to distil from (recipe, folder, .gguf, hub id). Default: the source in the folder's "
        "merge_log.json.",
    )
    calibration: str | None = setting(
        None,
        "--calibration",
        type=click.Path(),
        help="Training text (.txt or .jsonl with 'text'). Default: the packaged Wikipedia calibration articles "
        "(never the held-out ones).",
    )
    seed: int = setting(0, "--seed", type=int, help="Seed for the order and choice of calibration windows.")
    heldout_chunks: int = setting(
        2, "--heldout-chunks", type=int, help="512-token held-out chunks for the quality before and after."
    )
    device: str = setting("auto", "--device", help="auto (CUDA when present), cpu or cuda.")
    max_memory: Any = max_memory_setting()
    out: str = setting(
        None,
        "--out",
        type=click.Path(file_okay=False),
        required=True,
        help="Folder for the healed Hugging Face model (merge_log.json and heal_log.json inside).",
    )


@dataclass(frozen=True)
class EvalRun(Record):
    """`mka-edge eval`: a model against its reference."""

    model: str | None = setting(
        None, "--model", metavar="M", help="Model to measure (recipe, directory, .gguf, hub id)."
    )
    reference: str | None = setting(
        None,
        "--reference",
        metavar="R",
        help="Reference model; default: the source named in the model's merge_log.json, else the model itself.",
    )
    heldout_chunks: int = setting(
        8, "--heldout-chunks", type=int, help="512-token held-out chunks for KL, perplexity and top-1."
    )
    mmlu_per_subject: int = setting(
        2, "--mmlu-per-subject", type=int, help="MMLU questions per subject (57 subjects; 0 skips MMLU)."
    )
    device: str = setting("auto", "--device", help="auto, cpu or cuda.")
    max_memory: Any = max_memory_setting()
    out: str | None = setting(
        None, "--out", type=click.Path(dir_okay=False), help="Also write the figures as JSON here."
    )


@dataclass(frozen=True)
class ExportRun(Record):
    """`mka-edge export`: one model, one format, one type. The options marked "GGUF only" or "ONNX
    only" belong to the target whose ``export_options`` names them."""

    fmt: str = setting(
        "gguf",
        "--format",
        type=click.Choice(list(TARGETS)),
        help="Artifact format: gguf (llama.cpp, llama-cpp-python, Ollama, LM Studio) or onnx (onnxruntime and "
        "onnxruntime-genai; a folder with model.onnx, its weights, tokenizer and genai_config.json).",
    )
    quant: str | None = setting(
        None,
        "--quant",
        callback=_quant_arg,
        eager=True,
        help="Quantization type. GGUF: F32, F16, BF16, Q8_0, Q6_K, Q5_K_M, Q4_K_M (default), Q4_0, IQ4_XS, ... "
        "(everything but F32/F16 made by llama.cpp's own quantizer). ONNX: fp32, fp16, int8, int4, "
        "int4-mixed (default; onnxruntime's MatMulNBits quantizer). `--quant help` lists all.",
    )
    model: str | None = setting(
        None,
        "--model",
        metavar="M",
        help="A merged model folder (from `mka-edge merge`), recipe name, Hugging Face directory, .gguf or hub id. "
        "Default: the embedded SmolLM2-135M.",
    )
    out: str = setting(
        None,
        "--out",
        type=click.Path(),
        required=True,
        help="GGUF: the .gguf file to write. ONNX: the folder to write. Written under a temporary name and renamed "
        "at the end.",
    )
    pre_tokenizer: str | None = setting(
        None,
        "--pre-tokenizer",
        metavar="NAME",
        help="GGUF only: llama.cpp pre-tokenizer name, only needed when llama.cpp's table does not recognise a "
        "byte-level BPE tokenizer.",
    )
    threads: int | None = setting(
        None, "--threads", type=int, help="GGUF only: threads for llama.cpp's quantizer (default: all cores)."
    )
    calibration: str | None = setting(
        None,
        "--calibration",
        type=click.Path(),
        help="GGUF only: text for the importance matrix (--imatrix, and the IQ1/IQ2/IQ3_XXS/Q2_K_S types that "
        "need one) (default: packaged Wikipedia articles).",
    )
    imatrix: bool = setting(
        False,
        "--imatrix",
        is_flag=True,
        help="GGUF only: quantize with an importance matrix computed on the calibration text (cached per model "
        "and text); the file records it in quantize.imatrix.* keys, as llama-quantize does. Types that need "
        "one always get one; F16/BF16/Q8_0 ignore it.",
    )
    intermediate: str = setting(
        "auto",
        "--intermediate",
        type=click.Choice(["auto", "F32", "BF16", "F16"], case_sensitive=False),
        help="GGUF only: the float file handed to llama.cpp's quantizer. auto: the weights' own 16-bit type; "
        "for 32-bit weights F32 up to 2 GiB of F32 data, else BF16 (F32 doubles the scratch space: 32 GB at 8B).",
    )
    context: int | None = setting(
        None,
        "--context",
        type=int,
        help="ONNX only: the maximum sequence length onnxruntime-genai allocates its KV cache for (default: the "
        "model's).",
    )
    single_file: bool = setting(
        False,
        "--single-file",
        is_flag=True,
        help="ONNX only: embed the weights in model.onnx instead of model.onnx.data (refused above the 2 GB "
        "protobuf limit).",
    )
    max_memory: Any = max_memory_setting()

    def target_options(self) -> dict[str, Any]:
        """The format-specific options given, refused in one line when another format owns one."""
        owners = {name: t.name.upper() for t in TARGETS.values() for name in t.export_options}
        given = {name: getattr(self, name) for name in owners}  # the targets' tables name the fields
        given["intermediate"] = None if self.intermediate.lower() == "auto" else self.intermediate.upper()
        target = TARGETS[self.fmt]
        wrong = [name for name, v in given.items() if v and name not in target.export_options]
        if wrong:
            raise UserError(
                f"{', '.join('--' + w.replace('_', '-') for w in wrong)} "
                f"appl{'y' if len(wrong) > 1 else 'ies'} to {owners[wrong[0]]} only, not --format {self.fmt}"
            )
        return {name: given[name] for name in target.export_options if given[name]}


@dataclass(frozen=True)
class ValidateRun(Record):
    """`mka-edge validate`: the artifact is the command's argument; the rest are these."""

    reference: str | None = setting(
        None,
        "--reference",
        metavar="REF",
        help="The model to compare against (recipe, folder, .gguf, hub id). Default: the source recorded in the "
        "artifact.",
    )
    profile: str | None = setting(
        None,
        "--profile",
        metavar="P",
        help="Device profile (name or .yaml): its thresholds, threads, context and KV type apply unless given here.",
    )
    threads: int | None = setting(
        None,
        "--threads",
        type=int,
        sources=("cli", "profile"),
        help="Runtime threads, llama.cpp or onnxruntime (default: the profile's, else all cores).",
    )
    context: int | None = setting(
        None,
        "--context",
        type=int,
        sources=("cli", "profile"),
        help="Context length to allocate (default: the profile's, else 2048).",
    )
    kv_type: str | None = setting(
        None,
        "--kv-type",
        metavar="TYPE",
        callback=_check_kv_type,
        sources=("cli", "profile"),
        help="GGUF only: llama.cpp KV cache type for K and V: f16, f32, q8_0 or q4_0, or K/V apart as "
        "K/V (e.g. q8_0/f16) (default: the profile's, else f16). A quantized V cache runs with flash "
        "attention. ONNX keeps the cache in the model's I/O type.",
    )
    flash_attn: str | None = setting(
        None,
        "--flash-attn",
        type=click.Choice(["auto", "on", "off"]),
        help="GGUF only: llama.cpp's attention path. auto (default): on exactly when the V cache is quantized "
        "(llama.cpp needs it there); a profile with flash_attention: false turns it off.",
    )
    max_kld: float | None = setting(
        None,
        "--max-kld",
        type=float,
        sources=("cli", "profile"),
        help="Fail when the mean KL to the reference (nats) is above this.",
    )
    min_tokens_per_s: float | None = setting(
        None,
        "--min-tokens-per-s",
        type=float,
        sources=("cli", "profile"),
        help="Fail when generation tokens/s on this host is below this.",
    )
    repeats: int = setting(3, "--repeats", type=int, help="Latency runs; median, min and max are reported.")
    chunks: int = setting(4, "--chunks", type=int, help="512-token held-out chunks for KL, perplexity and top-1.")
    mmlu_per_subject: int = setting(
        1, "--mmlu-per-subject", type=int, help="MMLU questions per subject (57 subjects; 0 skips)."
    )
    out: str | None = setting(
        None,
        "--out",
        type=click.Path(file_okay=False),
        help="Folder for validation.json and validation.md (default: ARTIFACT-validation beside the artifact).",
    )
    max_memory: Any = max_memory_setting()


@dataclass(frozen=True)
class AnalyzeRun(Record):
    """`mka-edge analyze`: where the similarity files go, and how many seeds check the ranking."""

    out: str = setting(
        ".", "--out", type=click.Path(file_okay=False), help="Folder for similarity.json and similarity.png."
    )
    seeds: int = setting(
        1,
        "--seeds",
        type=int,
        help="Also rank the top adjacent pairs under this many seeds in all, to check stability.",
    )


# -- the command line from the records ----------------------------------------------------------


def click_option(spec: Spec, default: Any) -> Callable:
    """One click option from one field's spec and default."""
    kw: dict[str, Any] = dict(help=spec.help, required=spec.required, metavar=spec.metavar)

    if spec.secondary:
        decls = [f"{spec.flags[0]}/{spec.secondary}", spec.dest]
        kw.update(default=default, show_default=True)
    elif spec.is_flag:
        decls = [*spec.flags, spec.dest]
        kw.update(is_flag=True, default=False)
    else:
        decls = [*spec.flags, spec.dest]
        kw.update(default=default, type=spec.type)
        kw["show_default"] = default is not None and not spec.required
    if spec.required:  # click 8.3+ takes any default, None included, as satisfying "required"
        kw.pop("default", None)
    if spec.callback is not None:
        kw.update(callback=spec.callback, is_eager=spec.eager, expose_value=spec.expose)
    return click.option(*decls, **kw)


def options(*records: type[Record], overrides: dict[str, dict] | None = None) -> Callable:
    """A decorator adding every field of ``records`` as a click option, in field order.
    ``overrides`` maps a field's click name (``dest``) to Spec changes for this command (another flag,
    help or default): the field stays the same. A field whose click name an earlier record already
    declared is declared once (--max-memory, --device in a plan's model settings and its run)."""
    overrides = overrides or {}
    decorators, seen = [], set()
    for rec in records:
        for f, spec in rec.specs():
            change = dict(overrides.get(spec.dest, {}))
            default = change.pop("default", f.default)
            spec = dataclasses.replace(spec, **change) if change else spec
            if spec.dest in seen:
                continue
            seen.add(spec.dest)
            decorators.append(click_option(spec, default))

    def wrap(fn):
        for d in reversed(decorators):
            fn = d(fn)
        return fn

    return wrap


def parse(record: type[Record], values: dict[str, Any], overrides: dict[str, dict] | None = None) -> Record:
    """The record from what click read (``values``, by click name), with ``given``: the fields the
    user set (click's parameter source is not DEFAULT). Outside click (a library call), every value
    passed counts as given."""
    from click.core import ParameterSource

    ctx = click.get_current_context(silent=True)
    kw, given = {}, set()
    for f, spec in record.specs():
        dest = (overrides or {}).get(spec.dest, {}).get("flags")
        dest = dataclasses.replace(spec, flags=dest).dest if dest else spec.dest
        if not spec.expose or dest not in values:
            continue
        kw[f.name] = values[dest]
        source = ctx.get_parameter_source(dest) if ctx is not None else ParameterSource.COMMANDLINE
        if source not in (None, ParameterSource.DEFAULT):
            given.add(f.name)
    return record(given=frozenset(given), **kw)


def plan_deciding(*records: type[Record]) -> list[str]:
    """The click names of the fields that decide a plan: what `build --plan` refuses."""
    return [spec.dest for rec in records for _, spec in rec.specs() if spec.decides_plan]
