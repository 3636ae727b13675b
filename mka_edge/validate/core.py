"""`mka-edge validate`, format-independent: the reference model runs here in PyTorch, once, and is
cached; the artifact runs in its real runtime in child processes (one for accuracy, one for
latency, so a crash in the runtime cannot take the caller down and peak RSS is the runtime's).
What differs per format — how to read the artifact back, check its vocabulary, which worker runs
it and how the report describes it — lives in each target's validation adapter (mka_edge/targets/)."""

from __future__ import annotations

import gc
import json
import os
import platform
from dataclasses import replace
from pathlib import Path

import numpy as np

from .. import __version__
from ..cache import atomic_write_text
from ..errors import UserError
from ..models.loading import load_model
from ..precedence import resolved
from ..quality import wilson
from .checks import Thresholds, evaluate
from .formats import format_for_artifact
from .jobs import AccuracyJob, LatencyJob
from .reference import compact_reference, mmlu_jobs, reference_mmlu
from .result import ValidationResult
from .runner import run_child


def reference_spec(info: dict, reference: str | None) -> str:
    if reference:
        return reference
    src = (info.get("provenance") or {}).get("source")
    if not src:
        raise UserError(f"{info['path']} does not say which model it came from; pass --reference MODEL")
    return src


def context_needed(prompt_tokens: int = 512, gen_tokens: int = 128) -> int:
    """The context a latency run needs: the prompt, the generated tokens and a small margin."""
    return prompt_tokens + gen_tokens + 16


def validate_artifact(
    artifact: str | Path,
    reference: str | None = None,
    *,
    profile=None,
    threads: int | None = None,
    context: int | None = None,
    out: str | Path | None = None,
    thresholds: Thresholds | None = None,
    repeats: int = 3,
    chunks: int = 4,
    gen_tokens: int = 128,
    prompt_tokens: int = 512,
    mmlu_per_subject: int = 1,
    kv_type: str | None = None,
    flash_attn: str | None = None,
    progress: bool = True,
    timeout_s: float = 3600,
    reference_model=None,
) -> ValidationResult:
    """Validate ``artifact`` in its runtime against ``reference`` (loaded here), or against
    ``reference_model``, a LoadedModel of that reference the caller already holds (a build's
    source: loading it a second time held two copies at the reference's peak)."""

    artifact = Path(artifact)
    fmt = format_for_artifact(artifact)
    if profile is not None and profile.format != fmt.name:
        raise UserError(
            f"profile {profile.name} runs {profile.runtime} ({profile.format}) but {artifact} is {fmt.name}; "
            f"validate it with a {fmt.name} profile or without --profile"
        )
    info = fmt.inspect(artifact)  # refuses corrupt/truncated artifacts before the runtime sees them
    out = Path(out) if out else fmt.default_out(artifact)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    # settings and their checks before the reference model loads
    threads = resolved(threads, profile, "threads", max(1, os.cpu_count() or 1))
    if threads < 1:
        raise UserError(f"--threads must be at least 1 (got {threads})")
    mode = fmt.cache_mode(
        resolved(kv_type, profile, "kv_cache_type"),
        flash_attn or (None if profile is None or profile.flash_attention else "off"),
        info,
    )
    need = context_needed(prompt_tokens, gen_tokens)
    context = resolved(context, profile, "context_length", 2048)
    if info.get("model_context") and context > int(info["model_context"]):
        raise UserError(
            f"--context {context} is longer than the model's context length ({info['model_context']}); "
            f"use at most {info['model_context']}"
        )
    if context < need:
        raise UserError(
            f"--context {context} is too small for a {prompt_tokens}-token prompt and {gen_tokens} generated tokens; use at least {need}"
        )
    ref_spec = reference_spec(info, reference)
    lm = reference_model if reference_model is not None else load_model(ref_spec)
    fmt.check_vocab(artifact, info, lm)
    ref_path, ref_summary = compact_reference(lm, chunks, progress=progress)
    jobs, letters = mmlu_jobs(lm.tokenizer, mmlu_per_subject)
    ref_mmlu = reference_mmlu(lm, jobs, letters, progress=progress)

    prompt = np.load(ref_path)["ids"].reshape(-1)[:prompt_tokens].tolist()
    if len(prompt) < prompt_tokens:
        raise UserError(f"held-out text gives only {len(prompt)} prompt tokens; lower --prompt-tokens")
    del lm
    gc.collect()

    path = str(info.get("model_path", artifact))
    acc = run_child(
        fmt.worker,
        AccuracyJob(path, threads, reference=str(ref_path), cache_mode=mode, mmlu=jobs, letter_ids=letters),
        timeout_s,
        f"accuracy run in {fmt.runtime_name}",
        progress,
    )
    lat = run_child(
        fmt.worker,
        LatencyJob(
            path, threads, context=context, prompt_ids=prompt, gen_tokens=gen_tokens, repeats=repeats, cache_mode=mode
        ),
        timeout_s,
        f"latency run in {fmt.runtime_name}",
        progress,
    )
    if "mmlu_correct" in acc:
        lo, hi = wilson(acc["mmlu_correct"], acc["mmlu_n"])
        acc["mmlu"] = {
            "accuracy": acc.pop("mmlu_correct") / acc["mmlu_n"],
            "ci95": [lo, hi],
            "n": acc.pop("mmlu_n"),
            "chance": 0.25,
        }

    th = thresholds or Thresholds()
    if profile is not None:
        th = Thresholds(
            th.max_kld if th.max_kld is not None else profile.max_quality_loss,
            th.min_tokens_per_s if th.min_tokens_per_s is not None else profile.min_tokens_per_s,
        )
    result = ValidationResult(
        __version__,
        fmt.name,
        {k: v for k, v in info.items() if k != "provenance"} | {"provenance": info.get("provenance")},
        {"model": ref_spec, **ref_summary, "mmlu": ref_mmlu},
        {
            "name": fmt.runtime_name,
            "version": fmt.runtime_version(),
            "threads": threads,
            "kv_cache_type": lat.get("kv_cache_type", mode),
            "attention": lat.get("attention", "runtime's own"),
            "context": context,
        },
        {
            "label": "host figures: measured on this machine, not predictions for the target device",
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "system": platform.system(),
        },
        acc,
        lat | {"prompt_tokens": len(prompt), "gen_tokens": gen_tokens, "repeats": repeats},
        profile.name if profile else None,
        th.as_dict(),
        evaluate(th, acc["kl"], lat["gen_tps"]["median"]),
    )
    out.mkdir(parents=True, exist_ok=True)
    written = result.to_json()
    atomic_write_text(out / "validation.json", json.dumps(written, indent=2))
    atomic_write_text(out / "validation.md", markdown(written, fmt.artifact_rows(result.artifact)))
    return replace(result, out=out)


