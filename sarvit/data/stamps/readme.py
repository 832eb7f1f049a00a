"""The README written inside a built stamps dataset: source, licence, rule, classes, counts, layout."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .backgrounds import BACKGROUNDS
from .catalog import CLASSES, EXCLUDED_FOLDERS, MAX_SOFT, MIN_COLOUR_RATIO, MIN_COLOURS, MIN_SIDE, VAL_FRACTION
from .compose import JITTER, SCALE

if TYPE_CHECKING:
    from .build import StampsSummary

__all__ = ["render_readme"]


def _class_table(summary: StampsSummary) -> list[str]:
    rows = [
        "| id | class | Tux Paint folders | train objects | val objects | train images | val images |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for i, cls in enumerate(CLASSES):
        rows.append(
            f"| {i + 1} | {cls.name} | {', '.join(f'`{f}/`' for f in cls.folders)} | {len(summary.objects['train'][i])} "
            f"| {len(summary.objects['val'][i])} | {summary.images['train'][i]} | {summary.images['val'][i]} |"
        )
    total = {s: sum(len(o) for o in summary.objects[s]) for s in ("train", "val")}
    rows.append(f"| | total | | {total['train']} | {total['val']} | {sum(summary.images['train'])} "
                f"| {sum(summary.images['val'])} |")
    return rows


def _object_lists(summary: StampsSummary) -> list[str]:
    lines = []
    for i, cls in enumerate(CLASSES):
        for split in ("train", "val"):
            names = ", ".join(n.rsplit("/", 1)[-1].removesuffix(".png") for n in summary.objects[split][i])
            lines.append(f"- {cls.name}, {split}: {names}")
    return lines


def render_readme(summary: StampsSummary) -> str:
    """Markdown text; it depends only on the build's options, so equal seeds give equal bytes."""
    from ... import __version__

    backgrounds = [f"  - `{b.name}` ({'scikit-image `skimage.data`' if b.source == 'skimage' else 'scikit-learn `load_sample_images`'}): {b.licence}"
                   for b in BACKGROUNDS]
    parts = [
        "# Stamps: a masked classification and segmentation benchmark from real photographs",
        "",
        f"Built by sarvit {__version__} with:",
        "",
        f"    {summary.command}",
        "",
        f"Seed {summary.seed}; images of {summary.size}x{summary.size} pixels; one object per image.",
        "",
        "## Source and licence",
        "",
        f"- Objects: photographic cut-outs (PNG with alpha) of the Debian package `tuxpaint-stamps-default` "
        f"(version {summary.package_version}, from `{summary.stamps_dir}`), Tux Paint's stamps, "
        "copyright 2002-2022 Bill Kendrick and contributors, licensed under the GNU GPL version 2 or later. "
        "The images and masks here are derived from them: distribute this folder under GPL-2.0-or-later.",
        "- Backgrounds (random crops): images bundled with scikit-image (BSD-3-Clause package) and "
        "scikit-learn (BSD-3-Clause package); per image:",
        *backgrounds,
        "",
        "## Which stamps are photographs",
        "",
        f"A stamp is used when it lies under a class's folders but under no `{'/`, `'.join(EXCLUDED_FOLDERS)}/` folder; "
        "has no `.svg` of the same name beside it; is 8-bit RGBA; has a shorter side of at least "
        f"{MIN_SIDE} px; its visible pixels (alpha > 0) hold at least {MIN_COLOURS} distinct colours and at least "
        f"{MIN_COLOUR_RATIO:g} distinct colours per visible pixel (photographs have nearly one colour per pixel, "
        f"drawings a few flat colours); and at most {MAX_SOFT:.0%} of its visible pixels are semi-transparent.",
        "",
        "## Classes and counts",
        "",
        "An *object* is one stamp (one photograph). The split is by object group: stamps whose names start with "
        "the same word (`gnu-baby`, `gnu-stand`) are one group, and no group (hence no cut-out) is in both "
        f"train and val; per class, {VAL_FRACTION:.0%} of the groups (at least one) go to val, chosen by the seed. "
        "Images cycle through their split's objects of the class.",
        "",
        *_class_table(summary),
        "",
        "Class names follow Tux Paint's folders: `insects` includes a slug and a woodlouse, `fish` a lobster, "
        "`mammals` the marsupials.",
        "",
        *_object_lists(summary),
        "",
        "## Layout",
        "",
        "- `train/<class>/<class>_<i>.png`, `val/<class>/<class>_<i>.png`: an ImageFolder, "
        "`sarvit train --data THIS_FOLDER` reads it. The class index of the ImageFolder (alphabetical) plus 1 "
        "is the class id of the masks and of the COCO categories.",
        "- `images/<stem>.png` + `masks/<stem>.png`: the validation images again (same bytes as `val/`) with "
        "their class masks, the layout `sarvit jaccard --data THIS_FOLDER` reads. Masks are single-channel "
        "(mode L) PNGs: 0 background, 1..C the class id (order of `classes.txt`, whose line 0 is `background`), "
        "255 void. With `a` the object's 8-bit alpha after resizing: `a = 0` is background, `a = 255` the class, "
        "and `0 < a < 255` (the soft edge) void. The image is composed with the same `a`, so pixels marked "
        "background or class are exactly background or object.",
        "- `train_masks/<stem>.png`: the class masks of the training images `train/<class>/<stem>.png`, same "
        "encoding. With `images/` + `masks/` for validation they make the layout `sarvit segment --data "
        "masks:THIS_FOLDER` trains on; `sarvit detect --data coco_json:THIS_FOLDER` reads `annotations.json`.",
        "- `annotations.json`: COCO-style instances of every image of both splits (`images[].split` says which; "
        "`file_name` is relative to this folder): `categories` (ids 1..C), one annotation per image with "
        "`bbox` `[x, y, width, height]` in pixels, `area`, `iscrowd` 0, `segmentation` as COCO's *uncompressed* "
        "RLE (`{\"size\": [H, W], \"counts\": [...]}`, column-major, starting with a run of 0s; "
        "`pycocotools.mask.frPyObjects` reads it) and `stamp`, the source stamp's path. The instance mask is "
        "`a >= 128`; the box and area are those of the instance mask.",
        "- `classes.txt`: `background` then the class names, line i naming id i.",
        "",
        "## Composition",
        "",
        "Each image: a background chosen uniformly, a random square crop of side U(0.35, 1) x its shorter side, "
        "resized (bilinear) and flipped with probability 0.5; the object resized (bilinear, premultiplied alpha) "
        f"to a longest side of U({SCALE[0]}, {SCALE[1]}) x the image side, flipped with probability 0.5, "
        f"brightness, contrast and saturation factors from U({1 - JITTER:g}, {1 + JITTER:g}), pasted at a uniform "
        "position fully inside the image, alpha-composited with its soft alpha. Every draw comes from "
        "`numpy.random.default_rng` seeded by (seed, purpose, split, class, index): the same seed gives the same "
        "bytes.",
        "",
    ]
    return "\n".join(parts)
