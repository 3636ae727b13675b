"""`mka-edge build`: plan -> merge -> export -> validate -> package.  Nothing else orchestrates.
The profile's runtime decides the format: GGUF for llama.cpp, an ONNX folder for onnxruntime.

The package folder is assembled under a temporary name and renamed at the end, so an
interrupted or failed build leaves nothing at --out.  If the artifact misses the profile's
quality bar (measured, not predicted), the next-best plan is tried, up to --max-tries.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from exporters.paths import check_creatable

from .cache import atomic_dir
from .errors import UserError


def _free_ram_mb() -> float:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("inf")


def check_out(out: Path, force: bool) -> None:
    """--out must be a new or empty folder (or --force) whose nearest existing parent is a writable
    folder: found now, not after the plan, merge and validation."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise UserError(f"--out {out} exists and is not empty; choose a new folder or pass --force to replace it")
    check_creatable(out)


def check_host(n_params: int, out: Path) -> None:
    """Enough disk for the F32 export plus the artifact, and RAM for a merged copy, before starting."""
    need_disk = n_params * 4 * 2.2 / 2**20
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    free_disk = shutil.disk_usage(parent).free / 2**20
    if free_disk < need_disk:
        raise UserError(f"{parent} has {free_disk:.0f} MB free; the build needs about {need_disk:.0f} MB "
                        f"(F32 export + artifact); free disk space or choose another --out")
    need_ram = n_params * 4 * 1.5 / 2**20
    if _free_ram_mb() < need_ram:
        raise UserError(f"this host has {_free_ram_mb():.0f} MB of RAM available; the build needs about {need_ram:.0f} MB; "
                        f"close other programs or build on a larger machine")


def build(profile: str, model: str | None, out: str | Path, *, force: bool = False, budget_mb: float | None = None,
          context: int | None = None, max_quality_loss: float | None = None, method: str = "sleb",
          alpha: str = "calibrated", k_max: int | None = None, quants: list[str] | None = None, max_tries: int = 3,
          mmlu_per_subject: int = 1, repeats: int = 3, merge_opts: dict | None = None, progress: bool = True,
          heal=None, heal_points: int = 4, log=print) -> dict:
    """``heal``: a HealConfig (steps 0 = the profile's heal_steps, if any); the plan then uses
    healed quality (healed at ``heal_points`` values of K) and every merged model is healed before export."""
    from exporters.gguf import export_loaded
    from exporters.onnx import export_loaded_onnx
    from .merging import merge
    from .models.loading import load_model
    from .planning import plan_with_context
    from .profiles import load_profile
    from .report import package
    from .validate.checks import Thresholds
    from .validate.core import validate_artifact

    out = Path(out)
    check_out(out, force)
    prof = load_profile(profile)
    onnx = prof.format == "onnx"
    from .heal.distill import effective_heal

    heal = effective_heal(heal, prof)
    from .validate.core import context_needed

    if (context or prof.context_length) < context_needed():     # found now, not after the plan, merge and heal
        raise UserError(f"--context {context or prof.context_length} is too small for the validation run "
                        f"(512-token prompt + 128 generated tokens); use at least {context_needed()}")
    log("[1/5] plan" + (f" (quality after healing {heal.steps} steps)" if heal else ""))
    plan, ctx = plan_with_context(profile, model, budget_mb=budget_mb, context=context, max_quality_loss=max_quality_loss,
                                  method=method, alpha=alpha, k_max=k_max, quants=quants, progress=progress,
                                  merge_opts=merge_opts, heal=heal, heal_points=heal_points, log=log)
    check_host(sum(p.numel() for p in ctx.model.parameters()), out)
    max_kl = plan["budget"]["max_quality_loss"]
    ref_spec = model or "smollm2-135m"
    attempts = []
    with atomic_dir(out) as tmp:
        work = tmp / ".work"
        for i, cand in enumerate(plan["ranked"][:max_tries]):
            k, quant = cand["k"], cand["quant"]
            tag = f"{Path(ref_spec).stem}-K{k}-{quant}"
            log(f"[2/5] merge: K={k} ({method})" if k else "[2/5] merge: none (K=0)")
            heal_record = None
            if k:
                merged_dir = work / f"merged-k{k}"
                merge(ctx, k, method, alpha, merged_dir, heldout=0, progress=progress)
                if heal:
                    from .heal.distill import heal as run_heal, teacher_from

                    log(f"      healing: {heal.steps} steps ({heal.train})")
                    healed_dir = work / f"healed-k{k}"
                    heal_record = run_heal(str(merged_dir), healed_dir, heal, progress=progress, log=log,
                                           reference_model=teacher_from(ctx.lm), device=str(ctx.device))
                    merged_dir = healed_dir
                lm = load_model(str(merged_dir))
            else:
                merged_dir, lm = None, ctx.lm
            if onnx:
                log(f"[3/5] export: ONNX {quant} (onnxruntime-genai builder)")
                art = tmp / f"{tag}-onnx"
                summary = export_loaded_onnx(lm, art, quant, context=plan["budget"]["context"], progress=progress)
                log("[4/5] validate in onnxruntime")
            else:
                log(f"[3/5] export: GGUF {quant}")
                art = tmp / f"{tag}.gguf"
                summary = export_loaded(lm, art, quant, progress=progress)
                log("[4/5] validate in llama.cpp")
            val = validate_artifact(art, ref_spec, threads=os.cpu_count(), context=plan["budget"]["context"],
                                    kv_type=None if onnx else prof.kv_cache_type, out=work / f"validation-{i}",
                                    thresholds=Thresholds(max_kld=max_kl), repeats=repeats,
                                    mmlu_per_subject=mmlu_per_subject, progress=progress)
            attempts.append({"k": k, "quant": quant, "measured_kl": val["accuracy"]["kl"], "passed": val["passed"],
                             **({"heal": {"steps": heal.steps, "train": heal.train,
                                          "heldout_kl_before": heal_record["heldout_before"]["kl"],
                                          "heldout_kl_after": heal_record["heldout_after"]["kl"]}} if heal_record else {})})
            if val["passed"]:
                break
            log(f"      measured KL {val['accuracy']['kl']:.3f} misses the bar {max_kl:g}; trying the next plan")
            shutil.rmtree(art) if art.is_dir() else art.unlink()
        else:
            raise UserError(f"no plan met the quality bar ({max_kl:g} nats) in {len(attempts)} tries: "
                            + ", ".join(f"K={a['k']} {a['quant']}: {a['measured_kl']:.3f}" for a in attempts)
                            + "; raise --max-quality-loss or --budget-mb")
        log("[5/5] package")
        chosen = {"k": k, "quant": quant, "artifact": art.name}
        manifest = package(tmp, plan, ctx, chosen, summary, val, attempts, merged_dir, prof)
        shutil.rmtree(work, ignore_errors=True)
    manifest["out"] = str(out)
    return manifest
