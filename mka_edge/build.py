"""`mka-edge build`: plan -> merge -> export -> validate -> package.  Nothing else orchestrates.
The profile's runtime picks the target (mka_edge/targets/): GGUF for llama.cpp, an ONNX folder
for onnxruntime.  ``execute`` runs a Plan, fresh from the planner or saved by `plan --out`.

The package folder is assembled under a temporary name and renamed at the end, so an
interrupted or failed build leaves nothing at --out.  If the artifact misses the profile's
quality bar (measured, not predicted), the next-best plan is tried, up to --max-tries.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .cache import atomic_dir
from .errors import UserError
from .exporters.paths import check_creatable
from .heal.distill import HealConfig
from .host_need import available_ram, check_load, host_need
from .killpoints import killpoint
from .kv_cache import BASELINE_CACHE
from .memory_use import release_freed_memory
from .models.loading import load_model
from .models.recipes import DEFAULT_MODEL
from .planning import (
    PlanSettings,
    load_context,
    load_plan,
    plan_from_settings,
    profile_fingerprint,
    resolve_settings,
)
from .produce import produce
from .profiles import Profile, load_profile
from .records import Attempt, Plan, Ranked
from .report import package
from .settings import ModelSettings
from .solver.bar import bar_missed_line
from .solver.feasibility import read_shape
from .solver.memory import Shape
from .solver.search import Candidate
from .solver.speed import bytes_per_token, efficiency, predict_tps
from .validate.checks import Thresholds
from .validate.core import context_needed, validate_artifact
from .validate.result import ValidationResult


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: a container's or taskset's share), not the
    host's count: llama.cpp threads beyond them wait on each other (a tiny model's latency run
    pinned to one CPU took 2.6x longer with two threads than with one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity API (macOS, Windows)
        return max(1, os.cpu_count() or 1)


def check_out(out: Path, force: bool) -> None:
    """--out must be a new or empty folder (or --force) whose nearest existing parent is a writable
    folder: found now, not after the plan, merge and validation."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise UserError(f"--out {out} exists and is not empty; choose a new folder or pass --force to replace it")
    check_creatable(out)


def disk_need_bytes(plan: Plan, lm, target, heal: bool, max_tries: int) -> float:
    """Disk the build needs at its peak beside --out, from the plan alone, for the try that needs
    most: the merged folder M (while healing, the unhealed merge and the healed copy: 2M; the
    unhealed one is gone before the export) and the target's export peak (scratch and artifact,
    the artifact at the plan's size of the unmerged model: an upper bound).  A failed try's files
    are removed before the next."""
    model = lm.model
    layers = model.config.num_hidden_layers
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    has_folder = bool(lm.source.get("model_dir"))
    need = 0.0
    for cand in plan.ranked[:max_tries]:
        k, quant = cand.k, cand.quant
        cost = plan.quant_costs.get(quant) or {}
        artifact = float(cost.get("bytes") or model_bytes)
        merged = model_bytes * (layers - k) / layers if k else 0.0
        export = target.export_disk_bytes(model.config, quant, artifact, from_folder=bool(k) or has_folder)
        need = max(need, merged + export, 2 * merged if heal else 0.0)
    return need


def check_host(plan: Plan, lm, target, out: Path, heal: bool, max_tries: int) -> None:
    """Enough disk for the build's peak (``disk_need_bytes`` plus 10%) and RAM for a merged copy,
    before starting."""
    need_disk = 1.1 * disk_need_bytes(plan, lm, target, heal, max_tries) / 2**20
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    free_disk = shutil.disk_usage(parent).free / 2**20
    if free_disk < need_disk:
        raise UserError(
            f"{parent} has {free_disk:.0f} MB free; the build needs about {need_disk:.0f} MB "
            f"(merged model, export scratch and artifact); free disk space or choose another --out"
        )
    # the source is loaded (plan_from_settings checked that load before it): what comes on top is a
    # merged copy, reloaded beside it (host_need's rule: mapped from its file, no RAM of its own,
    # unless accelerate places it under a --max-memory cap)
    layers = lm.model.config.num_hidden_layers
    kept = [(layers - c.k) / layers for c in plan.ranked[:max_tries] if c.k]
    if kept:
        n_params = sum(p.numel() for p in lm.model.parameters())
        dtype_bytes = lm.model.dtype.itemsize
        caps = lm.max_memory or None
        extra = host_need(n_params, dtype_bytes=dtype_bytes, max_memory=caps, merged_fraction=max(kept)).terms["merged"]
        if extra > available_ram():
            raise UserError(
                f"this host has {available_ram() / 2**30:.1f} GiB of RAM available beside the loaded model and "
                f"the merged model needs about {extra / 2**30:.1f} GiB more; close other programs, build on a "
                "larger machine, or pass --max-memory cpu=<GB> to offload part of the model to the disk"
            )


