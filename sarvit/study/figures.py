"""Figures of a study. They draw what :mod:`.stats` computed; nothing is computed here.

``plot_cell_curves`` draws, for one grid cell, validation top-1 and validation spatial
entropy against epochs (a pretrain study: the training loss terms, the 20-NN top-1 and the
spatial entropy): one line per method (the mean over seeds) inside a band from the
smallest to the largest seed's value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from .stats import Band

__all__ = ["CURVE_PANELS", "TRAIN_PANELS", "PRETRAIN_PANELS", "plot_cell_curves", "save_png"]

# metrics.jsonl key -> panel title and axis label
CURVE_PANELS = {
    "val_top1": ("validation top-1", "top-1 (%)"),
    "val_se": ("validation spatial entropy (last block)", "entropy (nats)"),
    "train_dino": ("DINO loss (training)", "loss"),
    "train_moco": ("MoCo v3 loss (training)", "loss"),
    "train_se": ("SE term (training, before lambda)", "entropy (nats)"),
    "val_knn_top1": ("validation 20-NN top-1", "top-1 (%)"),
}
TRAIN_PANELS = ("val_top1", "val_se")  # a train study's panels
PRETRAIN_PANELS = ("train_dino", "train_moco", "train_se", "val_knn_top1", "val_se")  # those a pretrain run logs


def plot_cell_curves(panels: Mapping[str, Mapping[str, Band]], title: str):
    """A ``matplotlib.figure.Figure``: one panel per key of ``panels`` (keys of :data:`CURVE_PANELS`),
    each holding the :class:`~.stats.Band` of every method that logged it (the mapping's order is the
    legend's); a method keeps its colour in every panel (the SE term: SAR methods only)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    columns = min(len(panels), 3)
    lines = -(-len(panels) // columns)
    fig = Figure(figsize=(5.2 * columns, 4.0 * lines), layout="constrained")
    axes = fig.subplots(lines, columns, squeeze=False).ravel()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    methods = list(dict.fromkeys(m for bands in panels.values() for m in bands))  # one colour each, every panel
    for ax, (key, bands) in zip(axes, panels.items()):
        heading, ylabel = CURVE_PANELS[key]
        for method, b in bands.items():
            colour = f"C{methods.index(method) % 10}"
            marker = "o" if len(b.epochs) < 30 else None
            seeds = f"{b.count.min()}" if b.count.size and b.count.min() == b.count.max() else (
                f"{b.count.min()}-{b.count.max()}" if b.count.size else "0")
            ax.plot(b.epochs, b.mean, color=colour, marker=marker, markersize=3, label=f"{method} (n={seeds})")
            ax.fill_between(b.epochs, b.low, b.high, color=colour, alpha=0.2, linewidth=0)
        if not any(len(b.epochs) for b in bands.values()):
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
        else:
            ax.legend(fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(heading, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title}\nmean over seeds; band: min to max over seeds", fontsize=10)
    return fig


def save_png(fig, path: str | Path, dpi: int = 100) -> Path:
    """Write ``fig`` to ``path`` as a PNG, atomically."""
    from ..runs import atomic_write

    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
