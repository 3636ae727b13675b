"""The package a build hands over: the artifact plus the evidence (manifest.json for machines;
report.md, plots and a model card for people; ready-to-run commands)."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from . import __version__
from .cache import atomic_write_text
from .kv_cache import BASELINE_CACHE
from .records import ArtifactSummary, Plan
from .target_protocols import Packager
from .validate.result import ValidationResult
from .versions import versions


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def same_plan(c: dict, chosen: dict) -> bool:
    """Whether candidate ``c`` (plan.json) is the plan ``chosen`` (a build's): edits, type and cache mode."""
    keys = ("method", "k", "quant", "cache")
    return all(c.get(k) == chosen.get(k) for k in keys if k in c and k in chosen)


def _report(
    plan: Plan,
    target: Packager,
    chosen: dict,
    summary: ArtifactSummary,
    val: ValidationResult,
    attempts: list,
    mem: dict,
    device_tps: float,
) -> str:
    p, ch, a, lat = plan.profile, plan.choice, val.accuracy, val.latency
    pred = next((c for c in plan.candidates if same_plan(c, chosen)), ch.predicted)
    line = target.artifact_line(chosen["artifact"], chosen["quant"], summary, plan.model["layers"])
    lines = [
        f"# mka-edge build report: {plan.model['spec']} for {p['name']}",
        "",
        f"{p['description']}",
        "",
        f"**Artifact:** {line}.",
        "",
        f"**Why this plan:** {plan.reason}.",
        "",
        "## Predicted on the device vs measured on the build host",
        "",
        "| measure | predicted (device) | measured (build host) |",
        "|---|---|---|",
        f"| peak memory ({mem['runtime']}) | {mem['predicted_device_mb']:.0f} MB of {plan.budget.memory_mb:.0f} MB budget"
        + (
            f", {margin:.0f} MB of it the memory model's measured error"
            if (margin := mem.get("predicted_device_terms", {}).get("margin_mb", 0.0))
            else ""
        )
        + f" | {mem['measured_host_rss_mb']:.0f} MB peak RSS over {mem['host_run']} (point estimate for that run: {mem['predicted_host_mb']:.0f} MB) |",
        f"| generation tokens/s | {device_tps:.1f} (from {p['bandwidth_gbps']:g} GB/s) | {lat['gen_tps']['median']:.1f} (host, not the device) |",
        f"| quality loss (mean KL, nats) | {pred['kl']:.3f} | {a['kl']:.3f} (bar {plan.budget.max_quality_loss:g}) |",
        f"| perplexity change | | {a['ppl_change_pct']:+.1f}% ({a['ppl']:.2f} vs {a['ref_ppl']:.2f}) |",
        f"| top-1 agreement | | {100 * a['top1']:.1f}% |",
    ]
    if "mmlu" in a:
        m = a["mmlu"]
        lines.append(
            f"| MMLU letter accuracy | | {100 * m['accuracy']:.1f}% [{100 * m['ci95'][0]:.0f}-{100 * m['ci95'][1]:.0f}], chance 25% |"
        )
    h = attempts[-1].get("heal") if attempts else None
    if h:
        unhealed = plan.curve.get("unhealed_kl") or []
        pred_u = unhealed[chosen["k"]] if chosen["k"] < len(unhealed) else float("nan")
        lines += [
            "",
            f"## Healing ({h['steps']} distillation steps, {h['train']})",
            "",
            "| merged model, held-out KL to the source (nats) | before healing | after healing |",
            "|---|---|---|",
            f"| predicted by the plan (merge curve) | {pred_u:.3f} | {plan.curve['kl'][chosen['k']]:.3f} |",
            f"| measured on this merge (PyTorch, before export) | {h['heldout_kl_before']:.3f} | {h['heldout_kl_after']:.3f} |",
        ]
    lines += [
        "",
        "## Plans considered (Pareto front: memory vs predicted quality)",
        "",
        "Each lever has its column; the predicted KL is the sum of the three terms after it.",
        "",
        "| edits | layers | with attention | weights | KV cache | memory MB | device tok/s (pred.) | KL (pred.) "
        "| edits KL | quant KL | cache KL | fits |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in plan.pareto:
        fits = (
            "yes" if c["fits_memory"] and c["fits_speed"] else ("no: memory" if not c["fits_memory"] else "no: speed")
        )
        star = " **chosen**" if same_plan(c, chosen) else ""
        t = c.get("kl_terms") or {}
        edits = f"{c.get('method') or plan.choice.method} K={c['k']}" if c["k"] else "none"
        attn = c["attn_layers"] if c.get("attn_layers") is not None else c["layers"]
        lines.append(
            f"| {edits} | {c['layers']} | {attn} | {c['quant']}{'+imatrix' if c.get('imatrix') else ''}{star} "
            f"| {c.get('cache', BASELINE_CACHE)} | {c['memory_mb']:.1f} | {c['tps']:.1f} | {c['kl']:.3f} "
            f"| {t.get('edits', 0):.3f} | {t.get('quant', 0):.3f} | {t.get('cache', 0):.3f} | {fits} |"
        )
    if summary.allocation:
        a = summary.allocation
        lines += [
            "",
            "## Per-tensor types (mixed plan)",
            "",
            "Each weight tensor at the type the plan allocated it, as llama.cpp wrote it; removed layers are blank "
            "(`mka_edge.tensor_types` in the GGUF holds the list).",
            "",
            "| tensor kind | MiB | types |",
            "|---|---|---|",
        ]
        for kind, b in sorted(a["kind_bytes"].items(), key=lambda kv: -kv[1]):
            types = Counter(t for _, k, t in a["cells"] if k == kind)
            named = ", ".join(f"{n} {t}" for t, n in types.most_common()) or a["outside"].get(kind, "")
            lines.append(f"| {kind} | {b / 2**20:.1f} | {named} |")
        lines += ["", "![Per-tensor types](allocation.png)"]
    lines += [
        "",
        "![Pareto plot](pareto.png)",
        "",
        "![Layer similarity](similarity.png)"
        if chosen.get("k")
        else "Layer similarity: not computed (the plan merges nothing).",
        "",
        "## Attempts",
        "",
        "| edits | quant | KV cache | predicted KL | measured KL | passed |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {t.get('method', '')} K={t['k']} | {t['quant']}{'+imatrix' if t.get('imatrix') else ''} "
        f"| {t.get('cache', BASELINE_CACHE)} | {t.get('predicted_kl') or float('nan'):.4f} | {t['measured_kl']:.4f} | {t['passed']} |"
        for t in attempts
    ]
    lines += ["", "## How the predictions are made", ""] + [f"- {k}: {v}" for k, v in plan.models.items()]
    lines += ["", "Host figures were measured on the machine that ran the build; they are not device figures."]
    return "\n".join(lines) + "\n"


def _model_card(plan: Plan, target: Packager, chosen: dict, summary: ArtifactSummary, val: ValidationResult) -> str:
    f = target.card_facts(summary)
    return f"""# {Path(chosen["artifact"]).stem}

{plan.model["spec"]} packaged by mka-edge {__version__} for **{plan.profile["name"]}**:
{chosen["k"]} removal steps ({chosen.get("method", plan.choice.method)}) from {plan.model["layers"]} transformer layers, then
{chosen["quant"]}{" with an importance matrix" if chosen.get("imatrix") else ""}, {f["how"]}; run it with the
{chosen.get("cache", BASELINE_CACHE)} KV cache (RUN.md).

- Format: {f["format"]}
- Size: {f["size"]}
- Quality loss against the source model: mean KL {val.accuracy["kl"]:.3f} nats, perplexity {val.accuracy["ppl_change_pct"]:+.1f}%,
  top-1 agreement {100 * val.accuracy["top1"]:.1f}% on held-out Wikipedia text
- Licence: that of the source model; calibration text: Wikipedia (CC BY-SA)
- Provenance: {f["provenance"]} (method, merged-layer map, source hash); details in report.md

Merged models lose knowledge and fluency in ways the figures above only sample: test on your task.
"""


def package(
    folder: Path,
    plan: Plan,
    chosen: dict,
    summary: ArtifactSummary,
    val: ValidationResult,
    attempts: list,
    merged_dir: Path | None,
    prof,
    pred: dict,
    similarity,
) -> dict:
    """Write everything beside the artifact in ``folder`` and return the manifest.  Renders only:
    the plan, the measurements (``val``), the predictions for the built artifact (``pred``:
    build.predict_artifact) and the layer similarity matrix."""
    from .plots import allocation_heatmap, pareto_plot, similarity_heatmap  # matplotlib: only when packaging

    folder = Path(folder)
    target = prof.target
    context = plan.budget.context
    mem, device_tps, eff_src = pred["memory"], pred["generation_tps"], pred["efficiency_source"]
    atomic_write_text(folder / "plan.json", json.dumps(plan.to_json(), indent=2))
    atomic_write_text(folder / "validation.json", json.dumps(val.to_json(), indent=2))
    if merged_dir is not None:
        shutil.copy(merged_dir / "merge_log.json", folder / "merge_log.json")
    if similarity is not None:  # None: a plan that merges nothing, where it explains no choice
        similarity_heatmap(similarity, folder / "similarity.png", f"{plan.model['spec']}: layer similarity (NMI)")
    chosen_c = next((c for c in plan.candidates if same_plan(c, chosen)), plan.choice.predicted)
    pareto_plot(
        plan.candidates,
        plan.pareto,
        chosen_c,
        plan.budget.memory_mb,
        folder / "pareto.png",
        f"{plan.model['spec']} on {prof.name}: plans",
    )
    if summary.allocation:  # a mixed plan: every tensor's type, removed layers blank
        a = summary.allocation
        ch = plan.choice
        own = (chosen.get("method", ch.method), chosen["k"]) == (ch.method, ch.k) and len(ch.kept_layers) == (
            summary.block_count
        )
        # the choice's edit set: blocks at their original layers, removed ones blank; a fallback
        # with other edits: the built model's own blocks
        kept = list(ch.kept_layers) if own else list(range(summary.block_count))
        n = plan.model["layers"] if own else summary.block_count
        allocation_heatmap(
            {(kept[layer], kind): t for layer, kind, t in a["cells"]},
            a["outside"],
            n,
            [i for i in range(n) if i not in kept],
            folder / "allocation.png",
            f"{plan.model['spec']}: per-tensor types as written" + ("" if own else " (blocks of the built model)"),
            a["kind_bytes"],
        )
    atomic_write_text(folder / "report.md", _report(plan, target, chosen, summary, val, attempts, mem, device_tps))
    atomic_write_text(folder / "README.md", _model_card(plan, target, chosen, summary, val))
    target.write_run_files(folder, chosen["artifact"], context, prof.threads, chosen.get("cache", BASELINE_CACHE))
    files = {}
    for f in sorted(folder.rglob("*")):
        rel = f.relative_to(folder).as_posix()
        if (
            f.is_file()
            and rel != "manifest.json"
            and not any(part.startswith(".") for part in f.relative_to(folder).parts)
        ):
            files[rel] = {"sha256": _sha256(f), "bytes": f.stat().st_size}
    manifest = {
        "mka_edge": __version__,
        "versions": versions(),
        "profile": prof.name,
        "model": plan.model,
        "format": target.name,
        "artifact": chosen["artifact"],
        "files": files,
        "plan": asdict(plan.choice),
        "reason": plan.reason,
        "host_figures": {
            "label": "measured on the build host, not the device",
            "latency": val.latency,
            "accuracy": val.accuracy,
        },
        "device_predictions": {
            "label": "predicted for the device from its profile",
            "memory_mb": mem["predicted_device_mb"],
            "generation_tps": device_tps,
            "efficiency_source": eff_src,
        },
        "memory": mem,
        "attempts": attempts,
    }
    atomic_write_text(folder / "manifest.json", json.dumps(manifest, indent=2))
    return manifest


def plan_table(plan: Plan) -> str:
    """The Pareto table and the choice, for people."""
    b = plan.budget
    lines = [
        f"profile {plan.profile['name']}: budget {b.memory_mb:.0f} MB, context {b.context}, "
        f">= {b.min_tokens_per_s:g} tok/s, quality loss <= {b.max_quality_loss:g} nats",
        "",
        f"{'edits':<12} {'layers':>6} {'attn':>4} {'weights':<16} {'cache':<13} {'memory MB':>10} "
        f"{'tok/s (device, pred.)':>22} {'KL (pred.)':>10} {'= edits':>8} {'+ quant':>8} {'+ cache':>8}  fits",
    ]
    ch = plan.choice
    for c in plan.pareto:
        fits = "yes" if c["fits_memory"] and c["fits_speed"] else ("memory" if not c["fits_memory"] else "speed")
        chosen = (c.get("method", ch.method), c["k"], c["quant"], c.get("cache", ch.cache)) == (
            ch.method,
            ch.k,
            ch.quant,
            ch.cache,
        )
        terms = c.get("kl_terms") or {}
        edits = f"{c.get('method') or ch.method}:{c['k']}" if c["k"] else "none"
        attn = c["attn_layers"] if c.get("attn_layers") is not None else c["layers"]
        weights = c["quant"] + ("+imatrix" if c.get("imatrix") else "")
        lines.append(
            f"{edits:<12} {c['layers']:>6} {attn:>4} {weights:<16} {c.get('cache', BASELINE_CACHE):<13} "
            f"{c['memory_mb']:>10.1f} {c['tps']:>22.1f} {c['kl']:>10.3f} {terms.get('edits', 0):>8.3f} "
            f"{terms.get('quant', 0):>8.3f} {terms.get('cache', 0):>8.3f}  {fits}{'  <- chosen' if chosen else ''}"
        )
    removed = f", attention removed from {len(ch.attn_removed)} of them" if ch.attn_removed else ""
    mixed = ""
    if ch.tensor_types:  # a mixed plan: how many tensors at each type, most first
        counts = Counter(ch.tensor_types.values()).most_common()
        mixed = " (" + ", ".join(f"{n} at {t}" for t, n in counts) + ")"
    lines += scope_lines(plan.scope)
    lines += [
        "",
        f"choice: {'merge K=' + str(ch.k) + ' (' + ch.method + ')' if ch.k else 'no merge'} -> {ch.layers_after} "
        f"layers{removed}, {ch.quant}{mixed}{' with an importance matrix' if ch.imatrix else ''}, KV cache {ch.cache}",
        f"why: {plan.reason}",
    ]
    return "\n".join(lines)


def scope_lines(scope: dict) -> list[str]:
    """The plan table's lines on what was measured and what was not (solver/scope.py), for people."""
    if not scope or scope.get("measure_all"):
        return ["", "measured: every quant type and cache mode (--measure-all)"] if scope else []
    if scope.get("priors"):
        modes = ", ".join(scope.get("speed_not_measured", [])) or "none"
        return [
            "",
            "measured: nothing in llama.cpp (a model too large to probe, or --quality-prior): the types' KL from "
            "published figures, the cache modes' from SmolLM2's, the quantized caches' decode speed the "
            f"conservative prior share (solver/scope.py speed_share_floor): {modes}",
        ]
    runs = f" ({scope['probe_runs']} quantize-and-run probes this time)" if "probe_runs" in scope else ""
    out = ["", f"measured: {', '.join(scope['measured'])}{runs}"]
    out += [f"not measured: {sk['quant']}: {sk['rule']}: {sk['why']}" for sk in scope.get("skipped", [])]
    out += [f"cache mode not measured: {c['mode']}: {c['why']}" for c in scope.get("caches_skipped", [])]
    if scope.get("kl_not_measured"):
        out.append(
            "cache mode KL not measured (no plan with it ranked first, with its cost at its lower bound 0): "
            + ", ".join(scope["kl_not_measured"])
        )
    if scope.get("speed_not_measured"):
        out.append(
            "decode speed not timed (no plan with it ranked first, or the first reaches the speed floor even at "
            "the least share of its speed a cache mode can keep; its tok/s above assume the f16 cache's): "
            f"{', '.join(scope['speed_not_measured'])}"
        )
    out += [f"precision order broken: {v}" for v in scope.get("order_violations", [])]
    mixed = scope.get("mixed")
    if mixed:
        out.append(
            f"per-tensor sensitivity (--mixed): measured at {', '.join(mixed['types'])}, all-Q8_0 floor "
            f"{mixed['floor_kl']:.4f} nats"
            if mixed.get("measured")
            else f"per-tensor sensitivity (--mixed) {mixed['why']}"
        )
    return out
