"""Datasets of the dense tasks: readers, joint image + box + mask transforms, seeded samples.

Detection (``sarvit detect --data``):

- ``voc2007``: PASCAL VOC 2007 under ``--data-root`` (a folder holding ``VOCdevkit/VOC2007``,
  ``VOC2007``, or ``VOC2007`` itself): ``Annotations/<stem>.xml``, ``JPEGImages/<stem>.jpg``,
  training on ``ImageSets/Main/trainval.txt``, validation on ``ImageSets/Main/test.txt``
  (Table 5's protocol; add 2012 trainval by listing its images in a COCO JSON). Objects
  marked ``difficult`` are left out of training and count as crowd regions (neither hit
  nor miss) in the validation, as VOC's evaluation ignores them.
- ``coco_json:DIR``: ``DIR/annotations_train.json`` and ``DIR/annotations_val.json``, or
  one ``DIR/annotations.json`` whose ``images[].split`` is ``train`` or ``val`` (the stamps
  benchmark's). COCO instances: ``file_name`` relative to ``DIR``, ``bbox`` ``[x, y, w, h]``,
  ``segmentation`` as polygons or RLE (compressed or not), ``iscrowd``; categories become
  labels 1..C in the order of their ids.

Segmentation (``sarvit segment --data``): class-id masks, 0 background, 255 void:

- ``voc2012``: ``SegmentationClass`` with ``ImageSets/Segmentation/train.txt`` / ``val.txt``
  (``sarvit.data.masks``).
- ``masks:DIR``: validation images in ``DIR/images`` + ``DIR/masks`` (the layout ``sarvit
  jaccard`` reads), training masks in ``DIR/train_masks/<stem>.png`` with their images in
  ``DIR/train_images/`` or, without that folder, anywhere under ``DIR/train/`` (the stamps
  benchmark's ImageFolder); ``DIR/classes.txt`` names the ids (line i names id i).

A missing folder, listing, annotation or image raises :class:`DatasetNotFound` naming where
it looked; nothing is skipped silently.

Transforms (torchvision ``transforms.v2`` on ``tv_tensors``, so boxes and masks follow the
image): training images are rescaled so that their longer side is ``size`` times U(0.5, 1.5)
(ViTDet's scale jitter, milder), randomly cropped (padded when smaller) to ``size x size``
and flipped with probability 0.5; evaluation images are resized to a longer side of
``size`` and padded at the bottom and right to ``size x size``. Padding is 0 in the image and
in instance masks, 255 (void) in class masks. Images leave as float ``(3, size, size)`` in
[0, 1]: the models normalise them.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data.masks import VOC_CLASSES, MaskedImages, open_masked
from ..data.pipeline import seeded_rngs
from ..data.sources import DatasetNotFound, data_home, load_image
from ..errors import UserError

__all__ = ["DetectionImages", "open_detection", "open_segmentation", "DenseSamples", "dense_transform",
           "detection_collate", "segmentation_collate", "SCALE_RANGE", "VOC_DETECTION_CLASSES"]

SCALE_RANGE = (0.5, 1.5)
VOC_DETECTION_CLASSES = VOC_CLASSES[1:]
VOID = 255


@dataclass
class Instance:
    """One annotated object: ``box`` ``[x0, y0, x1, y1]`` pixels, ``label`` in 1..C, ``crowd`` (ignored
    in scoring), ``mask``: a COCO segmentation (polygons or RLE) or None."""

    box: list[float]
    label: int
    crowd: bool = False
    mask: object = None


@dataclass
class DetectionImages:
    """Images with instances: ``items[i] = (image path, [Instance, ...])``; ``classes`` are names of labels 1..C."""

    items: list[tuple[Path, list[Instance]]]
    classes: list[str]
    masks: bool
    description: str

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        """``(PIL RGB image, instances)``."""
        path, instances = self.items[index]
        image = load_image(str(path))
        return image, instances


# --- PASCAL VOC 2007 ----------------------------------------------------------------------------


def _voc_base(root: str | None, year: str, needed: tuple[str, ...]) -> Path:
    bases = [Path(root).expanduser()] if root else [data_home() / f"voc{year}", Path("data") / f"voc{year}"]
    looked = [p for b in bases for p in (b / "VOCdevkit" / f"VOC{year}", b / f"VOC{year}", b)]
    for path in looked:
        if all((path / n).is_dir() for n in needed):
            return path
    places = "\n".join(f"  - {p}" for p in looked)
    raise DatasetNotFound(f"PASCAL VOC {year} not found. Looked for {' and '.join(n + '/' for n in needed)} in:\n"
                          f"{places}\nExtract the VOC{year} tar files and pass --data-root to the folder that holds "
                          "VOCdevkit/.")


def _voc_objects(xml_path: Path) -> list[Instance]:
    try:
        tree = ET.parse(xml_path)
    except (ET.ParseError, OSError) as err:
        raise UserError(f"cannot read the annotation {xml_path} ({err}); restore it from the VOC archive") from None
    out = []
    for obj in tree.getroot().iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in VOC_DETECTION_CLASSES:
            raise UserError(f"{xml_path}: unknown VOC class {name!r}; VOC has {', '.join(VOC_DETECTION_CLASSES)}")
        box = obj.find("bndbox")
        x0, y0, x1, y1 = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        # VOC's pixel indices are 1-based and inclusive: [x0 - 1, x1] in continuous coordinates
        out.append(Instance([x0 - 1, y0 - 1, x1, y1], VOC_DETECTION_CLASSES.index(name) + 1,
                            crowd=(obj.findtext("difficult") or "0").strip() == "1"))
    return out


def _voc2007(root: str | None, split: str) -> DetectionImages:
    base = _voc_base(root, "2007", ("Annotations", "JPEGImages"))
    name = "trainval" if split == "train" else "test"
    listing = base / "ImageSets" / "Main" / f"{name}.txt"
    if not listing.is_file():
        raise DatasetNotFound(f"{listing} is missing: VOC 2007 lists its {name} images there (the {split} split "
                              "of sarvit detect)")
    stems = listing.read_text().split()
    missing = [str(p) for s in stems for p in (base / "JPEGImages" / f"{s}.jpg", base / "Annotations" / f"{s}.xml")
               if not p.is_file()]
    if missing:
        raise DatasetNotFound(f"{len(missing)} files listed by {listing} are missing: {', '.join(missing[:5])}")
    items = []
    for s in stems:
        objects = _voc_objects(base / "Annotations" / f"{s}.xml")
        if split == "train":
            objects = [o for o in objects if not o.crowd]
        items.append((base / "JPEGImages" / f"{s}.jpg", objects))
    return DetectionImages(items, list(VOC_DETECTION_CLASSES), False,
                           f"PASCAL VOC 2007 {name} ({len(items)} images) at {base}")


# --- COCO-style JSON --------------------------------------------------------------------------------


def _coco_file(folder: Path, split: str) -> tuple[Path, bool]:
    """The JSON of ``split`` and whether its images must be filtered by ``images[].split``."""
    own = folder / f"annotations_{split}.json"
    if own.is_file():
        return own, False
    shared = folder / "annotations.json"
    if shared.is_file():
        return shared, True
    raise DatasetNotFound(f"no COCO annotations for the {split} split in {folder}: looked for {own} and {shared} "
                          "(with images[].split = train/val)")


def _coco(folder: Path, split: str) -> DetectionImages:
    if not folder.is_dir():
        raise DatasetNotFound(f"coco_json:{folder}: no such folder")
    path, by_split = _coco_file(folder, split)
    try:
        coco = json.loads(path.read_text())
        categories = sorted(coco["categories"], key=lambda c: c["id"])
        images = coco["images"]
        annotations = coco.get("annotations", [])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path} is not a COCO instances file ({type(err).__name__}: {err}); it needs images, "
                        "annotations and categories") from None
    if by_split:
        if any("split" not in im for im in images):
            raise UserError(f"{path} serves both splits but its images have no 'split' field; add it, or write "
                            "annotations_train.json and annotations_val.json")
        images = [im for im in images if im["split"] == split]
    if not images:
        raise DatasetNotFound(f"{path} lists no {split} images")
    label = {c["id"]: i + 1 for i, c in enumerate(categories)}
    per_image: dict[int, list[Instance]] = {im["id"]: [] for im in images}
    masks = False
    for ann in annotations:
        if ann["image_id"] not in per_image:
            continue
        if ann["category_id"] not in label:
            raise UserError(f"{path}: annotation {ann.get('id')} has category {ann['category_id']}, not in categories")
        x, y, w, h = ann["bbox"]
        masks = masks or ann.get("segmentation") is not None
        per_image[ann["image_id"]].append(Instance([x, y, x + w, y + h], label[ann["category_id"]],
                                                   bool(ann.get("iscrowd", 0)), ann.get("segmentation")))
    items = [(folder / im["file_name"], per_image[im["id"]]) for im in images]
    missing = [str(p) for p, _ in items if not p.is_file()]
    if missing:
        raise DatasetNotFound(f"{len(missing)} images listed by {path} are missing: {', '.join(missing[:5])}")
    if masks and any(o.mask is None for _, objs in items for o in objs):
        raise UserError(f"{path}: some annotations have a segmentation and some not; give every instance its mask, "
                        "or none (boxes only)")
    if split == "train":  # crowd regions are not instances to learn; in validation they are ignored
        items = [(p, [o for o in objs if not o.crowd]) for p, objs in items]
    return DetectionImages(items, [c["name"] for c in categories], masks,
                           f"COCO JSON {path.name} ({len(items)} {split} images) in {folder}")


def open_detection(data: str, root: str | None, split: str) -> DetectionImages:
    """``voc2007`` or ``coco_json:DIR``; ``split`` is ``train`` or ``val``."""
    if data == "voc2007":
        return _voc2007(root, split)
    if data.startswith("coco_json:"):
        return _coco(Path(data.removeprefix("coco_json:")).expanduser(), split)
    raise DatasetNotFound(f"no detection dataset {data!r}: give voc2007 (with --data-root) or coco_json:DIR")


# --- segmentation ---------------------------------------------------------------------------------


def _train_masks(folder: Path) -> MaskedImages:
    masks = folder / "train_masks"
    if not masks.is_dir():
        raise DatasetNotFound(f"{masks} is missing: masks:{folder} trains on train_masks/<stem>.png with the images in "
                              "train_images/ (or under train/)")
    images = folder / "train_images" if (folder / "train_images").is_dir() else folder / "train"
    if not images.is_dir():
        raise DatasetNotFound(f"no training images for {masks}: looked in {folder / 'train_images'} and {images}")
    by_stem = {p.stem: p for p in sorted(images.rglob("*")) if p.is_file() and not p.name.startswith(".")}
    stems = sorted(p.stem for p in masks.glob("*.png"))
    if not stems:
        raise DatasetNotFound(f"{masks} holds no .png masks")
    missing = [s for s in stems if s not in by_stem]
    if missing:
        raise DatasetNotFound(f"{len(missing)} masks in {masks} have no image in {images}: {', '.join(missing[:5])}")
    return MaskedImages([(s, by_stem[s], masks / f"{s}.png") for s in stems], {}, f"{len(stems)} masked images at "
                        f"{masks}")


def _classes_of(folder: Path) -> list[str]:
    names = folder / "classes.txt"
    if not names.is_file():
        raise DatasetNotFound(f"{names} is missing: masks:{folder} names its class ids there (line i names id i, "
                              "line 0 the background)")
    return [n.strip() for n in names.read_text().splitlines() if n.strip()]


def open_segmentation(data: str, root: str | None, split: str) -> tuple[MaskedImages, list[str]]:
    """``voc2012`` or ``masks:DIR``: the masked images of ``split`` and the class names (id 0 first)."""
    if data == "voc2012":
        return open_masked("voc2012", root, split), list(VOC_CLASSES)
    if data.startswith("masks:"):
        folder = Path(data.removeprefix("masks:")).expanduser()
        if not folder.is_dir():
            raise DatasetNotFound(f"masks:{folder}: no such folder")
        images = _train_masks(folder) if split == "train" else open_masked(str(folder), None, "val")
        return images, _classes_of(folder)
    raise DatasetNotFound(f"no segmentation dataset {data!r}: give voc2012 (with --data-root) or masks:DIR")


# --- transforms and samples -----------------------------------------------------------------------


def dense_transform(size: int, train: bool, semantic: bool):
    """The joint transform of ``(image, target)``; see the module docstring."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    fill = {tv_tensors.Mask: VOID if semantic else 0, "others": 0}
    if train:
        steps = [v2.ScaleJitter((size, size), scale_range=SCALE_RANGE, antialias=True),
                 v2.RandomCrop(size, pad_if_needed=True, fill=fill), v2.RandomHorizontalFlip(0.5)]
    else:
        steps = [v2.Resize(size=None, max_size=size, antialias=True), _PadTo(size, fill)]
    if not semantic:
        steps.append(v2.SanitizeBoundingBoxes(min_size=1.0, labels_getter=_labels_and_crowd))
    return v2.Compose([*steps, v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True)])


