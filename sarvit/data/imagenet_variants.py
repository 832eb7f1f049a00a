"""Readers for ImageNet-C and ImageNet-A, indexed by the classes of a model.

- ImageNet-C (Hendrycks & Dietterich 2019): ``ROOT/<corruption>/<severity>/<wnid>/*.JPEG``,
  224x224 centre crops of the ImageNet validation images, already corrupted.
- ImageNet-A (Hendrycks et al. 2021): ``ROOT/<wnid>/*.jpg``, natural adversarial examples
  of 200 of the 1000 ImageNet classes.

A sample's target is the index of its wnid among the model's classes: the sorted wnids
the model was trained on (the ``classes`` of its checkpoint; timm's ImageNet-1k list for
a 1000-class model that records none). Folders of wnids the model does not know (the
900 others, for an ImageNet-100 model) are left out and counted.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..config import ConfigError
from .sources import DatasetNotFound, RawDataset, _class_folders, dataset_targets, load_image

__all__ = ["model_wnids", "imagenet_c_contents", "open_imagenet_c", "open_imagenet_a", "VARIANTS"]

VARIANTS = ("imagenet_c", "imagenet_a")
WNID = re.compile(r"^n\d{8}$")


def model_wnids(classes: Sequence[str] | None, num_classes: int) -> list[str]:
    """The wnid of each output of a model: its recorded ``classes``, or timm's ImageNet-1k
    list for a 1000-class model that records no wnids."""
    classes = list(classes or [])
    if len(classes) == num_classes and classes and all(WNID.match(str(c)) for c in classes):
        return [str(c) for c in classes]
    if num_classes == 1000:
        from timm.data import ImageNetInfo

        return list(ImageNetInfo().label_names())
    shown = ", ".join(repr(c) for c in classes[:3])
    raise ConfigError(
        f"the model's {num_classes} classes are not ImageNet wnids ({shown or 'none recorded'}); "
        "ImageNet-C and ImageNet-A need a model trained on ImageNet classes (imagenet, imagenet100)"
    )


def _wnid_folder(folder: Path, wnids: Sequence[str], what: str) -> tuple[RawDataset, int]:
    """``(dataset of folder/<wnid>/*, number of wnid folders the model does not know)``."""
    from torchvision.datasets import ImageFolder

    index = {w: i for i, w in enumerate(wnids)}
    present = [w for w in _class_folders(folder) if WNID.match(w)]
    known = [w for w in present if w in index]
    if not known:
        raise DatasetNotFound(
            f"{folder} holds no class folder of the model's classes ({len(present)} wnid folders, "
            f"e.g. {present[:3]}; model classes e.g. {list(wnids[:3])}). Expected {what}"
        )

    class _Known(ImageFolder):
        def find_classes(self, directory):
            return known, {w: index[w] for w in known}

    try:
        ds = _Known(str(folder), loader=load_image)
    except FileNotFoundError as err:
        raise DatasetNotFound(f"{folder}: {err}. Remove empty class folders or add their images.") from err
    raw = RawDataset(ds, dataset_targets(ds), list(wnids), f"{what} at {folder}")
    return raw, len(present) - len(known)


def imagenet_c_contents(root: str | Path) -> dict[str, list[int]]:
    """``{corruption: [severities]}`` present under an ImageNet-C root."""
    from ..robustness.corruptions import corruption_names

    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetNotFound(
            f"ImageNet-C not found at {root}. Give --data-root DIR holding <corruption>/<severity>/<wnid>/*.JPEG "
            "(the extracted noise, blur, weather and digital archives)"
        )
    names = set(corruption_names("all"))
    found = {}
    for c in _class_folders(root):
        if c in names:
            severities = sorted(int(s) for s in _class_folders(root / c) if s in {"1", "2", "3", "4", "5"})
            if severities:
                found[c] = severities
    if not found:
        raise DatasetNotFound(
            f"{root} holds no ImageNet-C corruption folder (<corruption>/<severity>/<wnid>/*.JPEG, e.g. "
            f"{root}/gaussian_noise/1/n01440764/ILSVRC2012_val_00000293.JPEG)"
        )
    return found


def open_imagenet_c(root: str | Path, corruption: str, severity: int, wnids: Sequence[str]) -> tuple[RawDataset, int]:
    """``(ImageNet-C images of one corruption and severity, wnid folders left out)``."""
    folder = Path(root).expanduser() / corruption / str(severity)
    if not folder.is_dir():
        raise DatasetNotFound(f"ImageNet-C: {folder} is missing (expected <root>/{corruption}/{severity}/<wnid>/)")
    return _wnid_folder(folder, wnids, f"ImageNet-C {corruption} severity {severity}")


def open_imagenet_a(root: str | Path, wnids: Sequence[str]) -> tuple[RawDataset, np.ndarray, int]:
    """``(ImageNet-A images, (K,) sorted model indices of its classes, wnid folders left out)``.

    The model's prediction is the arg-max over the ``K`` (200) outputs of those classes.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetNotFound(f"ImageNet-A not found at {root}. Give --data-root DIR holding <wnid>/*.jpg")
    raw, left_out = _wnid_folder(root, wnids, "ImageNet-A (<root>/<wnid>/*.jpg)")
    class_indices = np.array(sorted(raw.dataset.class_to_idx.values()), dtype=np.int64)
    return raw, class_indices, left_out
