"""Images with per-pixel class masks: PASCAL VOC 2012 and ``images/`` + ``masks/`` folders.

``open_masked(name, root)`` returns a :class:`MaskedImages` whose items are
``(stem, PIL RGB image, (H, W) uint8 class mask)``; 0 is background and 255 is void
(object borders, "don't care"). Two layouts:

- ``voc2012``: ``VOC2012/JPEGImages/<stem>.jpg``, ``VOC2012/SegmentationClass/<stem>.png``
  (palette PNGs, whose palette indices are the class ids) and the stems of
  ``VOC2012/ImageSets/Segmentation/val.txt`` (1,449 images). ``--data-root`` may point at
  a folder holding ``VOCdevkit/VOC2012``, ``VOC2012``, or at ``VOC2012`` itself.
- any folder with ``images/<stem>.<jpg|png|...>`` and ``masks/<stem>.png`` (single-channel
  PNGs of class ids, 255 void), same stems on both sides; an optional ``classes.txt``
  names the ids (line i names id i).

A listed image without its mask (or the reverse) is an error naming the first such
files: nothing is silently skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from .sources import DatasetNotFound, data_home, load_image

__all__ = ["VOC_CLASSES", "MaskedImages", "open_masked", "read_mask"]

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MASK_MODES = ("P", "L", "I", "I;16")


def read_mask(path: str | Path) -> np.ndarray:
    """A class-id PNG as a ``(H, W)`` integer array (palette PNGs give their indices)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode not in MASK_MODES:
                raise UserError(
                    f"mask {path} is a {im.mode} image; masks must be single-channel PNGs of class ids "
                    "(mode P, L or I: 0 background, 255 void), not colour renderings"
                )
            return np.array(im).astype(np.int64)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UserError(f"cannot read mask {path} ({type(err).__name__}: {err}); remove or replace it") from err


@dataclass
class MaskedImages:
    """``(stem, image path, mask path)`` triples; indexing loads ``(stem, RGB image, mask)``."""

    items: list[tuple[str, Path, Path]]
    class_names: dict[int, str]
    description: str

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        stem, image_path, mask_path = self.items[index]
        image, mask = load_image(str(image_path)), read_mask(mask_path)
        if mask.shape != (image.height, image.width):
            raise UserError(
                f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image {image_path} is "
                f"{image.width}x{image.height}; a mask must have its image's size"
            )
        return stem, image, mask


def _first(names: list[str], count: int = 5) -> str:
    return ", ".join(names[:count]) + (f" (and {len(names) - count} more)" if len(names) > count else "")


def _voc_root(root: str | None) -> Path:
    bases = [Path(root).expanduser()] if root else [data_home() / "voc2012", Path("data") / "voc2012"]
    looked = [p for b in bases for p in (b / "VOCdevkit" / "VOC2012", b / "VOC2012", b)]
    for path in looked:
        if (path / "JPEGImages").is_dir() and (path / "SegmentationClass").is_dir():
            return path
    places = "\n".join(f"  - {p}" for p in looked)
    raise DatasetNotFound(
        f"PASCAL VOC 2012 not found. Looked for JPEGImages/ and SegmentationClass/ in:\n{places}\n"
        "Extract VOCtrainval_11-May-2012.tar and pass --data-root to the folder that holds VOCdevkit/."
    )


def _voc(root: str | None, split: str) -> MaskedImages:
    base = _voc_root(root)
    listing = base / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not listing.is_file():
        raise DatasetNotFound(f"{listing} is missing: VOC 2012 lists its segmentation {split} images there")
    stems = [s.strip() for s in listing.read_text().split() if s.strip()]
    items = [(s, base / "JPEGImages" / f"{s}.jpg", base / "SegmentationClass" / f"{s}.png") for s in stems]
    missing = [str(p) for _, img, msk in items for p in (img, msk) if not p.is_file()]
    if missing:
        raise DatasetNotFound(f"{len(missing)} files listed by {listing} are missing: {_first(missing)}")
    names = dict(enumerate(VOC_CLASSES))
    return MaskedImages(items, names, f"PASCAL VOC 2012 {split} ({len(items)} images) at {base}")


def _by_stem(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in suffixes and not path.name.startswith("."):
            if path.stem in found:
                raise UserError(f"{folder} holds two files for {path.stem!r}: {found[path.stem].name}, {path.name}")
            found[path.stem] = path
    return found


def _folder(path: Path) -> MaskedImages:
    images, masks = path / "images", path / "masks"
    if not images.is_dir() or not masks.is_dir():
        raise DatasetNotFound(f"{path} needs images/ and masks/ sub-folders (images/<stem>.jpg, masks/<stem>.png)")
    by_image, by_mask = _by_stem(images, IMAGE_SUFFIXES), _by_stem(masks, (".png",))
    no_mask = sorted(set(by_image) - set(by_mask))
    no_image = sorted(set(by_mask) - set(by_image))
    if no_mask or no_image:
        parts = []
        if no_mask:
            parts.append(f"{len(no_mask)} images without a mask in {masks}: {_first(no_mask)}")
        if no_image:
            parts.append(f"{len(no_image)} masks without an image in {images}: {_first(no_image)}")
        raise UserError("; ".join(parts) + ". Every image needs masks/<stem>.png and every mask its image")
    if not by_image:
        raise DatasetNotFound(f"{images} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    items = [(s, by_image[s], by_mask[s]) for s in sorted(by_image)]
    names_file = path / "classes.txt"
    names = {}
    if names_file.is_file():
        names = {i: n.strip() for i, n in enumerate(names_file.read_text().splitlines()) if n.strip()}
    return MaskedImages(items, names, f"{len(items)} masked images at {path}")


def open_masked(name: str, root: str | None = None, split: str = "val") -> MaskedImages:
    """``"voc2012"`` (under ``root``) or a folder with ``images/`` and ``masks/``."""
    if name == "voc2012":
        return _voc(root, split)
    path = Path(name).expanduser()
    if path.is_dir():
        return _folder(path)
    raise DatasetNotFound(
        f"no masked dataset {name!r}: give voc2012 (with --data-root) or a folder holding images/ and masks/"
    )
