"""Figures of the dense tasks: predictions beside the ground truth, from arrays (nothing computed here).

Drawn with ``matplotlib.figure.Figure`` directly (no pyplot, no global backend switch).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["draw_detections", "draw_segmentations"]


def _figure(rows: int, cols: int):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3 * cols, 3 * rows), dpi=100)
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False))  # (rows, cols)
    for ax in axes.ravel():
        ax.set_axis_off()
    return fig, axes


def _boxes(ax, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, masks: np.ndarray | None,
           classes: list[str], scores: np.ndarray | None = None) -> None:
    """``image`` (H, W, 3) in [0, 1], ``boxes`` (N, 4) xyxy, ``labels`` (N,) in 1..C, ``masks`` (N, H, W) bool."""
    from matplotlib import colormaps
    from matplotlib.patches import Rectangle

    colours = colormaps["tab10"]
    shown = image.copy()
    for i, label in enumerate(labels):
        colour = np.asarray(colours(int(label) % 10)[:3])
        if masks is not None and len(masks) > i:
            shown[masks[i]] = 0.5 * shown[masks[i]] + 0.5 * colour
        x0, y0, x1, y1 = boxes[i]
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=1.5))
        text = classes[int(label) - 1] if 0 < int(label) <= len(classes) else str(int(label))
        if scores is not None:
            text += f" {scores[i]:.2f}"
        ax.text(x0, y0, text, fontsize=7, color="white", va="bottom", bbox={"facecolor": colour, "pad": 1, "lw": 0})
    ax.imshow(shown)


def _save(fig, path: str | Path) -> Path:
    from ..runs import atomic_write

    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def draw_detections(path: str | Path, images: list, truths: list[dict], predictions: list[dict],
                    classes: list[str], shown: str = "") -> Path:
    """One row per image: ground truth (left), predictions (right). Dicts of numpy arrays:
    ``boxes`` (N, 4), ``labels`` (N,), optional ``masks`` (N, H, W) bool, ``scores`` (N,);
    ``shown`` says which predictions were kept (the right column's title)."""
    fig, axes = _figure(len(images), 2)
    for row, (image, truth, pred) in enumerate(zip(images, truths, predictions)):
        _boxes(axes[row, 0], image, truth["boxes"], truth["labels"], truth.get("masks"), classes)
        _boxes(axes[row, 1], image, pred["boxes"], pred["labels"], pred.get("masks"), classes, pred["scores"])
    axes[0, 0].set_title("ground truth")
    axes[0, 1].set_title("predictions" + (f"\n({shown})" if shown else ""), fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def draw_segmentations(path: str | Path, images: list, truths: list, predictions: list, classes: list[str]) -> Path:
    """One row per image: image, ground-truth class map, predicted class map (``(H, W)`` ids into ``classes``,
    id 0 the background in black, 255 void in white); a legend names the classes that appear."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    num_classes = len(classes)
    cmap = colormaps["tab10" if num_classes <= 11 else "tab20"]  # up to 10 classes: the detection figure's colours
    palette = np.asarray([(0.0, 0.0, 0.0), *(cmap(i % cmap.N)[:3] for i in range(1, max(num_classes, 2)))])  # (K, 3)
    fig, axes = _figure(len(images), 3)
    for row, (image, truth, pred) in enumerate(zip(images, truths, predictions)):
        axes[row, 0].imshow(image)
        for col, ids in ((1, truth), (2, pred)):
            shown = np.ma.masked_equal(ids, 255)
            axes[row, col].imshow(shown, cmap=ListedColormap(palette), vmin=0, vmax=num_classes - 1,
                                  interpolation="nearest")
    for col, title in enumerate(("image", "ground truth", "prediction")):
        axes[0, col].set_title(title)
    present = sorted({int(i) for ids in [*truths, *predictions] for i in np.unique(ids) if i != 255})
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    handles = [Patch(facecolor=palette[i], edgecolor="gray", label=classes[i]) for i in present]
    if any((ids == 255).any() for ids in truths):
        handles.append(Patch(facecolor="white", edgecolor="gray", label="void (ignored)"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), fontsize=8, frameon=False)
    return _save(fig, path)
