"""The library call behind each CLI command: settings records in, a result out, and the lines a
person reads about it. Nothing here parses a command line (cli.py does, from the records in
settings.py) and nothing below here prints: progress goes through ``log``.

Why a module of its own: the command line stays a thin shell (parse, call, print), and a script or
a test drives exactly what a command does without click.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .kv_cache import BASELINE_CACHE
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
)
from .target_protocols import Exporter

Log = Callable[[str], None]


@dataclass
class Outcome:
    """What a command prints, and whether it passed (validate's thresholds: exit code 1 when not)."""

    text: str
    passed: bool = True
    failure: str = ""


def recipes() -> Outcome:
    """The model recipes shipped with mka-edge."""
    from .models.recipes import find_recipe, known_recipes

    rows = []
    for name in known_recipes():
        r = find_recipe(name)
        src = r["source"].get("hub_id") or r["source"].get("path") or ""
        rows.append(f"{name:16} {r.get('architecture', '?'):8} {r.get('num_layers', '?'):>3} layers  {src}")
    return Outcome("\n".join(rows))


def profiles() -> Outcome:
    """The device profiles shipped with mka-edge (profiles/*.yaml)."""
    from .profiles import known_profiles, load_profile

    rows = [
        f"{'profile':22} {'runtime':12} {'memory':>8} {'budget':>8} {'GB/s':>7} {'ctx':>6} {'tok/s':>6} {'max KL':>7}"
    ]
    for name in known_profiles():
        p = load_profile(name)
        rows.append(
            f"{p.name:22} {p.runtime:12} {p.memory_mb:>6}MB {p.budget_mb:>6}MB {p.bandwidth_gbps:>7.1f} "
            f"{p.context_length:>6} {p.min_tokens_per_s:>6g} {p.max_quality_loss:>7g}"
        )
    return Outcome("\n".join(rows))


def _context(model: ModelSettings):
    from .mka.context import build_context

    return build_context(model=model.model, **model.check().load_options())


def check_device(device: str) -> None:
    """--device and --max-memory agree (checked before anything loads)."""
    from .device import check_placement, current_max_memory, resolve_device

    resolve_device(device)
    check_placement(device, current_max_memory())


def analyze(model: ModelSettings, run: AnalyzeRun) -> Outcome:
    """Layer similarity: similarity.json, a heatmap and the most similar adjacent pairs."""
    from .analysis import analyze as similarity

    res = similarity(_context(model), Path(run.out), seeds=run.seeds)
    lines = [f"{res['num_layers']} layers; most similar adjacent pairs (NMI):"]
    lines += [f"  layers {r['pair'][0]:>2}-{r['pair'][1]:<2}  {r['similarity']:.3f}" for r in res["top_adjacent"]]
    for s, rows in res.get("seed_check", {}).items():
        lines.append(f"  seed {s}: " + ", ".join(f"{r['pair'][0]}-{r['pair'][1]}" for r in rows))
    lines.append(f"wrote {Path(run.out) / 'similarity.json'} and {Path(run.out) / 'similarity.png'}")
    return Outcome("\n".join(lines))


def merge(model: ModelSettings, run: MergeRun, heal: HealSettings, log: Log) -> Outcome:
    """Merge K layers away (healed when asked) into a Hugging Face folder with its merge log."""
    from .merge_log import MergeStep
    from .merging import check_out
    from .mka.methods import check_alpha
    from .produce import produce

    alpha = check_alpha(run.alpha)
    if run.k < 1:
        raise UserError(f"--merge-layers must be at least 1 (got {run.k})")
    cfg = heal.config(model.model, model.calibration, model.seed)
    cfg = cfg if cfg.steps else None
    out = Path(run.out)
    check_out(out)
    made = produce(
        _context(model),
        run.k,
        run.method,
        alpha,
        out,
        cfg,
        heldout=run.heldout_chunks,
        use_cache=not run.no_cache,
        log=log,
    )
    lines = []
    if made.heal:
        b, a = made.heal["heldout_before"], made.heal["heldout_after"]
        lines.append(
            f"healed {cfg.steps} steps ({cfg.train}): held-out KL {b['kl']:.4f} -> {a['kl']:.4f}, "
            f"perplexity {b['ppl']:.2f} -> {a['ppl']:.2f}"
        )
    mlog = made.merge_log
    lines.append(f"{mlog['layers_before']} -> {mlog['layers_after']} layers with {run.method} (alpha {alpha})")
    for st in mlog["steps"]:
        what = MergeStep.from_json(st).describe()
        q = st.get("heldout") or {}
        extra = f"  held-out KL {q['kl']:.4f}  ppl {q['ppl']:.2f}  top-1 {q['top1']:.3f}" if q else ""
        lines.append(f"  K={st['k']:>2} [{st['method']}] {what:34} calib KL {st['calib_kl']:.4f}{extra}")
    lines.append(f"wrote {out} (merge_log.json inside)")
    return Outcome("\n".join(lines))


def heal(run: HealRun, heal: HealSettings, log: Log) -> Outcome:
    """Heal a merged model by distillation from its reference; quality before and after."""
    from .heal.distill import heal as distil

    check_device(run.device)
    cfg = heal.config(run.model, run.calibration, run.seed, run.heldout_chunks, flag="--steps")
    rec = distil(run.model, Path(run.out), cfg, reference=run.reference, device=run.device, log=log)
    b, a = rec["heldout_before"], rec["heldout_after"]
    return Outcome(
        f"healed {run.model} -> {run.out}: {rec['trained'][0]}, {rec['steps_run_here']} steps in "
        f"{rec['seconds']:.0f} s ({rec['seconds_per_step']:.2f} s/step)\n"
        f"held-out KL {b['kl']:.4f} -> {a['kl']:.4f}; perplexity {b['ppl']:.2f} -> {a['ppl']:.2f} "
        f"(reference {a['ref_ppl']:.2f}); top-1 {100 * b['top1']:.1f}% -> {100 * a['top1']:.1f}%"
    )


def evaluate(run: EvalRun) -> Outcome:
    """KL, perplexity, top-1 and MMLU of a model against its reference."""
    from .cache import atomic_write_text
    from .evaluation import evaluate as measure

    check_device(run.device)
    res = measure(run.model, run.reference, run.heldout_chunks, run.mmlu_per_subject, run.device)
    q = res["heldout"]
    lines = [
        f"model {res['model']} vs reference {res['reference']}",
        f"  held-out ({q['tokens']} positions): KL {q['kl']:.4f} nats  ppl {q['ppl']:.2f} (ref {q['ref_ppl']:.2f}, "
        f"{q['ppl_change_pct']:+.1f}%)  top-1 {100 * q['top1']:.1f}%",
    ]
    for name in ("mmlu", "mmlu_cloze"):
        if name in res:
            m = res[name]
            lines.append(
                f"  {name:10} {100 * m['accuracy']:.1f}% [{100 * m['ci95'][0]:.1f}, {100 * m['ci95'][1]:.1f}] "
                f"on {m['n']} questions (chance 25%)"
            )
    if run.out:
        atomic_write_text(Path(run.out), json.dumps(res, indent=2))
    return Outcome("\n".join(lines))


def export(run: ExportRun) -> Outcome:
    """One model written as one artifact of one format and type."""
    from .targets import get_target

    target: Exporter = get_target(run.fmt)
    options = run.target_options()
    s = target.export_spec(run.model, Path(run.out), run.quant or target.default_export_quant, options)
    return Outcome(target.describe_export(s))


def validate(artifact: str, run: ValidateRun) -> Outcome:
    """An artifact run in its runtime and checked against its reference and thresholds."""
    from .profiles import load_profile
    from .validate.checks import Thresholds
    from .validate.core import validate_artifact

    if run.repeats < 1 or run.chunks < 1:
        raise UserError("--repeats and --chunks must be at least 1")
    r = validate_artifact(
        artifact,
        run.reference,
        profile=load_profile(run.profile) if run.profile else None,
        threads=run.threads,
        context=run.context,
        out=run.out,
        thresholds=Thresholds(run.max_kld, run.min_tokens_per_s),
        repeats=run.repeats,
        chunks=run.chunks,
        mmlu_per_subject=run.mmlu_per_subject,
        kv_type=run.kv_type,
        flash_attn=None if run.flash_attn == "auto" else run.flash_attn,
    )
    text = (r.out / "validation.md").read_text() + f"\nwrote {r.out}/validation.json"
    failed = r.failures()
    return Outcome(text, r.passed, f"validation failed ({failed})" if failed else "")


def plan_settings(plan: PlanOptions, model: ModelSettings, heal: HealSettings, *, refuse_below_bar: bool = False):
    """planning.PlanSettings from the records: the one place the command line's plan becomes the solver's."""
    from .planning import resolve_settings

    return resolve_settings(
        plan.profile,
        model.model,
        **plan.solver_options(),
        merge_opts=model.check(),
        heal=heal.config(model.model, model.calibration, model.seed),
        refuse_below_bar=refuse_below_bar,
    )


def plan(plan: PlanOptions, model: ModelSettings, heal: HealSettings, run: PlanRun, log: Log) -> Outcome:
    """Pick the merge, type and cache that fit a device and say why; plan.json when ``out``."""
    from .exporters.paths import check_creatable
    from .planning import plan_from_settings, write_plan
    from .report import plan_table

    out = run.out
    if out:
        check_creatable(Path(out))
    p, _ = plan_from_settings(plan_settings(plan, model, heal), log=log)
    text = plan_table(p)
    return Outcome(text + (f"\nwrote {write_plan(p, Path(out))}" if out else ""))


def build(plan: PlanOptions, model: ModelSettings, heal: HealSettings, run: BuildRun, log: Log) -> Outcome:
    """Plan (or read --plan), merge, heal, export, validate and package."""
    from .build import build as make
    from .build import check_out

    if run.max_tries < 1:
        raise UserError("--max-tries must be at least 1")
    check_out(Path(run.out), run.force)  # before the settings' checks, as the build's first step
    common = dict(force=run.force, build_anyway=run.build_anyway, max_tries=run.max_tries, log=log)
    if run.plan_file:
        given = [
            spec.flags[0]
            for rec in (plan, model, heal)
            for f, spec in rec.specs()
            if spec.decides_plan and f.name in rec.given
        ]
        if given:
            flags = ", ".join(given)
            raise UserError(
                f"--plan executes a saved plan, so {flags} cannot change it; drop them, or plan again with them"
            )
        m = make(
            plan.profile,
            model.model,
            Path(run.out),
            plan_file=run.plan_file,
            mmlu_per_subject=run.mmlu_per_subject,
            **common,
        )
    else:
        s = plan_settings(plan, model, heal, refuse_below_bar=not run.build_anyway)
        m = make(plan.profile, model.model, Path(run.out), settings=s, mmlu_per_subject=run.mmlu_per_subject, **common)
    p = m["plan"]
    return Outcome(
        f"built {m['out']}/{m['artifact']}: K={p['k']}, {p['quant']}, KV cache {p.get('cache', BASELINE_CACHE)}; "
        f"measured KL {m['host_figures']['accuracy']['kl']:.3f}; predicted device memory "
        f"{m['device_predictions']['memory_mb']:.0f} MB; see {m['out']}/report.md"
    )
