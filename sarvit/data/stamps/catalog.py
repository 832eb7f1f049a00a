"""Which Tux Paint stamps are photographs, which class each belongs to, and the split by object.

A stamp is kept as a photographic cut-out when all of these hold (the rule is measured on
the file as shipped, before any resizing):

- it lies under one of a class's folders and under no folder named ``cartoon``, ``toys``
  or ``plastic`` (drawings, teddy bears and plastic flowers);
- it is a PNG with no ``.svg`` of the same name beside it (those PNGs are renderings of
  vector drawings);
- it is 8-bit true colour with an alpha channel (PIL mode ``RGBA``): palette-quantised
  and grey-with-alpha stamps are drawings or silhouettes;
- its shorter side is at least ``MIN_SIDE`` pixels;
- its visible pixels (alpha > 0) hold at least ``MIN_COLOURS`` distinct RGB colours, and
  at least ``MIN_COLOUR_RATIO`` distinct colours per visible pixel: a photograph has
  nearly one colour per pixel, a drawing a few flat colours over large areas;
- at most ``MAX_SOFT`` of its visible pixels are semi-transparent (0 < alpha < 255), so
  that the object mask is mostly exact rather than mostly void.

Stamps whose names start with the same word (``gnu-baby``, ``gnu-stand``; ``rabbit``,
``rabbit-2``) are one *object group*: the split puts a whole group on one side.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "StampClass", "Stamp", "CLASSES", "EXCLUDED_FOLDERS", "photo_statistics", "is_photograph",
    "object_group", "find_stamps", "split_by_object",
]

MIN_SIDE = 32
MIN_COLOURS = 1000
MIN_COLOUR_RATIO = 0.10
MAX_SOFT = 0.6
VAL_FRACTION = 0.25
EXCLUDED_FOLDERS = ("cartoon", "toys", "plastic")


@dataclass(frozen=True)
class StampClass:
    name: str
    folders: tuple[str, ...]  # relative to the stamps directory; sub-folders included
    supercategory: str


# Alphabetical, so that an ImageFolder's class index + 1 is the mask's class id.
CLASSES = (
    StampClass("birds", ("animals/birds",), "animal"),
    StampClass("fish", ("animals/fish",), "animal"),
    StampClass("flowers", ("plants/flowers",), "plant"),
    StampClass("fruit", ("food/fruit",), "food"),
    StampClass("insects", ("animals/insects",), "animal"),
    StampClass("mammals", ("animals/mammals", "animals/marsupials"), "animal"),
    StampClass("vegetables", ("food/vegetables",), "food"),
)


@dataclass(frozen=True)
class Stamp:
    path: Path
    name: str  # path relative to the stamps directory, with forward slashes
    label: int  # index into CLASSES
    group: str


def photo_statistics(rgba: np.ndarray) -> dict[str, float]:
    """Colour and alpha statistics of one stamp.

    Args:
        rgba: (H, W, 4) uint8.
    Returns: ``visible`` (pixels with alpha > 0), ``colours`` (distinct RGB triples among
    them), ``colour_ratio`` (colours / visible) and ``soft`` (fraction of visible pixels
    with 0 < alpha < 255).
    """
    alpha = rgba[..., 3]
    visible = alpha > 0
    rgb = rgba[..., :3][visible].astype(np.int64)  # (N, 3)
    codes = (rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]
    n = int(visible.sum())
    colours = int(np.unique(codes).size)
    soft = int((visible & (alpha < 255)).sum())
    return {"visible": n, "colours": colours, "colour_ratio": colours / max(n, 1), "soft": soft / max(n, 1)}


def is_photograph(path: Path) -> bool:
    """The module's rule, for one PNG file."""
    from PIL import Image

    if path.suffix.lower() != ".png" or path.with_suffix(".svg").exists():
        return False
    with Image.open(path) as im:
        if im.mode != "RGBA" or min(im.size) < MIN_SIDE:
            return False
        stats = photo_statistics(np.asarray(im))
    return stats["colours"] >= MIN_COLOURS and stats["colour_ratio"] >= MIN_COLOUR_RATIO and stats["soft"] <= MAX_SOFT


def object_group(stem: str) -> str:
    """The first word of a stamp's name: ``"gnu-baby-stand"`` -> ``"gnu"``, ``"Strawberry2"`` -> ``"strawberry"``."""
    word = re.split(r"[-_\s\d]", stem.lower())[0]
    return word or stem.lower()


def find_stamps(stamps_dir: Path, classes: tuple[StampClass, ...] = CLASSES) -> list[Stamp]:
    """Every photographic stamp of every class, sorted by class then name."""
    found = []
    for label, cls in enumerate(classes):
        for folder in cls.folders:
            for path in sorted((stamps_dir / folder).rglob("*.png")):
                rel = path.relative_to(stamps_dir)
                if set(rel.parts[:-1]) & set(EXCLUDED_FOLDERS) or not is_photograph(path):
                    continue
                found.append(Stamp(path, rel.as_posix(), label, object_group(path.stem)))
    return sorted(found, key=lambda s: (s.label, s.name))


def split_by_object(stamps: list[Stamp], seed: int, num_classes: int) -> dict[str, list[list[Stamp]]]:
    """Train/val stamps per class; no object group on both sides.

    Per class, the sorted groups are shuffled by ``seed``; ``max(1, round(VAL_FRACTION *
    groups))`` of them go to val, the rest to train. A class needs 3 groups at least.
    Returns: ``{"train": [stamps of class 0, ...], "val": [...]}``.
    """
    split: dict[str, list[list[Stamp]]] = {"train": [], "val": []}
    for label in range(num_classes):
        members = [s for s in stamps if s.label == label]
        groups = sorted({s.group for s in members})
        rng = np.random.default_rng([seed, 1, label])
        order = [groups[i] for i in rng.permutation(len(groups))]
        n_val = max(1, round(VAL_FRACTION * len(groups)))
        val_groups = set(order[:n_val])
        split["val"].append([s for s in members if s.group in val_groups])
        split["train"].append([s for s in members if s.group not in val_groups])
    return split
