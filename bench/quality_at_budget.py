"""Quality at budget: the plan of the old solver space against the plan of the full space, each
built and measured in llama.cpp, at about a dozen memory budgets.

Old space: the same solver limited to whole-layer merges (sleb-fast) x weight type, the f16 KV
cache without flash attention, no importance matrix (``--kv-type f16 --flash-attn off
--no-attention-removal --no-imatrix``).  Full space: every lever (cache modes, flash attention,
importance-matrix quants, attention-only removal).  Profile laptop-8gb at context 4096 on the
embedded SmolLM2-135M.  Budgets run from the smallest footprint the old space reaches to the
unmerged F16 footprint (plus --extra-budgets).

Each distinct plan is built once (merge from the cached trajectory, export, llama.cpp's
quantizer) and measured in llama.cpp: KL, perplexity and top-1 against the unquantized source on
4 x 512 held-out tokens in the plan's cache mode, and peak RSS with the cache filled to the
context (a prompt of context - 56 tokens, 8 generated).  Predicted KL (the additive rule) is
reported beside the measured one, so the rule's error shows too.  Prints a table, writes JSON
and a PNG.

    python bench/quality_at_budget.py --out bench/results/quality_at_budget

``--scope-check`` plans every budget of both spaces twice, measuring every quant type and cache
mode (``--measure-all``) and measuring only what can change the choice (solver/scope.py), and
checks that both pick the same plan; it prints how many quant probes (a type quantized and run,
plain or with an importance matrix) and cache-mode timings each budget's plan needed.  Nothing is
built.

    python bench/quality_at_budget.py --scope-check --out bench/results/scope_check
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from mka_edge.errors import UserError
from mka_edge.mka.context import build_context
from mka_edge.models.loading import load_model
from mka_edge.planning import cheap_facts, measure, resolve_settings
from mka_edge.produce import produce
from mka_edge.records import EditSet
from mka_edge.solver.feasibility import smallest_kept
from mka_edge.solver.solve import enumerate_plans, solve
from mka_edge.validate.jobs import AccuracyJob, LatencyJob
from mka_edge.validate.reference import compact_reference
from mka_edge.validate.runner import run_child
from mka_edge.validate.workers import GGUF_WORKER as WORKER

OLD = dict(kv_type="f16", flash_attn="off", attention_removal=False, imatrix=False)
FULL: dict = {}


def probes(plan) -> int:
    """Quant probes behind a plan: each measured type once, twice when measured plain and with a matrix."""
    return sum(max(1, ("kl_plain" in c) + ("kl_imatrix" in c)) for c in plan.quant_costs.values())


def plan_at(space: dict, budget: float, ctx, args, measure_all: bool = False) -> dict | None:
    """The chosen candidate of this space at this budget (None: nothing fits)."""
    try:
        s = resolve_settings(
            args.profile, None, budget_mb=budget, context=args.context, measure_all=measure_all, **space
        )
        plan = solve(measure(s, cheap_facts(s), ctx, progress=False, log=lambda m: None), s)
    except UserError as exc:
        return {"error": str(exc)}
    ch = plan.choice
    timed = [m for m, c in plan.cache_costs.items() if c.get("speed_measured", True) and len(plan.cache_costs) > 1]
    return {
        "probes": probes(plan),
        "types_measured": list(plan.quant_costs),
        "cache_modes": len(plan.cache_costs),
        "cache_timings": len(timed),
        "skipped": plan.scope.get("skipped", []),
        "method": ch.method,
        "k": ch.k,
        "quant": ch.quant,
        "imatrix": ch.imatrix,
        "cache": ch.cache,
        "attn_removed": list(ch.attn_removed),
        "predicted": ch.predicted,
        "label": f"{ch.method}:{ch.k}{'(' + str(len(ch.attn_removed)) + ' attn)' if ch.attn_removed else ''} "
        f"{ch.quant}{'+im' if ch.imatrix else ''} {ch.cache}",
    }


def key_of(p: dict) -> tuple:
    return (p["method"] if p["k"] else "", p["k"], p["quant"], p["imatrix"], p["cache"])


def build_and_measure(p: dict, ctx, work: Path, ref_path: Path, prompt: list[int], args) -> dict:
    """Merge (if any), export, run in llama.cpp: measured KL / perplexity / top-1 / peak RSS."""
    t0 = time.perf_counter()
    target = ctx_target(args)
    if p["k"]:
        folder = work / f"{p['method']}-k{p['k']}"
        if not (folder / "merge_log.json").is_file():
            produce(ctx, p["k"], p["method"], "calibrated", folder, None, progress=False, log=lambda m: None)
            ctx.reset()
        lm = load_model(str(folder))
    else:
        lm = ctx.lm
    art = work / f"{'-'.join(str(x) for x in key_of(p)).replace('/', '_')}.gguf"
    if not art.is_file():
        target.export(lm, art, p["quant"], context=args.context, progress=False, imatrix=p["imatrix"])
    del lm
    acc = run_child(
        WORKER, AccuracyJob(str(art), args.threads, reference=str(ref_path), cache_mode=p["cache"]), 3600, "accuracy"
    )
    lat = run_child(
        WORKER,
        LatencyJob(
            str(art),
            args.threads,
            context=args.context,
            prompt_ids=prompt,
            gen_tokens=8,
            repeats=1,
            cache_mode=p["cache"],
        ),
        3600,
        "latency",
    )
    return {
        "kl": acc["kl"],
        "ppl": acc["ppl"],
        "top1": acc["top1"],
        "peak_rss_mb": lat["peak_rss_mb"],
        "gen_tps_host": lat["gen_tps"]["median"],
        "file_mb": art.stat().st_size / 2**20,
        "seconds": time.perf_counter() - t0,
    }


def ctx_target(args):
    from mka_edge.profiles import load_profile

    return load_profile(args.profile).target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="laptop-8gb")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--points", type=int, default=12, help="budgets between the old space's floor and unmerged F16")
    ap.add_argument("--extra-budgets", default="355", help="comma-separated budgets (MB) added to the sweep")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunks", type=int, default=4, help="512-token held-out chunks for the measured KL")
    ap.add_argument("--out", type=Path, default=Path("bench/results/quality_at_budget"))
    ap.add_argument("--scope-check", action="store_true", help="compare measure-all and measure-what-matters plans")
    ap.add_argument(
        "--facts-out",
        type=Path,
        default=None,
        help="with --scope-check: also write the model's sizes, tensor types and measured KL per type and cache "
        "mode (tests/data/smollm2_quant_facts.json is this file for the default model)",
    )
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "artifacts"
    work.mkdir(exist_ok=True)

    ctx = build_context(model=None)
    # the sweep's ends: the old space's smallest footprint and unmerged F16 with its f16 cache
    s = resolve_settings(args.profile, None, budget_mb=1e6, context=args.context, measure_all=True, **OLD)
    facts = measure(s, cheap_facts(s), ctx, progress=True, log=print)
    ref = next(iter(facts.costs.values())).per_layer
    edge = enumerate_plans(
        s,
        facts.shape,
        facts.costs,
        facts.efficiency,
        [EditSet(s.method, k, tuple(smallest_kept(ref, k))) for k in range(facts.cheap.k_max + 1)],
        facts.caches,
    )
    lo = min(c.memory_mb for c in edge)
    hi = max(c.memory_mb for c in edge if c.k == 0 and c.quant == "F16")
    budgets = sorted(
        {round(b) for b in np.linspace(lo + 1, hi + 1, args.points)}
        | {float(b) for b in args.extra_budgets.split(",") if b}
    )
    print(f"budgets (MB): {budgets}", flush=True)
    if args.scope_check:
        if args.facts_out:
            write_facts(ctx, args)
        scope_check(budgets, ctx, args)
        return

    rows = []
    for b in budgets:
        old, full = plan_at(OLD, b, ctx, args), plan_at(FULL, b, ctx, args)
        rows.append({"budget_mb": b, "old": old, "full": full})
        print(
            f"{b:7.0f} MB  old: {old.get('label', old.get('error'))}  |  full: {full.get('label', full.get('error'))}",
            flush=True,
        )

    ref_path, _ = compact_reference(ctx.lm, args.chunks, progress=False)
    ids = np.load(ref_path)["ids"].reshape(-1).tolist()
    n_prompt = args.context - 56
    prompt = (ids * (n_prompt // len(ids) + 1))[:n_prompt]
    measured: dict[tuple, dict] = {}
    for r in rows:
        for space in ("old", "full"):
            p = r[space]
            if "error" in p:
                continue
            k = key_of(p)
            if k not in measured:
                print(f"building and measuring {p['label']}", flush=True)
                measured[k] = build_and_measure(p, ctx, work, ref_path, prompt, args)
            p["measured"] = measured[k]

    lines = [
        "| budget MB | old-space plan | predicted KL | measured KL | ppl | top-1 | peak RSS MB | full-space plan "
        "| predicted KL | measured KL | ppl | top-1 | peak RSS MB | full / old KL |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cells(p):
        if "error" in p:
            return "nothing fits | | | | | "
        m = p["measured"]
        return (
            f"{p['label']} | {p['predicted']['kl']:.3f} | {m['kl']:.4f} | {m['ppl']:.2f} | {100 * m['top1']:.1f}% "
            f"| {m['peak_rss_mb']:.0f}"
        )

    for r in rows:
        o, f = r["old"], r["full"]
        ratio = f"{f['measured']['kl'] / o['measured']['kl']:.2f}" if "measured" in o and "measured" in f else "-"
        lines.append(f"| {r['budget_mb']:.0f} | {cells(o)} | {cells(f)} | {ratio} |")
    errs = [p["measured"]["kl"] - p["predicted"]["kl"] for r in rows for p in (r["old"], r["full"]) if "measured" in p]
    table = "\n".join(lines)
    # a budget is a promise (issue 23 item 5): every built plan's measured peak against its budget
    over = [
        f"{r['budget_mb']:.0f} MB {space}: {p['label']} measured {p['measured']['peak_rss_mb']:.1f} MB"
        for r in rows
        for space, p in (("old", r["old"]), ("full", r["full"]))
        if "measured" in p and p["measured"]["peak_rss_mb"] > r["budget_mb"]
    ]
    summary = (
        f"\nadditive rule, predicted - measured KL over {len(errs)} plan builds: mean {-np.mean(errs):+.4f}, "
        f"largest |error| {max(abs(e) for e in errs):.4f} nats\n"
        f"measured peak over the budget: {len(over)} of {len(errs)} plans" + "".join(f"\n  {o}" for o in over) + "\n"
    )
    print(table + summary)
    (args.out / "table.md").write_text(table + "\n" + summary)
    (args.out / "results.json").write_text(
        json.dumps({"profile": args.profile, "context": args.context, "rows": rows}, indent=2, default=str)
    )
    _plot(rows, args.out / "quality_at_budget.png")
    print(f"wrote {args.out}/table.md, results.json, quality_at_budget.png")


def write_facts(ctx, args) -> None:
    """Sizes and tensor types (llama.cpp's dry run), KL per type (full space, measured) and per cache
    mode: what tests/test_scope.py checks the precision order and the best-first loop against."""
    s = resolve_settings(args.profile, None, budget_mb=1e6, context=args.context, measure_all=True)
    cheap = cheap_facts(s)
    facts = measure(s, cheap, ctx, progress=False, log=lambda m: None)
    out = {
        "model": "SmolLM2-135M-Instruct (embedded Q4_1 GGUF, dequantized)"
        if ctx.lm.source.get("kind") == "gguf"
        else "",
        "source_grids": sorted(s.target.source_grids(ctx.lm)),
        "types": {
            q: {
                "per_layer": list(cheap.sizes[q].per_layer),
                "repack_per_layer": list(cheap.sizes[q].repack_per_layer),
                "other": cheap.sizes[q].other,
                "tensor_map": cheap.sizes[q].extra["tensor_map"],
                "tensor_params": cheap.sizes[q].extra["tensor_params"],
                "kl": c.kl,
                **{k: c.extra[k] for k in ("imatrix", "kl_plain", "kl_imatrix") if k in c.extra},
            }
            for q, c in facts.costs.items()
        },
        "caches": {c.mode: {"kl": c.kl, "speed_factor": c.speed_factor} for c in facts.caches},
        "written_by": "python bench/quality_at_budget.py --scope-check --facts-out tests/data/smollm2_quant_facts.json",
    }
    args.facts_out.parent.mkdir(parents=True, exist_ok=True)
    args.facts_out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.facts_out}", flush=True)


def scope_check(budgets: list[float], ctx, args) -> None:
    """Every budget and space planned with --measure-all and without: the same choice, fewer probes."""
    rows, lines = (
        [],
        [
            "| budget MB | space | plan (both) | same | quant probes: all / needed | types measured | cache timings: all / needed |",
            "|---|---|---|---|---|---|---|",
        ],
    )
    for b in budgets:
        for name, space in (("old", OLD), ("full", FULL)):
            full, lean = plan_at(space, b, ctx, args, measure_all=True), plan_at(space, b, ctx, args)
            same = full.get("label", full.get("error")) == lean.get("label", lean.get("error"))
            rows.append({"budget_mb": b, "space": name, "measure_all": full, "lean": lean, "same": same})
            label = full.get("label") or "nothing fits"
            if "error" in full:
                lines.append(f"| {b:.0f} | {name} | {label} | {'yes' if same else '**no**'} | | | |")
                continue
            lines.append(
                f"| {b:.0f} | {name} | {label} | {'yes' if same else '**no**: ' + lean.get('label', '')} | "
                f"{full['probes']} / {lean['probes']} | {', '.join(lean['types_measured'])} | "
                f"{full['cache_timings']} / {lean['cache_timings']} |"
            )
            print(lines[-1], flush=True)
    agree = sum(r["same"] for r in rows)
    summary = f"\n{agree} of {len(rows)} (budget, space) plans agree"
    print("\n".join(lines) + summary)
    (args.out / "table.md").write_text("\n".join(lines) + summary + "\n")
    (args.out / "results.json").write_text(
        json.dumps({"profile": args.profile, "context": args.context, "rows": rows}, indent=2)
    )
    print(f"wrote {args.out}/table.md, results.json")


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for space, style in (("old", "o-"), ("full", "s-")):
        pts = [(r["budget_mb"], r[space]["measured"]["kl"]) for r in rows if "measured" in r[space]]
        if pts:
            ax.plot(*zip(*pts), style, label=f"{space} space (measured in llama.cpp)")
    ax.set_yscale("log")
    ax.set_xlabel("memory budget (MB, laptop-8gb at context 4096)")
    ax.set_ylabel("KL to the source (nats)")
    ax.set_title("SmolLM2-135M: quality at budget, old vs full solver space")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
