"""Figures for people (PNG); machines get the JSON next to them."""

from __future__ import annotations

import os
from pathlib import Path

from .cache import cache_root

# matplotlib keeps its font cache and reads a matplotlibrc under ~/.cache and ~/.config: point it at
# mka-edge's cache, so a build writes nowhere but --out, the cache and the temporary folder and the
# figures do not depend on the user's style settings (an explicit MPLCONFIGDIR still wins)
os.environ.setdefault("MPLCONFIGDIR", str(cache_root() / "matplotlib"))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def similarity_heatmap(matrix, path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 5.4), dpi=120)
    im = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=1, origin="upper")
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="NMI of diffusion-map labels")
    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def pareto_plot(
    candidates: list[dict], front: list[dict], chosen: dict, budget_mb: float, path: Path, title: str
) -> None:
    """Predicted memory against predicted quality loss for every plan; the front, budget and choice marked."""
    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=120)
    ax.scatter(
        [c["memory_mb"] for c in candidates], [c["kl"] for c in candidates], s=10, c="0.7", label="plans (K, quant)"
    )
    ax.plot([c["memory_mb"] for c in front], [c["kl"] for c in front], "-o", ms=4, color="C0", label="Pareto front")
    ax.axvline(budget_mb, color="C3", ls="--", lw=1, label=f"budget {budget_mb:.0f} MB")
    ax.scatter(
        [chosen["memory_mb"]],
        [chosen["kl"]],
        s=80,
        marker="*",
        color="C1",
        zorder=5,
        label=f"chosen: K={chosen['k']} {chosen['quant']}",
    )
    ax.set_xlabel("predicted peak memory (MB)")
    ax.set_ylabel("predicted quality loss (mean KL, nats)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp, metadata={"Software": None})
    plt.close(fig)
    tmp.replace(path)
