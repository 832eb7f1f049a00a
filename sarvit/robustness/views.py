"""Datasets that yield, for one image, the tensors a model reads: clean and corrupted.

``CorruptedViews(dataset, transform, corruptions, severities, seed)[i]`` decodes image
``i`` once and returns its clean view followed by one view per (corruption, severity),
so a loader's worker corrupts an image 75 times (15 x 5) for one decode.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .corruptions import corrupt_array, corruption_size, image_seed

__all__ = ["split_eval_transform", "CorruptedViews", "SingleView"]

TENSOR_STEPS = ("ToTensor", "MaybeToTensor", "PILToTensor")


def split_eval_transform(transform):
    """``(geometry, to_tensor)``: the parts of a ``Compose`` before and from its ToTensor step.

    ``geometry`` maps a PIL image to the PIL crop the model sees (timm's eval transform:
    resize + centre crop); ``to_tensor`` maps that crop to the normalised ``(3, H, W)``
    tensor.
    """
    from torchvision.transforms import Compose

    steps = list(getattr(transform, "transforms", []))
    cut = next((i for i, t in enumerate(steps) if type(t).__name__ in TENSOR_STEPS), None)
    if cut is None:
        raise TypeError(f"expected a Compose with a ToTensor step (timm's eval transform), got {transform!r}")
    return Compose(steps[:cut]), Compose(steps[cut:])


class CorruptedViews(Dataset):
    """``ds[i] -> (views (1 + C*S, 3, H, W), target)``: the clean view, then the corrupted
    ones in ``self.pairs`` order (corruption-major, severity-minor).

    Args:
        dataset: yields ``(PIL RGB image, int)``.
        transform: the model's evaluation transform (see :func:`split_eval_transform`).
        corruptions: names of ``corruption_names('all')``.
        severities: values in 1..5.
        seed: the evaluation's seed; image ``i``'s corruption is drawn from
            ``image_seed(seed, corruption, severity, i)``.
    """

    def __init__(self, dataset: Dataset, transform, corruptions: Sequence[str], severities: Sequence[int], seed: int):
        self.dataset = dataset
        self.geometry, self.to_tensor = split_eval_transform(transform)
        self.pairs = [(c, int(s)) for c in corruptions for s in severities]
        self.seed = int(seed)
        self.num_views = 1 + len(self.pairs)

    def __len__(self) -> int:
        return len(self.dataset)

    def crop(self, index: int) -> tuple[np.ndarray, int]:
        """``((H, W, 3) uint8 crop, target)`` of image ``index``, before any corruption."""
        image, target = self.dataset[index]
        return np.asarray(self.geometry(image).convert("RGB")), target

    def corrupted(self, index: int, corruption: str, severity: int) -> np.ndarray:
        """``(H, W, 3)`` uint8: image ``index`` under one corruption, as the model sees it."""
        crop, _ = self.crop(index)
        return corrupt_array(crop, corruption, severity, image_seed(self.seed, corruption, severity, index))

    def __getitem__(self, index: int):
        crop, target = self.crop(index)
        views = [self.to_tensor(Image.fromarray(crop))]
        for corruption, severity in self.pairs:
            out = corrupt_array(crop, corruption, severity, image_seed(self.seed, corruption, severity, index))
            views.append(self.to_tensor(Image.fromarray(out)))
        return torch.stack(views), target  # (1 + C*S, 3, H, W)

    def corruption_size(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """``((H, W) of the model's input, (H, W) at which corruptions are applied)``."""
        crop, _ = self.crop(0)
        return crop.shape[:2], corruption_size(*crop.shape[:2])


class SingleView(Dataset):
    """``ds[i] -> (transform(image)[None], target)``: a dataset as one view per image (already
    corrupted images, e.g. ImageNet-C, or ImageNet-A)."""

    def __init__(self, dataset: Dataset, transform) -> None:
        self.dataset = dataset
        self.transform = transform
        self.num_views = 1

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, target = self.dataset[index]
        return self.transform(image)[None], target  # (1, 3, H, W)
