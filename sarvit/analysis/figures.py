"""Figures of attention maps. Everything drawn here is computed elsewhere (:mod:`.maps`).

``plot_attention_figure`` lays out one block of two rows per image and one column group
per model (titled with the model's name), one column per head:

- upper row: the post-softmax [CLS] attention over the image (one colour scale per
  image and model, shared by its heads, with its colour bar: models with other grids
  spread their attention over other numbers of patches), and the outline of the
  patches holding 60% of each head's attention mass;
- lower row: the connected components of ``ReLU(S - mean)``, each in its own colour,
  over the image (Fig. 2 of the paper), titled with the head's spatial entropy.

The geometry is laid out in inches, so titles never overlap or get clipped whatever
the number of models, heads and images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["ModelMaps", "plot_attention_figure"]

PANEL, TITLE, HEAD_GAP, GROUP_GAP, IMAGE_GAP = 1.45, 0.34, 0.06, 0.3, 0.22  # inches
LEFT, RIGHT, TOP, BOTTOM, COLORBAR, BAR_GAP, BAR_LABELS = 0.15, 0.1, 0.75, 0.15, 0.1, 0.08, 0.62


@dataclass
class ModelMaps:
    """Arrays of one model for ``B`` images, grid ``h x w`` with ``heads`` heads.

    Attributes:
        name: the column group's title (the run's name).
        attn: ``(B, heads, h, w)`` post-softmax attention.
        mass: ``(B, heads, h, w)`` bool, the 60%-mass mask.
        components: ``(B, heads, h, w)`` int labels, 0 background.
        entropy: ``(B, heads)`` spatial entropy of each map.
        mass_fraction: the mass the mask keeps (for the legend).
    """

    name: str
    attn: np.ndarray
    mass: np.ndarray
    components: np.ndarray
    entropy: np.ndarray
    mass_fraction: float = 0.6


def _component_colours():
    from matplotlib.colors import ListedColormap
    import matplotlib

    colours = list(matplotlib.colormaps["tab10"].colors)
    return ListedColormap(colours[:7] + colours[8:])  # no grey: it vanishes on a grey image


def _gray(image: np.ndarray) -> np.ndarray:
    return image @ np.array([0.299, 0.587, 0.114])  # (H, W)


class _Layout:
    """Axes placed in inches: ``x`` from the left edge, ``y`` from the top edge."""

    def __init__(self, fig, width: float, height: float) -> None:
        self.fig, self.width, self.height = fig, width, height

    def axes(self, x: float, y: float, w: float, h: float):
        return self.fig.add_axes((x / self.width, 1 - (y + h) / self.height, w / self.width, h / self.height))


def _attention_panel(ax, gray, attn, mass, vmax, extent):
    ax.imshow(gray, cmap="gray", vmin=0, vmax=1, extent=extent)
    im = ax.imshow(attn, cmap="inferno", vmin=0, vmax=vmax, alpha=0.75, interpolation="nearest", extent=extent)
    h, w = mass.shape
    H, W = extent[2], extent[1]
    fine = np.repeat(np.repeat(mass.astype(float), 8, axis=0), 8, axis=1)  # (8h, 8w): sharp patch borders
    if 0 < fine.sum() < fine.size:
        ys, xs = (np.arange(8 * h) + 0.5) * H / (8 * h), (np.arange(8 * w) + 0.5) * W / (8 * w)
        ax.contour(xs, ys, fine, levels=[0.5], colors="cyan", linewidths=1.0)
    return im


def _components_panel(ax, gray, labels, extent, cmap):
    ax.imshow(gray, cmap="gray", vmin=0, vmax=1, extent=extent)
    shown = np.ma.masked_equal(labels, 0)
    ax.imshow((shown - 1) % cmap.N, cmap=cmap, vmin=0, vmax=cmap.N - 1, alpha=0.6, interpolation="nearest",
              extent=extent)


def _hide_ticks(ax):
    ax.set_xticks([])
    ax.set_yticks([])


def plot_attention_figure(
    images: np.ndarray,
    models: list[ModelMaps],
    path: str | Path | None = None,
    captions: list[str] | None = None,
    title: str | None = None,
):
    """Draw the figure; write it to ``path`` (PNG, atomically) when given.

    Args:
        images: ``(B, H, W, 3)`` floats in [0, 1], the images the maps were computed on.
        models: one :class:`ModelMaps` per column group, same ``B``.
        captions: a title for each image (default: none).

    Returns:
        the ``matplotlib.figure.Figure`` (and writes ``path``).
    """
    from matplotlib.figure import Figure

    B, H, W, _ = images.shape
    heads = [m.attn.shape[1] for m in models]
    widths = [n * PANEL + (n - 1) * HEAD_GAP for n in heads]  # panels of a group, without its colour bar
    width = LEFT + PANEL + sum(GROUP_GAP + w + BAR_GAP + COLORBAR + BAR_LABELS for w in widths) + RIGHT
    block = 2 * (TITLE + PANEL)
    height = TOP + B * block + (B - 1) * IMAGE_GAP + BOTTOM
    fig = Figure(figsize=(width, height), dpi=110)
    lay = _Layout(fig, width, height)
    extent = (0, W, H, 0)
    cmap = _component_colours()
    fig.text(0.5, 1 - 0.12 / height, title or "Last block, per head: [CLS] attention and components of ReLU(S - mean)",
             ha="center", va="top", fontsize=11, weight="bold")
    x = LEFT + PANEL + GROUP_GAP
    for m, w in zip(models, widths):
        fig.text((x + w / 2) / width, 1 - 0.42 / height, m.name, ha="center", va="top", fontsize=10, weight="bold")
        x += w + BAR_GAP + COLORBAR + BAR_LABELS + GROUP_GAP
    for b in range(B):
        top = TOP + b * (block + IMAGE_GAP)
        gray = _gray(images[b])
        ax = lay.axes(LEFT, top + TITLE, PANEL, PANEL)
        ax.imshow(images[b], extent=extent)
        ax.set_title(captions[b] if captions else f"image {b + 1}", fontsize=8)
        _hide_ticks(ax)
        if b == 0:
            ax = lay.axes(LEFT, top + block - PANEL, PANEL, PANEL)
            ax.axis("off")
            ax.text(0, 0.5, f"upper row: [CLS] attention,\ncyan: {models[0].mass_fraction:.0%} of its mass\n\n"
                    "lower row: components\nof ReLU(S - mean),\none colour each;\nSE: spatial entropy",
                    fontsize=7, va="center", transform=ax.transAxes)
        x = LEFT + PANEL + GROUP_GAP
        for m, n in zip(models, heads):
            vmax = float(m.attn[b].max())
            for h in range(n):
                ax = lay.axes(x, top + TITLE, PANEL, PANEL)
                im = _attention_panel(ax, gray, m.attn[b, h], m.mass[b, h], vmax, extent)
                ax.set_title(f"head {h + 1}", fontsize=8)
                _hide_ticks(ax)
                ax = lay.axes(x, top + block - PANEL, PANEL, PANEL)
                _components_panel(ax, gray, m.components[b, h], extent, cmap)
                ax.set_title(f"SE {m.entropy[b, h]:.2f}, {int(m.components[b, h].max())} comp.", fontsize=8)
                _hide_ticks(ax)
                x += PANEL + HEAD_GAP
            bar = fig.colorbar(im, cax=lay.axes(x - HEAD_GAP + BAR_GAP, top + TITLE, COLORBAR, PANEL))
            bar.set_label("attention", fontsize=7)
            bar.ax.tick_params(labelsize=6)
            x += BAR_GAP + COLORBAR + BAR_LABELS + GROUP_GAP - HEAD_GAP
    if path is not None:
        from ..checkpoint import atomic_write

        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return fig
