"""Command line: each command parses its settings records (settings.py generates the options from
them), calls one library function (commands.py) and prints what it returns."""

from __future__ import annotations

import errno
import functools
import logging
import os
import sys

import click

from . import __version__
from .errors import UserError
from .settings import (
    AnalyzeRun,
    BuildRun,
    EvalRun,
    ExportRun,
    HealRun,
    HealSettings,
    MergeRun,
    ModelSettings,
    PlanOptions,
    PlanRun,
    ValidateRun,
    options,
    parse,
)


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")


def torch_oom():
    try:
        import torch

        return torch.OutOfMemoryError
    except (ImportError, AttributeError):
        return MemoryError


def handle_errors(f):
    """Every failure a user can cause is one line and an exit code, never a traceback."""

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
            first = str(exc).splitlines()[0][:120]
            click.echo(f"error: out of memory ({first}); use fewer --samples or a smaller --seq-len", err=True)
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


def show(outcome) -> None:
    click.echo(outcome.text)
    if not outcome.passed:
        click.echo(f"error: {outcome.failure}", err=True)
        sys.exit(1)


def log(message: str) -> None:
    click.echo(message, err=True)


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
    from . import commands

    show(commands.recipes())


@cli.command()
@handle_errors
def profiles() -> None:
    """List the device profiles shipped with mka-edge (profiles/*.yaml)."""
    from . import commands

    show(commands.profiles())


@cli.command()
@options(ModelSettings, AnalyzeRun)
@handle_errors
def analyze(**kw) -> None:
    """Layer similarity: diffusion maps of each layer's activations, NMI of their k-means labels.

    One forward pass per calibration batch gathers every layer; writes similarity.json (the LxL
    matrix) and a heatmap PNG, and prints the most similar adjacent pairs."""
    from . import commands

    show(commands.analyze(parse(ModelSettings, kw), parse(AnalyzeRun, kw)))


@cli.command()
@options(ModelSettings, MergeRun, HealSettings)
@handle_errors
def merge(**kw) -> None:
    """Merge K layers away and write a Hugging Face model directory that transformers loads
    (healed by a short distillation when --heal-steps is given)."""
    from . import commands

    show(commands.merge(parse(ModelSettings, kw), parse(MergeRun, kw), parse(HealSettings, kw), log))


HEAL_STEPS = {
    "heal_steps": dict(
        flags=("--steps",),
        required=True,
        help="Optimizer steps (each on --heal-batch calibration windows; every window is used once).",
    )
}


@cli.command()
@options(HealRun, HealSettings, overrides=HEAL_STEPS)
@handle_errors
def heal(**kw) -> None:
    """Heal a merged model: a short distillation from the original model's next-token
    distributions (loss KL(reference || model) on calibration text). Prints the running loss,
    checkpoints as it goes, and reports held-out KL and perplexity before and after."""
    from . import commands

    show(commands.heal(parse(HealRun, kw), parse(HealSettings, kw, HEAL_STEPS), log))


@cli.command(name="eval")
@options(EvalRun)
@handle_errors
def eval_cmd(**kw) -> None:
    """Quality of a model against its reference: mean KL(ref || model) in nats on held-out text,
    perplexity change, top-1 agreement, and MMLU (letter and cloze) beside chance."""
    from . import commands

    show(commands.evaluate(parse(EvalRun, kw)))


@cli.command()
@options(ExportRun)
@handle_errors
def export(**kw) -> None:
    """Write a model (merged or not) as a quantized artifact for an edge runtime."""
    from . import commands

    show(commands.export(parse(ExportRun, kw)))


@cli.command()
@click.argument("artifact", type=click.Path())
@options(ValidateRun)
@handle_errors
def validate(artifact, **kw) -> None:
    """Run ARTIFACT (a .gguf file, or an ONNX export folder) in its real runtime (each measurement
    in a child process) and check it: latency (prompt and generation tokens/s, time to first token,
    load time, peak RSS), accuracy against the reference (mean KL, perplexity change, top-1, MMLU).
    Exit code 1 when a threshold is missed."""
    from . import commands

    show(commands.validate(artifact, parse(ValidateRun, kw)))


@cli.command()
@options(PlanOptions, ModelSettings, HealSettings, PlanRun)
@handle_errors
def plan(**kw) -> None:
    """Pick the merge ratio and quant type that fit a device, and say why; exports nothing.

    Computes (or reads from cache) the merge-quality curve and each quant type's cost on this
    model, predicts memory, device tokens/s and quality loss for every (K, type) pair, and prints
    the Pareto table and the choice."""
    from . import commands

    records = parse(PlanOptions, kw), parse(ModelSettings, kw), parse(HealSettings, kw), parse(PlanRun, kw)
    show(commands.plan(*records, log))


@cli.command()
@options(PlanOptions, ModelSettings, BuildRun, HealSettings)
@handle_errors
def build(**kw) -> None:
    """Plan, merge, (heal,) export, validate and package a model for a device, in one go
    (or execute a plan saved by `mka-edge plan --out` with --plan)."""
    from . import commands

    records = parse(PlanOptions, kw), parse(ModelSettings, kw), parse(HealSettings, kw), parse(BuildRun, kw)
    show(commands.build(*records, click.echo))


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
