"""`mka-edge merge`: run (or read from cache) a merge trajectory and write the model at K."""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from . import __version__
from .calibration import heldout_chunks
from .errors import UserError
from .merge_log import FILE as MERGE_LOG
from .merge_log import MergeLog, MergeStep
from .mka.context import MergeContext
from .mka.fusion import identity
from .mka.layers import temporary_stack
from .mka.method_table import by_bytes
from .mka.output import attention_free, build_model, layer_map, save_merged
from .mka.trajectory import trajectory
from .quality import Reference, compare

ALPHA_RULES = {
    "paper": "alpha = S(l, l+1), the NMI of the pair, on the lower layer l and 1 - alpha on l+1",
    "calibrated": "alpha from the grid {0, .25, .5, .75, 1} with the least calibration KL; 0 or 1 is plain removal of one layer",
}


def check_k(k: int, n_layers: int, method: str | None = None) -> None:
    if k < 1:
        raise UserError(f"--merge-layers must be at least 1 (got {k})")
    if method is not None and by_bytes(method):  # K counts removal units: attention sub-blocks and layers
        if k > 2 * n_layers - 2:
            raise UserError(
                f"--merge-layers {k} is more removal units than {method} has: the model has {n_layers} layers, "
                f"so at most {2 * n_layers - 2} (the attention of every layer but the first, and every layer but one)"
            )
        return
    if k >= n_layers:
        raise UserError(
            f"--merge-layers {k} would leave no layer: the model has {n_layers}; use at most {n_layers - 1}"
        )


def heldout_reference(ctx: MergeContext, n_chunks: int) -> Reference:
    """The unmerged model's outputs on ``n_chunks`` held-out chunks, to compare merged stacks with.

    Kept on the context: every curve of a plan (the method's and the attention-removal curve)
    compares against the same original stack, whose blocks are never modified, and at 1.5B one
    reference is 15-25 s of forward passes."""
    ctx.reset()
    if n_chunks not in ctx.references:
        ctx.references[n_chunks] = Reference(ctx.model, heldout_chunks(ctx.lm.tokenizer, n_chunks), ctx.device)
    return ctx.references[n_chunks]


def step_quality(ctx: MergeContext, ref: Reference, step: dict) -> dict:
    """Held-out quality (KL, perplexity, top-1) of the stack after ``step``; the working stack is
    left as it was (a trajectory may be running on it)."""
    layers = ctx.stack(step["composition"], step.get("attn_removed", ()))
    with temporary_stack(ctx.model, ctx.arch, layers):
        return compare(ctx.model, ref).as_dict()


def heldout_along(ctx: MergeContext, steps: list[dict], n_chunks: int, progress: bool) -> list[dict]:
    """Held-out quality (KL, perplexity, top-1) of the stack after each step."""
    if n_chunks <= 0:
        return [{} for _ in steps]
    ref = heldout_reference(ctx, n_chunks)
    return [
        step_quality(ctx, ref, st)
        for st in tqdm(steps, desc="held-out quality per step", disable=not progress, leave=False)
    ]


def check_out(out: Path) -> None:
    """Refuse to replace a folder that is not an earlier mka-edge merge (it would be lost)."""
    from .exporters.paths import check_creatable

    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MERGE_LOG).is_file())):
        raise UserError(f"--out {out} exists and is not an earlier merge output; choose a new folder")
    check_creatable(out)  # a path under a file, or an unwritable parent: found before the merge


def merge(
    ctx: MergeContext,
    k: int,
    method: str,
    alpha: str,
    out: Path | None,
    heldout: int = 4,
    use_cache: bool = True,
    progress: bool = True,
) -> dict:
    check_k(k, ctx.n_original, method)
    if out is not None:
        check_out(out)
    traj = trajectory(ctx, method, k, alpha, use_cache=use_cache, progress=progress)
    steps = traj["steps"][:k]
    if len(steps) < k:
        raise UserError(
            f"{method} found only {len(steps)} removal units on this model, not {k}; use --merge-layers {len(steps)}"
        )
    quality = heldout_along(ctx, steps, heldout, progress)
    comp = steps[-1]["composition"]
    attn = steps[-1].get("attn_removed", ())
    log = MergeLog(
        mka_edge=__version__,
        source=ctx.lm.source,
        source_fingerprint=ctx.lm.fingerprint,
        method=method,
        alpha_rule=alpha,
        alpha_rule_means=ALPHA_RULES.get(alpha, f"alpha fixed at {alpha}"),
        merge_layers=k,
        layers_before=ctx.n_original,
        layers_after=len(comp),
        calibration=ctx.text_spec.key(),
        settings=ctx.settings.key(),
        device=str(ctx.device),
        trajectory_cached=traj["cached"],
        trajectory_seconds=traj["seconds"],
        layer_map=tuple(layer_map(comp)),
        attention_removed=tuple(attention_free(ctx, comp, attn)),
        # the trajectory's step dicts, less the composition, plus held-out quality and the layer map
        steps=tuple(
            MergeStep.from_json(
                {key: v for key, v in {**st, "heldout": q}.items() if key != "composition"}
                | {"layers": layer_map(st["composition"])}
            )
            for st, q in zip(steps, quality)
        ),
        timings=ctx.timer.as_dict(),
    ).to_json()
    if out is not None:
        model = build_model(ctx, comp, attn)
        save_merged(model, ctx.lm.tokenizer, log, Path(out))
    ctx.apply(identity(ctx.n_original))
    return log