def build(
    profile: str,
    model: str | None,
    out: str | Path,
    *,
    force: bool = False,
    max_tries: int = 3,
    mmlu_per_subject: int = 1,
    repeats: int = 3,
    progress: bool = True,
    plan_file: str | Path | None = None,
    build_anyway: bool = False,
    settings: PlanSettings | None = None,
    log=print,
    **plan_kw,
) -> dict:
    """Plan (or read ``plan_file``), then execute.  The plan's settings: ``settings`` (resolved by the
    caller, as the CLI does), else ``plan_kw``, resolve_settings' options (budget, context, method, heal...); with healing the plan uses healed quality and every merged model is
    healed before export."""
    out = Path(out)
    check_out(out, force)
    # the probe's file of the best plan that merges nothing waits here for the export (a build that
    # merges exports its merged model instead); named now but made only by the hand-over, so a
    # command refused on its inputs writes nothing, TMPDIR included, and removed whatever happens
    handed = Path(tempfile.gettempdir()) / f"mka-edge-probe-files-{uuid.uuid4().hex}"
    try:
        if plan_file is not None:
            plan, ctx, prof = _saved_plan(plan_file, profile, model)
            model = model if model is not None else plan.settings.get("model")
        else:
            s = settings or resolve_settings(profile, model, refuse_below_bar=not build_anyway, **plan_kw)
            _check_validation_context(s.budget.context)
            log("[1/5] plan" + (f" (quality after healing {s.heal.steps} steps)" if s.heal else ""))
            plan, ctx = plan_from_settings(s, progress=progress, log=log, keep=handed)
            prof = s.profile
        if not build_anyway:
            refuse_missed_bar(plan, prof.name)
        return execute(
            plan,
            ctx,
            prof,
            out,
            model_spec=model,
            max_tries=max_tries,
            mmlu_per_subject=mmlu_per_subject,
            repeats=repeats,
            progress=progress,
            log=log,
            handed=handed,
        )
    finally:
        shutil.rmtree(handed, ignore_errors=True)


def refuse_missed_bar(plan: Plan, profile: str) -> None:
    """A plan whose best candidate is predicted over the quality bar is refused before any merge,
    export or validation (``--build-anyway`` builds it): one line with its figures and the ways
    to make it pass."""
    best = Candidate(**plan.choice.predicted)
    bar = plan.budget.max_quality_loss
    if best.kl > bar:
        raise UserError(bar_missed_line(best, bar, profile, at_least=False, heals=plan.heal is not None))


def _check_validation_context(context: int) -> None:
    if context < context_needed():  # found now, not after the plan, merge and heal
        raise UserError(
            f"--context {context} is too small for the validation run "
            f"(512-token prompt + 128 generated tokens); use at least {context_needed()}"
        )


def _saved_plan(plan_file: str | Path, profile: str, model: str | None) -> tuple[Plan, object, Profile]:
    """A saved plan, checked against this run: same mka-edge, same profile content, same model
    weights; refused in one line otherwise, before anything is written."""

    plan = load_plan(Path(plan_file))
    if plan.mka_edge != __version__:
        raise UserError(f"--plan {plan_file} was made by mka-edge {plan.mka_edge}, this is {__version__}; plan again")
    prof = load_profile(profile)
    if plan.profile.get("fingerprint") != profile_fingerprint(prof):
        raise UserError(
            f"--plan {plan_file} is for profile {plan.profile.get('name')!r}, not {prof.name!r} as given "
            f"(or that profile changed since); plan again with --profile {profile}"
        )
    if plan.format != prof.target.name:
        raise UserError(
            f"--plan {plan_file} is a {plan.format} plan but profile {prof.name} runs {prof.runtime}; plan again"
        )
    _check_validation_context(plan.budget.context)
    spec = model if model is not None else plan.settings.get("model")
    load = ModelSettings.from_load_options(plan.settings.get("merge_opts"))
    dtype = check_load(read_shape(spec, trust_remote_code=load.trust_remote_code), load.device, load.dtype)
    ctx = load_context(spec, load, dtype)
    if ctx.lm.fingerprint != plan.model.get("fingerprint"):
        raise UserError(
            f"--plan {plan_file} was made for model {plan.model.get('spec')!r}, not for "
            f"{spec or DEFAULT_MODEL!r} (weights differ); plan again for this model or drop --model"
        )
    return plan, ctx, prof


