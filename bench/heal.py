"""Healing on SmolLM2: each merge method at each K, with and without healing at the same step
budget, and quality against steps for one (method, K).  Held-out KL / perplexity / top-1 against
the unmerged model on held-out chunks the heal never trains on; wall time per training step.

    python bench/heal.py --out bench/results/heal --ks 3,6,9,12 --steps 60

"auto" is the default merge (per K the least calibration-loss plan of its pool); where it picks the
same plan as a method already in the grid, that row is reused rather than healed twice.  A rerun
with the same settings reuses every heal already written under --out (a long run survives a stop).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from mka_edge.cache import atomic_write_text
from mka_edge.heal.distill import HealConfig, heal
from mka_edge.merge_log import read_merge_log
from mka_edge.produce import merged_folder


def _merge(work: Path, method: str, k: int) -> Path:
    """``method`` is a merge method, or METHOD@ALPHA for another alpha rule than the default
    (calibrated): ``mka@paper`` is the literal paper method."""
    name, _, alpha = method.partition("@")
    return merged_folder(work / f"{method}-k{k}", k, name, alpha or "calibrated")


def _fuses(folder: Path) -> bool:
    """Whether the merge really fused layers: with calibrated alpha, the alpha grid search can pick
    0 or 1 at every step, and the 'fusion' is a removal (it did on SmolLM2)."""
    log = read_merge_log(folder)
    return any(
        len(e["sources"]) > 1 or any(abs(w - 1.0) > 1e-9 for w in e.get("weights", [1.0])) for e in log.layer_map
    )


def _done(out: Path, cfg: HealConfig) -> dict | None:
    """The heal already written in ``out`` with these settings, if any (a rerun reuses it)."""
    log = out / "heal_log.json"
    if log.is_file():
        rec = json.loads(log.read_text())
        if rec["config"] == asdict(cfg):
            return rec
        shutil.rmtree(out)
    return None


def _chosen(folder: Path) -> str:
    """The method whose plan an auto merge took at its K (the method itself for the others);
    ``folder`` is a merged folder or a healed one (which carries the merge log)."""
    log = read_merge_log(folder)
    return log.steps[-1].method if log.method == "auto" else log.method


def predictor_check(rows: list[dict]) -> list[dict]:
    """How well the plan's healed-curve rule (solver.quality.interpolate_healed) predicts a heal
    it did not run: for each method, each healed K is predicted from the other healed K (the
    healed/unhealed ratio interpolated, or held flat beyond the ends) and compared."""
    from mka_edge.solver.quality import interpolate_healed

    out = []
    for method in sorted({r["method"] for r in rows if r["method"] != "auto"}):
        at = {r["k"]: r for r in rows if r["method"] == method}
        if len(at) < 3:
            continue
        k_max = max(at)
        unhealed = [0.0] + [at[k]["kl"] if k in at else 0.0 for k in range(1, k_max + 1)]
        for k in sorted(at):
            others = {x: at[x]["healed_kl"] for x in at if x != k}
            pred = interpolate_healed(unhealed, others)[k]
            out.append(
                {
                    "method": method,
                    "k": k,
                    "from": sorted(others),
                    "predicted": round(pred, 4),
                    "measured": round(at[k]["healed_kl"], 4),
                    "error_pct": round(100 * (pred - at[k]["healed_kl"]) / at[k]["healed_kl"], 1),
                }
            )
    return out


def plot_curve(curve: dict, path: Path) -> None:
    """Held-out KL, perplexity and top-1 agreement against heal steps (one method and K)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = curve["points"]
    xs = [p["step"] for p in pts]
    fig, ax = plt.subplots(1, 3, figsize=(12, 3.5))
    ax[0].plot(xs, [p["kl"] for p in pts], "o-")
    ax[0].set(
        xlabel="heal steps",
        ylabel="held-out KL (nats)",
        title=f"{curve['method']} K={curve['k']}: KL to the unmerged model",
    )
    ax[1].plot(xs, [p["ppl"] for p in pts], "o-", color="C1")
    ax[1].axhline(pts[0]["ref_ppl"], ls="--", color="gray", label="unmerged")
    ax[1].set(xlabel="heal steps", ylabel="held-out perplexity", title="perplexity")
    ax[1].legend()
    ax[2].plot(xs, [100 * p["top1"] for p in pts], "o-", color="C2")
    ax[2].set(xlabel="heal steps", ylabel="top-1 agreement (%)", title="top-1 agreement with the unmerged model")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/results/heal"))
    ap.add_argument("--ks", default="3,6,9,12")
    ap.add_argument("--methods", default="auto,sleb,shortgpt,mka-guided,mka")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--train", default="all")
    ap.add_argument("--heldout-chunks", type=int, default=2)
    ap.add_argument("--curve", default="sleb:6", help="METHOD:K whose heal records quality every --curve-every steps")
    ap.add_argument("--curve-every", type=int, default=10)
    ap.add_argument(
        "--keep-models",
        action="store_true",
        help="keep every merged and healed model (about 0.5 GB each in float32); by default only the logs stay",
    )
    args = ap.parse_args()
    work = args.out / "models"
    work.mkdir(parents=True, exist_ok=True)
    curve_method, curve_k = args.curve.split(":")
    rows, curve = [], None
    t0 = time.time()
    ks, methods = [int(x) for x in args.ks.split(",")], args.methods.split(",")
    # auto last within each K, so the row it may share is already measured
    order = [m for m in methods if m != "auto"] + (["auto"] if "auto" in methods else [])
    for k in ks:
        done: dict[str, dict] = {}
        for method in order:
            is_curve = method == curve_method and k == int(curve_k)
            cfg = HealConfig(
                steps=args.steps,
                train=args.train,
                lr=args.lr,
                batch=args.batch,
                seq_len=args.seq_len,
                heldout_chunks=args.heldout_chunks,
                eval_every=args.curve_every if is_curve else 0,
            )
            healed_dir = work / f"{method}-k{k}-healed"
            rec, shared = _done(healed_dir, cfg), None
            chosen = _chosen(healed_dir) if rec else None
            if rec is None:
                merged = _merge(work, method, k)
                chosen = _chosen(merged)
                if method == "auto" and chosen in done and not is_curve:
                    rec, shared = done[chosen], chosen
                else:
                    rec = heal(str(merged), healed_dir, cfg, progress=False, log=lambda m: None)
                    if not args.keep_models:
                        (healed_dir / "model.safetensors").unlink(missing_ok=True)
            if shared is None:
                done[method] = rec
            b, a = rec["heldout_before"], rec["heldout_after"]
            fused = _fuses(healed_dir if healed_dir.is_dir() else work / f"{method}-k{k}")
            rows.append(
                {
                    "k": k,
                    "method": method,
                    "plan": chosen,
                    "fused": fused,
                    "shared_with": shared,
                    "steps": args.steps,
                    "train": args.train,
                    "kl": b["kl"],
                    "ppl": b["ppl"],
                    "top1": b["top1"],
                    "healed_kl": a["kl"],
                    "healed_ppl": a["ppl"],
                    "healed_top1": a["top1"],
                    "seconds_per_step": rec["seconds_per_step"],
                    "ref_ppl": a["ref_ppl"],
                }
            )
            if is_curve:
                curve = {"method": method, "k": k, "points": rec["curve"], "losses": rec["losses"]}
            label = f"{method} (= {chosen})" if method == "auto" else method
            print(
                f"K={k:2} {label:18} KL {b['kl']:.3f} -> {a['kl']:.3f}  ppl {b['ppl']:.1f} -> {a['ppl']:.1f}  "
                f"{rec['seconds_per_step']:.2f} s/step",
                flush=True,
            )
        if not args.keep_models:  # the trajectories are cached: a rerun re-merges quickly
            for method in order:
                shutil.rmtree(work / f"{method}-k{k}", ignore_errors=True)
    meta = {
        "host": {"machine": platform.machine(), "cpus": os.cpu_count()},
        "seconds": round(time.time() - t0),
        "settings": vars(args) | {"out": str(args.out)},
    }
    check = predictor_check(rows)
    (args.out / "results.json").write_text(
        json.dumps({"meta": meta, "rows": rows, "curve": curve, "predictor_check": check}, indent=2)
    )
    lines = [
        "| K | method | fuses? | KL | ppl | top-1 | healed KL | healed ppl | healed top-1 | s/step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = f"auto (= {r['plan']})" if r["method"] == "auto" else r["method"]
        lines.append(
            f"| {r['k']} | {name} | {'yes' if r['fused'] else 'no'} | {r['kl']:.3f} | {r['ppl']:.1f} | {100 * r['top1']:.1f}% | {r['healed_kl']:.3f} "
            f"| {r['healed_ppl']:.1f} | {100 * r['healed_top1']:.1f}% | {r['seconds_per_step']:.2f} |"
        )
    best = []
    for k in sorted({r["k"] for r in rows}):
        at = [r for r in rows if r["k"] == k]
        u, h = min(at, key=lambda r: r["kl"]), min(at, key=lambda r: r["healed_kl"])
        line = f"K={k}: best unhealed {u['method']} ({u['kl']:.3f}), best healed {h['method']} ({h['healed_kl']:.3f})"
        fusion = [r for r in at if r["fused"]]
        removal = [r for r in at if not r["fused"]]
        if fusion and removal:
            f, r_ = min(fusion, key=lambda r: r["healed_kl"]), min(removal, key=lambda r: r["healed_kl"])
            verdict = "beats" if f["healed_kl"] < r_["healed_kl"] else "does not beat"
            line += (
                f"; fusion + healing ({f['method']}, {f['healed_kl']:.3f}) {verdict} removal + healing "
                f"({r_['method']}, {r_['healed_kl']:.3f})"
            )
        best.append(line)
    table = "\n".join(lines) + "\n\n" + "\n".join(f"- {b}" for b in best) + "\n"
    if check:
        table += (
            "\nThe plan's healed-curve rule, each heal predicted from the others of its method:\n\n"
            "| method | K | predicted from K | predicted healed KL | measured | error |\n|---|---|---|---|---|---|\n"
        )
        table += "".join(
            f"| {c['method']} | {c['k']} | {', '.join(map(str, c['from']))} | {c['predicted']:.3f} "
            f"| {c['measured']:.3f} | {c['error_pct']:+.1f}% |\n"
            for c in check
        )
    atomic_write_text(args.out / "table.md", table)
    if curve:
        plot_curve(curve, args.out / "curve.png")
    print(table)


if __name__ == "__main__":
    main()
