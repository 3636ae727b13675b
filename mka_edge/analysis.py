"""`mka-edge analyze`: the layer-similarity matrix of a model, as JSON and a heatmap."""

from __future__ import annotations

import json
from pathlib import Path

from . import __version__
from .cache import atomic_write_text
from .mka.context import MergeContext
from .plots import similarity_heatmap


def top_adjacent(adjacent: list[float], n: int = 5) -> list[dict]:
    order = sorted(range(len(adjacent)), key=lambda i: -adjacent[i])[:n]
    return [{"pair": [i, i + 1], "similarity": round(adjacent[i], 6)} for i in order]


def analyze(ctx: MergeContext, out: Path, seeds: int = 1) -> dict:
    """Similarity of every layer pair on the unmerged model; with ``seeds`` > 1, also the top
    adjacent pairs under other seeds (position sampling and k-means), to show stability."""
    sim = ctx.similarity()
    adjacent = sim.adjacent()
    result = {
        "mka_edge": __version__,
        "model": ctx.lm.source,
        "fingerprint": ctx.lm.fingerprint,
        "num_layers": ctx.n_original,
        "settings": ctx.settings.key(),
        "calibration": ctx.text_spec.key(),
        "device": str(ctx.device),
        "similarity": [[round(float(v), 6) for v in row] for row in sim.matrix],
        "adjacent": [round(v, 6) for v in adjacent],
        "top_adjacent": top_adjacent(adjacent),
    }
    if seeds > 1:
        result["seed_check"] = {}
        for extra in range(1, seeds):
            s = ctx.settings.seed + extra
            result["seed_check"][str(s)] = top_adjacent(ctx.similarity(seed=s).adjacent())
    result["timings"] = ctx.timer.as_dict()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "similarity.json", json.dumps(result, indent=1))
    similarity_heatmap(
        sim.matrix.numpy(),
        out / "similarity.png",
        f"{ctx.lm.source.get('spec')}: layer similarity (NMI), {ctx.text_spec.samples}x{ctx.text_spec.seq_len} tokens",
    )
    return result