def _labels_and_crowd(sample):
    _, target = sample
    return target["labels"], target["iscrowd"], target["masks"]


class _PadTo:
    """Pad ``(image, target)`` at the bottom and right to ``size x size`` with ``fill``."""

    def __init__(self, size: int, fill: dict) -> None:
        self.size, self.fill = size, fill

    def __call__(self, image, target):
        from torchvision.transforms import v2

        h, w = image.shape[-2:]
        return v2.Pad([0, 0, self.size - w, self.size - h], fill=self.fill)(image, target)


def _detection_target(instances: list[Instance], height: int, width: int, masks: bool):
    """``{"boxes": BoundingBoxes (N, 4), "labels": (N,), "iscrowd": (N,), "masks": Mask (N, H, W)}``."""
    from torchvision import tv_tensors

    boxes = torch.tensor([o.box for o in instances], dtype=torch.float32).reshape(-1, 4)  # (N, 4)
    target = {
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
        "labels": torch.tensor([o.label for o in instances], dtype=torch.int64),
        "iscrowd": torch.tensor([int(o.crowd) for o in instances], dtype=torch.int64),
        "masks": tv_tensors.Mask(torch.from_numpy(np.stack([_decode(o.mask, height, width) for o in instances]))
                                 if masks and instances else torch.zeros((0 if masks else len(instances), height,
                                                                         width), dtype=torch.uint8)),
    }
    return target