@dataclass
class Tried:
    """One candidate merged, exported and validated: the record of the try and what packaging needs."""

    attempt: Attempt
    artifact: Path
    summary: object  # the target's ArtifactSummary
    validation: ValidationResult
    merged_dir: Path | None


def try_candidate(cand: Ranked, i: int, plan: Plan, ctx, target, tmp: Path, **kw) -> Tried:
    """Merge (and heal), export and validate one ranked plan. ``kw``: heal, ref_spec, handed,
    mmlu_per_subject, repeats, progress, log."""
    heal, log, progress = kw["heal"], kw["log"], kw["progress"]
    k, quant, method, cache = cand.k, cand.quant, cand.method, cand.cache
    work, context = tmp / ".work", plan.budget.context
    attn = f"A{cand.attn_layers}" if cand.attn_layers is not None else ""
    tag = f"{Path(kw['ref_spec']).stem}-K{k}{attn}-{quant}{'-imat' if cand.imatrix else ''}"
    log(f"[2/5] merge: K={k} ({method})" if k else "[2/5] merge: none (K=0)")
    heal_record = None
    if k:
        if heal:
            log(f"      healing: {heal.steps} steps ({heal.train})")
        made = produce(
            ctx, k, method, plan.choice.alpha, work / f"model-{method}-k{k}", heal, progress=progress, log=log
        )
        merged_dir, heal_record = made.folder, made.heal
        lm = load_model(str(merged_dir), dtype=ctx.model.dtype)  # as computed: 16 bits stay 16 bits
    else:
        merged_dir, lm = None, ctx.lm
    handed = kw["handed"]
    moved = target.made_by_probe(handed, lm, quant, cand.imatrix) if handed is not None and not k else None
    log(
        f"[3/5] export: {target.name.upper()} {quant}{' with an importance matrix' if cand.imatrix else ''} "
        f"({target.runtime_label}{'; the file the plan measured, moved' if moved else ''})"
    )
    art = tmp / target.artifact_name(tag)
    mixed = {"tensor_types": cand.tensor_types} if cand.tensor_types else {}  # a mixed plan's per-tensor types
    summary = target.export(
        lm, art, quant, context=context, progress=progress, imatrix=cand.imatrix, made=moved, **mixed
    )
    del lm  # a merged model is not needed again; the reference below is the source in ctx
    killpoint("build:after-export")
    log(f"[4/5] validate in {target.runtime_label} (KV cache {cache})")
    ctx.reset()  # the source's own stack: the reference the artifact is measured against
    val = validate_artifact(
        art,
        kw["ref_spec"],
        reference_model=_as_reference(ctx),
        threads=usable_cpus(),
        context=context,
        kv_type=target.validation_kv_type(cache),
        out=work / f"validation-{i}",
        thresholds=Thresholds(max_kld=plan.budget.max_quality_loss),
        repeats=kw["repeats"],
        mmlu_per_subject=kw["mmlu_per_subject"],
        progress=progress,
    )
    healed = None
    if heal_record:
        healed = {
            "steps": heal.steps,
            "train": heal.train,
            "heldout_kl_before": heal_record["heldout_before"]["kl"],
            "heldout_kl_after": heal_record["heldout_after"]["kl"],
        }
    attempt = Attempt(method, k, quant, cand.imatrix, cache, cand.attn_layers, cand.kl, val.kl, val.passed, healed)
    return Tried(attempt, art, summary, val, merged_dir)