def markdown(r: dict, artifact_rows: list[tuple[str, str]]) -> str:
    a, lat, art = r["accuracy"], r["latency"], r["artifact"]
    rows = artifact_rows + [
        ("layers", str(art["block_count"])),
        ("mean KL to reference (nats)", f"{a['kl']:.4f}"),
        ("perplexity (reference)", f"{a['ppl']:.2f} ({a['ref_ppl']:.2f}), {a['ppl_change_pct']:+.1f}%"),
        ("top-1 agreement", f"{100 * a['top1']:.1f}%"),
    ]
    if "mmlu" in a:
        m, rm = a["mmlu"], r["reference"].get("mmlu") or {}
        rows.append(
            (
                "MMLU letter accuracy [95% CI] (reference)",
                f"{100 * m['accuracy']:.1f}% [{100 * m['ci95'][0]:.0f}-{100 * m['ci95'][1]:.0f}] of {m['n']}"
                + (f" ({100 * rm['accuracy']:.1f}%)" if rm else "")
                + ", chance 25%",
            )
        )
    for key, label in (
        ("prompt_tps", f"prompt tokens/s ({lat['prompt_tokens']}-token prompt)"),
        ("gen_tps", f"generation tokens/s ({lat['gen_tokens']} tokens)"),
        ("ttft_s", "time to first token (s)"),
    ):
        v = lat[key]
        rows.append((label, f"{v['median']:.3g} (min {v['min']:.3g}, max {v['max']:.3g}, {lat['repeats']} runs)"))
    rows += [
        ("load time (s)", f"{lat['load_s']:.2f}"),
        (
            "peak RSS (MiB, process incl. Python)",
            f"{lat['peak_rss_mb']:.0f} (baseline before load {lat['baseline_rss_mb']:.0f})",
        ),
    ]
    name = Path(art["path"]).name
    lines = [
        f"# Validation of `{name}`",
        "",
        f"Runtime: {r['runtime']['name']} {r['runtime']['version']}, {r['runtime']['threads']} threads, "
        f"KV cache {r['runtime']['kv_cache_type']}, {r['runtime'].get('attention', 'standard')} attention, "
        f"context {r['runtime']['context']}. "
        f"Reference: `{r['reference']['model']}` on {r['reference']['chunks']} x {r['reference']['chunk_len']} held-out tokens.",
        "",
        f"**{r['host']['label']}.**",
        "",
        "| measure | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in rows]
    if r["checks"]:
        lines += ["", "| check | value | limit | result |", "|---|---|---|---|"]
        lines += [
            f"| {c['check']} | {c['value']:.4g} | {c['limit']:.4g} | {'pass' if c['passed'] else 'FAIL'} |"
            for c in r["checks"]
        ]
        lines += ["", f"**{'PASSED' if r['passed'] else 'FAILED'}**"]
    else:
        lines += ["", "No thresholds were set (use --profile, --max-kld or --min-tokens-per-s)."]
    return "\n".join(lines) + "\n"
