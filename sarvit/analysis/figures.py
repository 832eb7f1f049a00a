"""Figures of attention maps. Everything drawn here is computed elsewhere (:mod:`.maps`).

``plot_attention_figure`` lays out one block of three rows per image and one column
group per model (titled with the model's name), one column per head:

- attention: the post-softmax [CLS] attention over the image, on one colour scale per
  image and model (from the smallest to the largest entry of its heads), with its colour
  bar: models with other grids spread their attention over other numbers of patches;
- mass: the image with the patches outside each head's 60%-mass mask darkened, titled
  with the number of patches kept (DINO's thresholded attention);
- components: the connected components of ``ReLU(S - mean)``, each in its own colour,
  over the image (Fig. 2 of the paper), titled with the head's spatial entropy.

The geometry is laid out in inches and every title is wrapped (or, for image captions,
shortened) to the width it has, so titles neither overlap nor get clipped whatever the
number of models, heads and images or the length of the names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["ModelMaps", "plot_attention_figure"]

PANEL, TITLE, HEAD_GAP, GROUP_GAP, IMAGE_GAP = 1.45, 0.4, 0.06, 0.3, 0.22  # inches
LEFT, RIGHT, MARGIN, BOTTOM, COLORBAR, BAR_GAP, BAR_LABELS = 0.15, 0.1, 0.12, 0.15, 0.1, 0.08, 0.62
ROWS = 3  # attention, mass, components
TITLE_SIZE, NAME_SIZE, PANEL_SIZE = 11, 10, 8  # points
LINE = 1.3 / 72  # inches of one line per point of font size
DIM = 0.7  # opacity of the veil over the patches a mass mask drops


@dataclass
class ModelMaps:
    """Arrays of one model for ``B`` images, grid ``h x w`` with ``heads`` heads.

    Attributes:
        name: the column group's title (the run's name).
        attn: ``(B, heads, h, w)`` post-softmax attention.
        mass: ``(B, heads, h, w)`` bool, the 60%-mass mask.
        components: ``(B, heads, h, w)`` int labels, 0 background.
        entropy: ``(B, heads)`` spatial entropy of each map.
        mass_fraction: the mass the mask keeps (for the titles).
    """

    name: str
    attn: np.ndarray
    mass: np.ndarray
    components: np.ndarray
    entropy: np.ndarray
    mass_fraction: float = 0.6


def _text_width(text: str, size: float, bold: bool = False) -> float:
    """Inches that ``text`` takes at ``size`` points in matplotlib's default font."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextPath

    if not text:
        return 0.0
    path = TextPath((0, 0), text, size=size, prop=FontProperties(weight="bold" if bold else "normal"))
    return float(path.get_extents().width) / 72


def _fit(text: str, width: float, size: float, bold: bool = False, max_lines: int | None = None) -> str:
    """``text`` broken into lines no wider than ``width`` inches: at spaces, inside a word
    longer than a line, and shortened with an ellipsis beyond ``max_lines``."""
    fits = lambda s: _text_width(s, size, bold) <= width  # noqa: E731
    lines: list[str] = []
    line = ""
    for word in text.split():
        trial = f"{line} {word}" if line else word
        if fits(trial):
            line = trial
            continue
        if line:
            lines.append(line)
        while not fits(word) and len(word) > 1:  # a word wider than a line: cut it
            cut = max(k for k in range(1, len(word)) if fits(word[:k]) or k == 1)
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    lines.append(line)
    if max_lines is not None and len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and not fits(last + "…"):
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last + "…"]
    return "\n".join(lines)


def _first_fitting(options: list[str], width: float, size: float) -> str:
    """The first of ``options`` no wider than ``width`` inches (else the last)."""
    return next((t for t in options if _text_width(t, size) <= width), options[-1])


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

    def text(self, x: float, y: float, text: str, **style):
        return self.fig.text(x / self.width, 1 - y / self.height, text, **style)


def _attention_panel(ax, gray, attn, vmin, vmax, extent):
    ax.imshow(gray, cmap="gray", vmin=0, vmax=1, extent=extent)
    return ax.imshow(attn, cmap="inferno", vmin=vmin, vmax=vmax, alpha=0.75, interpolation="nearest", extent=extent)


def _mass_panel(ax, image, mass, extent):
    from matplotlib.colors import ListedColormap

    ax.imshow(image, extent=extent)
    dropped = np.ma.masked_array(np.zeros(mass.shape), mask=mass)  # (h, w): drawn where the mask drops
    ax.imshow(dropped, cmap=ListedColormap(["black"]), vmin=0, vmax=1, alpha=DIM, interpolation="nearest",
              extent=extent)
    h, w = mass.shape
    if mass.any():  # outline of the kept patches, closed along the image border (seen on dark images too)
        fine = np.pad(np.repeat(np.repeat(mass.astype(float), 8, axis=0), 8, axis=1), 1)  # (8h + 2, 8w + 2)
        ys = (np.arange(8 * h + 2) - 0.5) * extent[2] / (8 * h)
        xs = (np.arange(8 * w + 2) - 0.5) * extent[1] / (8 * w)
        ax.contour(xs, ys, fine, levels=[0.5], colors="cyan", linewidths=0.8)
        ax.set_xlim(extent[0], extent[1])
        ax.set_ylim(extent[2], extent[3])