def execute(
    plan: Plan,
    ctx,
    prof: Profile,
    out: Path,
    *,
    model_spec: str | None = None,
    max_tries: int = 3,
    mmlu_per_subject: int = 1,
    repeats: int = 3,
    progress: bool = True,
    log=print,
    handed: Path | None = None,
) -> dict:
    """Merge, (heal,) export, validate and package the plan's best candidate, falling back to the
    next ones when the artifact misses the measured quality bar.  ``handed``: the plan's hand-over
    folder; a candidate that merges nothing is exported by moving the probe's file found there."""
    target = prof.target
    heal = HealConfig(**plan.settings["heal"]) if plan.settings.get("heal") else None
    check_host(plan, ctx.lm, target, out, heal is not None, max_tries)
    max_kl = plan.budget.max_quality_loss
    tries = plan.ranked[:max_tries]
    attempts: list[Attempt] = []
    common = dict(
        heal=heal,
        ref_spec=model_spec or DEFAULT_MODEL,
        handed=handed,
        mmlu_per_subject=mmlu_per_subject,
        repeats=repeats,
        progress=progress,
        log=log,
    )
    with atomic_dir(out) as tmp:
        for i, cand in enumerate(tries):
            t = try_candidate(cand, i, plan, ctx, target, tmp, **common)
            attempts.append(t.attempt)
            if t.attempt.passed:
                break
            log(f"      measured KL {t.attempt.measured_kl:.3f} misses the bar {max_kl:g}; trying the next plan")
            shutil.rmtree(t.artifact) if t.artifact.is_dir() else t.artifact.unlink()
            if t.merged_dir and not any(c.merge_key == cand.merge_key for c in tries[i + 1 :]):
                shutil.rmtree(t.merged_dir, ignore_errors=True)  # disk_need_bytes counts one merged folder
        else:
            raise UserError(
                f"no plan met the quality bar ({max_kl:g} nats) in {len(attempts)} tries: "
                + ", ".join(f"K={a.k} {a.quant} {a.cache}: {a.measured_kl:.3f}" for a in attempts)
                + "; raise --max-quality-loss or --budget-mb"
            )
        log("[5/5] package")
        a = t.attempt
        chosen = {
            "method": a.method,
            "k": a.k,
            "quant": a.quant,
            "cache": a.cache,
            "imatrix": a.imatrix,
            "attn_layers": a.attn_layers,
            "artifact": t.artifact.name,
        }
        pred = predict_artifact(tmp, chosen, t.summary, plan, t.validation.latency, ctx.model.config, prof)
        release_freed_memory()  # the export's and validation's freed buffers, before the similarity's states
        # the layer similarity explains a merge; a plan that merges nothing skips its pass (85 s at 1.5B)
        similarity = ctx.similarity().matrix.numpy() if a.k else None
        tried = [x.to_json() for x in attempts]
        manifest = package(tmp, plan, chosen, t.summary, t.validation, tried, t.merged_dir, prof, pred, similarity)
        shutil.rmtree(tmp / ".work", ignore_errors=True)
    manifest["out"] = str(out)
    return manifest


def _as_reference(ctx):
    """The source the build holds serves as validation's reference instead of a second copy, in
    the dtype and on the device the build computes in (the reference's cache key covers the dtype:
    models.loading keys a 16-bit load apart).  Not when --max-memory spread it over the disk: a
    reference pass through offloaded weights reads them all from the disk once per chunk."""
    return None if ctx.lm.max_memory else ctx.lm


def predict_artifact(folder: Path, chosen: dict, summary, plan: Plan, latency: dict, config, prof: Profile) -> dict:
    """The device predictions for the artifact as built (its own weight bytes, not the plan's
    estimate), and the host prediction for the validation run beside the measured peak."""
    target = prof.target
    shape = Shape.from_config(config).with_layers(summary.block_count, chosen.get("attn_layers"))
    rm = target.report_memory(
        folder, chosen["artifact"], chosen["quant"], summary, plan, latency, shape, chosen.get("cache", BASELINE_CACHE)
    )
    eff, eff_src = efficiency(target.name, plan.model.get("fingerprint"))
    embd = float(plan.quant_costs.get(chosen["quant"], {}).get("embd_bytes", 0.0))  # as the plan counted it
    tps = predict_tps(
        prof.bandwidth_gbps, bytes_per_token(rm.weight_bytes, rm.kv_full_bytes, shape.tied_embeddings, embd), eff
    ) * plan.cache_costs.get(chosen.get("cache", ""), {}).get("speed_factor", 1.0)
    memory = {
        "runtime": target.runtime_label,
        "host_run": rm.host_run,
        "predicted_device_mb": rm.device.total_mb,
        "predicted_device_terms": rm.device.as_dict(),
        "predicted_host_mb": rm.host.total_mb,
        "predicted_host_context": rm.host_context,
        "measured_host_rss_mb": latency["peak_rss_mb"],
        "host_error_pct": 100 * (rm.host.total_mb / latency["peak_rss_mb"] - 1),
    }
    return {"memory": memory, "generation_tps": tps, "efficiency_source": eff_src}
