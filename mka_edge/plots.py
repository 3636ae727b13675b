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


# bits per weight of the ggml types an allocation uses, for the heatmap's colour order
_TYPE_BITS = {
    "F32": 32, "F16": 16, "BF16": 16, "Q8_0": 8.5, "Q6_K": 6.56, "Q5_1": 6, "Q5_K": 5.5, "Q5_0": 5.5,
    "Q4_1": 5, "Q4_K": 4.5, "IQ4_NL": 4.5, "Q4_0": 4.5, "IQ4_XS": 4.25, "Q3_K": 3.44, "Q2_K": 2.63,
}  # fmt: skip


def allocation_heatmap(
    cells: dict[tuple[int, str], str],
    outside: dict[str, str],
    n_layers: int,
    removed: list[int],
    path: Path,
    title: str,
    kind_bytes: dict | None = None,
) -> None:
    """Layers x tensor kinds, colour = the ggml type each tensor was written in (the actual type,
    fallbacks included): ``cells`` {(layer, kind): type}; removed layers blank; the tensors
    outside the layers (``outside``, {kind: type}: token embedding, output) named in the title.
    ``kind_bytes``: bytes per kind, printed under the kinds' labels.  The caller names the cells
    (``solver.tensor_sensitivity.kind_of``): this module sits below the solver."""
    import numpy as np
    from matplotlib.colors import BoundaryNorm, ListedColormap

    kinds = sorted({k for _, k in cells})
    used = sorted({t for t in cells.values()}, key=lambda t: -_TYPE_BITS.get(t, 0))
    grid = np.full((n_layers, len(kinds)), np.nan)
    for (layer, kind), t in cells.items():
        grid[layer, kinds.index(kind)] = used.index(t)
    cmap = ListedColormap(plt.get_cmap("viridis_r", max(len(used), 2))(range(len(used))))
    cmap.set_bad("white")
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(kinds), 1.5 + 0.18 * n_layers), dpi=120)
    im = ax.imshow(grid, cmap=cmap, norm=BoundaryNorm(np.arange(len(used) + 1) - 0.5, len(used)), aspect="auto")
    labels = [k + (f"\n{kind_bytes[k] / 2**20:.1f} MiB" if kind_bytes and k in kind_bytes else "") for k in kinds]
    ax.set_xticks(range(len(kinds)), labels, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(0, n_layers, max(1, n_layers // 15)))
    ax.set_ylabel("layer" + (f" (removed: {', '.join(map(str, removed))})" if removed else ""))
    named = ", ".join(f"{k} {t}" for k, t in sorted(outside.items()))
    ax.set_title(title + (f"\noutside the layers: {named}" if named else ""), fontsize=9)
    bar = fig.colorbar(im, ax=ax, ticks=range(len(used)))
    bar.ax.set_yticklabels(used, fontsize=7)
    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp, metadata={"Software": None})
    plt.close(fig)
    tmp.replace(path)
