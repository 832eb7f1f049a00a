"""Training curves of a run, from its ``metrics.jsonl``: ``write_curves(run_dir)`` -> ``curves.png``.

Four panels against epochs: the training loss terms (total, cross-entropy and, for SAR
runs, the spatial-entropy term on its own axis), validation top-1 (and top-5), the
validation mean spatial entropy of the last block's maps, and their number of connected
components per head. Validation points exist only for the epochs that were evaluated;
keys a run did not log are left out, so runs of any age draw.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import UserError

__all__ = ["plot_curves", "write_curves", "CURVES"]

CURVES = "curves.png"


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [(r["epoch"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and "epoch" in r]
    return [p[0] for p in points], [p[1] for p in points]


def _line(ax, rows, key: str, label: str, **style) -> bool:
    x, y = _series(rows, key)
    if not x:
        return False
    ax.plot(x, y, marker="o" if len(x) < 30 else None, markersize=3, label=label, **style)
    return True


def _panel(ax, title: str, ylabel: str, drew: bool) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if not drew:
        ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")


def plot_curves(rows: list[dict[str, Any]], title: str | None = None):
    """A ``matplotlib.figure.Figure`` of the curves of ``rows`` (``read_metrics`` output)."""
    from matplotlib.figure import Figure

    if not any("epoch" in r for r in rows):
        raise UserError("no epoch was logged yet: metrics.jsonl has no complete line")
    fig = Figure(figsize=(10, 7), layout="constrained")
    (loss, top1), (entropy, comps) = fig.subplots(2, 2)
    drew = _line(loss, rows, "train_loss", "total") | _line(loss, rows, "train_ce", "cross-entropy")
    se_x, _ = _series(rows, "train_se")
    if se_x:
        twin = loss.twinx()
        _line(twin, rows, "train_se", "spatial entropy (right)", color="tab:green")
        twin.set_ylabel("spatial-entropy term")
        handles = loss.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        loss.legend(handles, [h.get_label() for h in handles], fontsize=8)
    elif drew:
        loss.legend(fontsize=8)
    _panel(loss, "training loss terms", "loss", drew)
    drew = _line(top1, rows, "val_top1", "top-1") | _line(top1, rows, "val_top5", "top-5")
    if drew:
        top1.legend(fontsize=8)
    _panel(top1, "validation accuracy", "%", drew)
    _panel(entropy, "validation: mean spatial entropy (last block)", "entropy (nats)",
           _line(entropy, rows, "val_se", "val", color="tab:purple"))
    _panel(comps, "validation: connected components per head", "components",
           _line(comps, rows, "val_components", "val", color="tab:brown"))
    if title:
        fig.suptitle(title)
    return fig


def write_curves(run_dir: str | Path) -> Path:
    """Read ``run_dir/metrics.jsonl`` and write ``run_dir/curves.png`` atomically; returns its path."""
    from ..checkpoint import atomic_write
    from ..runlog import read_metrics

    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"{run_dir} has no metrics.jsonl; give the folder `sarvit train --output` wrote")
    fig = plot_curves(read_metrics(metrics), title=run_dir.resolve().name)
    return atomic_write(run_dir / CURVES, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