def _components_panel(ax, gray, labels, extent, cmap):
    ax.imshow(gray, cmap="gray", vmin=0, vmax=1, extent=extent)
    shown = np.ma.masked_equal(labels, 0)
    ax.imshow((shown - 1) % cmap.N, cmap=cmap, vmin=0, vmax=cmap.N - 1, alpha=0.6, interpolation="nearest",
              extent=extent)


def _hide_ticks(ax):
    ax.set_xticks([])
    ax.set_yticks([])


def _lines(text: str) -> int:
    return text.count("\n") + 1


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
    groups = [w + BAR_GAP + COLORBAR + BAR_LABELS for w in widths]  # with it
    width = LEFT + PANEL + sum(GROUP_GAP + g for g in groups) + RIGHT
    heading = _fit(title or "Last block, per head: query ([CLS] or mean) attention, its 60%-mass mask and "
                   "components of ReLU(S - mean)", width - 2 * MARGIN, TITLE_SIZE, bold=True)
    names = [_fit(m.name, g, NAME_SIZE, bold=True) for m, g in zip(models, groups)]
    names_top = MARGIN + _lines(heading) * TITLE_SIZE * LINE + 0.08
    top = names_top + max(_lines(n) for n in names) * NAME_SIZE * LINE + 0.12
    block = ROWS * (TITLE + PANEL)
    height = top + B * block + (B - 1) * IMAGE_GAP + BOTTOM
    fig = Figure(figsize=(width, height), dpi=110)
    lay = _Layout(fig, width, height)
    extent = (0, W, H, 0)
    cmap = _component_colours()
    lay.text(width / 2, MARGIN, heading, ha="center", va="top", fontsize=TITLE_SIZE, weight="bold")
    x = LEFT + PANEL + GROUP_GAP
    for name, w, g in zip(names, widths, groups):
        lay.text(x + g / 2, names_top, name, ha="center", va="top", fontsize=NAME_SIZE, weight="bold")
        x += g + GROUP_GAP
    fraction = f"{models[0].mass_fraction:.0%}" if models else "60%"
    for b in range(B):
        row = [top + b * (block + IMAGE_GAP) + r * (TITLE + PANEL) + TITLE for r in range(ROWS)]  # panel tops
        gray = _gray(images[b])
        ax = lay.axes(LEFT, row[0], PANEL, PANEL)
        ax.imshow(images[b], extent=extent)
        ax.set_title(_fit(captions[b], PANEL, PANEL_SIZE, max_lines=2) if captions else f"image {b + 1}",
                     fontsize=PANEL_SIZE)
        _hide_ticks(ax)
        if b == 0:
            ax = lay.axes(LEFT, row[1], PANEL, 2 * PANEL + TITLE)
            ax.axis("off")
            ax.text(0, 0.5, f"row 1: the query's\nattention ([CLS] or mean\npatch query; post-softmax),"
                    f"\ncolour bar per model\n\nrow 2: the patches "
                    f"holding\n{fraction} of the attention\nmass; the others darkened\n\nrow 3: components\nof "
                    "ReLU(S - mean),\none colour each;\nSE: spatial entropy", fontsize=7, va="center",
                    transform=ax.transAxes)
        x = LEFT + PANEL + GROUP_GAP
        for m, n in zip(models, heads):
            vmin, vmax = float(m.attn[b].min()), float(m.attn[b].max())
            vmax = vmax if vmax > vmin else vmin + max(abs(vmin), 1.0) * 1e-6  # a flat map still gets a scale
            for h in range(n):
                ax = lay.axes(x, row[0], PANEL, PANEL)
                im = _attention_panel(ax, gray, m.attn[b, h], vmin, vmax, extent)
                ax.set_title(f"head {h + 1}", fontsize=PANEL_SIZE)
                _hide_ticks(ax)
                ax = lay.axes(x, row[1], PANEL, PANEL)
                _mass_panel(ax, images[b], m.mass[b, h], extent)
                kept = f"{int(m.mass[b, h].sum())}/{m.mass[b, h].size}"
                ax.set_title(_first_fitting([f"{m.mass_fraction:.0%} mass: {kept} patches",
                                             f"{m.mass_fraction:.0%} mass: {kept}", kept], PANEL, PANEL_SIZE),
                             fontsize=PANEL_SIZE)
                _hide_ticks(ax)
                ax = lay.axes(x, row[2], PANEL, PANEL)
                _components_panel(ax, gray, m.components[b, h], extent, cmap)
                ax.set_title(f"SE {m.entropy[b, h]:.2f}, {int(m.components[b, h].max())} comp.", fontsize=PANEL_SIZE)
                _hide_ticks(ax)
                x += PANEL + HEAD_GAP
            bar = fig.colorbar(im, cax=lay.axes(x - HEAD_GAP + BAR_GAP, row[0], COLORBAR, PANEL))
            bar.set_label("attention", fontsize=7)
            bar.ax.tick_params(labelsize=6)
            x += BAR_GAP + COLORBAR + BAR_LABELS + GROUP_GAP - HEAD_GAP
    if path is not None:
        from ..checkpoint import atomic_write

        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return fig
