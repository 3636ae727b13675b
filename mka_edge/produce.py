"""Merge -> heal: the one path from a loaded model to a merged (and healed) model folder, used by
`mka-edge merge`, `build` and the plan's healed quality curve."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from .heal.distill import HealConfig, heal, teacher_from
from .merge_log import FILE as MERGE_LOG
from .merging import merge
from .mka.context import MergeContext, build_context


@dataclass(frozen=True)
class Produced:
    folder: Path  # the merged (healed) Hugging Face model, merge_log.json inside
    merge_log: dict  # the merge's log (merge_log.MergeLog.to_json())
    heal: dict | None  # the heal's log (held-out quality before and after), when healed


def produce(
    ctx: MergeContext,
    k: int,
    method: str,
    alpha: str,
    out: Path,
    heal_cfg: HealConfig | None = None,
    *,
    heldout: int = 0,
    use_cache: bool = True,
    progress: bool = True,
    log=print,
) -> Produced:
    """Merge K layers away into ``out``; with ``heal_cfg`` the merge goes to a hidden sibling
    folder first and the healed model to ``out`` (the sibling is removed whatever happens).  The
    source already loaded in ``ctx`` serves as the heal's teacher when it can (no second load).
    A killed heal resumes on the rerun from its checkpoint, which is in the cache under the heal's
    settings (heal.distill.Checkpoint), not beside ``out``: a build's ``out`` is inside its
    temporary folder, which the rerun removes."""
    out = Path(out)
    if heal_cfg is None or heal_cfg.steps <= 0:
        return Produced(
            out, merge(ctx, k, method, alpha, out, heldout=heldout, use_cache=use_cache, progress=progress), None
        )
    unhealed = out.with_name(f".{out.name}.unhealed")
    shutil.rmtree(unhealed, ignore_errors=True)
    try:
        merge_log = merge(ctx, k, method, alpha, unhealed, heldout=heldout, use_cache=use_cache, progress=progress)
        record = heal(
            str(unhealed),
            out,
            heal_cfg,
            progress=progress,
            log=log,
            reference_model=teacher_from(ctx.lm),
            device=str(ctx.device),
        )
    finally:
        shutil.rmtree(unhealed, ignore_errors=True)
    return Produced(out, merge_log, record)


def merged_folder(
    out: Path, k: int, method: str, alpha: str = "calibrated", model: str | None = None, **context_opts
) -> Path:
    """``out`` holding ``model`` merged to K layers fewer (made once; a folder with a merge log is
    reused): what benchmarks need, without the CLI.  The trajectory cache makes a remake cheap."""
    out = Path(out)
    if not (out / MERGE_LOG).is_file():
        produce(build_context(model=model, **context_opts), k, method, alpha, out, heldout=0)
    return out