def _decode(segmentation, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, or RLE compressed or not) -> ``(H, W)`` uint8."""
    from pycocotools import mask as coco_mask

    if isinstance(segmentation, list):  # polygons
        rle = coco_mask.merge(coco_mask.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        rle = coco_mask.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return coco_mask.decode(rle).astype(np.uint8)


class DenseSamples(Dataset):
    """``ds[(epoch, i)] -> (image (3, S, S) float, target)`` with RNGs seeded by (seed, epoch, i), as
    :class:`sarvit.data.pipeline.SeededTransform` does for classification.

    ``target`` is the detection dict (``boxes`` ``(N, 4)`` xyxy, ``labels``, ``iscrowd``,
    ``masks`` ``(N, S, S)`` uint8) of a :class:`DetectionImages`, or the ``(S, S)`` int64
    class mask of a :class:`MaskedImages`.
    """

    def __init__(self, images, transform, seed: int, masks: bool = False) -> None:
        self.images, self.transform, self.seed, self.masks = images, transform, seed, masks
        self.indices = None  # the loop records subsets; the dense tasks train on the whole split

    def __len__(self) -> int:
        return len(self.images)

    def _raw(self, i: int):
        from torchvision import tv_tensors
        from torchvision.transforms.v2 import functional as F

        if isinstance(self.images, DetectionImages):
            image, instances = self.images[i]
            return F.pil_to_tensor(image), _detection_target(instances, image.height, image.width, self.masks)
        _, image, mask = self.images[i]
        if mask.max(initial=0) > VOID or mask.min(initial=0) < 0:
            raise UserError(f"mask {self.images.items[i][2]} holds ids outside 0..255")
        return F.pil_to_tensor(image), tv_tensors.Mask(torch.from_numpy(mask.astype(np.int64)))

    def __getitem__(self, key: tuple[int, int]):
        from torchvision import tv_tensors

        epoch, i = key
        image, target = self._raw(i)
        sample_seed = int(np.random.SeedSequence([self.seed, epoch, i]).generate_state(1)[0])
        with seeded_rngs(sample_seed):
            image, target = self.transform(tv_tensors.Image(image), target)
        if isinstance(target, dict):
            target = {"boxes": target["boxes"].as_subclass(torch.Tensor), "labels": target["labels"],
                      "iscrowd": target["iscrowd"], "masks": target["masks"].as_subclass(torch.Tensor)}
        else:
            target = target.as_subclass(torch.Tensor).long()  # (S, S)
        return image.as_subclass(torch.Tensor), target


def detection_collate(batch):
    """``[(image, target), ...] -> ([image, ...], [target, ...])``: torchvision's detectors take lists."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def segmentation_collate(batch):
    """``[(image (3, S, S), mask (S, S)), ...] -> ((B, 3, S, S), (B, S, S))``."""
    images, masks = zip(*batch)
    return torch.stack(images), torch.stack(masks)
