"""The augmented views of self-supervised training, from lightly's transforms.

- :func:`dino_views`: DINO's multi-crop, 2 global crops then ``local_crops`` local ones
  (lightly's ``DINOTransform``: colour jitter, grey scale, blur 1.0 / 0.1 / 0.5,
  solarisation on the second global crop). The paper's ImageNet-100 runs: 2 x 224 + 10 x 96.
- :func:`mocov3_views`: MoCo v3's two asymmetric views (lightly's ``BYOLView1Transform``
  and ``BYOLView2Transform``: blur 1.0 / 0.1, solarisation 0 / 0.2).

Both take plain arguments, so that a 28 x 28 grey-scale dataset (converted to RGB first,
as every view transform here does) and ImageNet-scale runs use the same code.
:func:`collate_views` turns a batch of ``(views, target)`` samples into one
``(B, 3, h, w)`` tensor per view.
"""

from __future__ import annotations

import math
from typing import Sequence

from ..errors import ConfigError

__all__ = ["ViewTransform", "dino_views", "mocov3_views", "collate_views", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ViewTransform:
    """``image -> [view tensors (3, h_v, w_v)]``: the image (PIL, or a tensor / array) made an
    RGB PIL image, then ``transform``.

    ``sizes``: the ``(h, w)`` of each view, in order. Picklable (for data-loading workers).
    """

    def __init__(self, transform, sizes: list[tuple[int, int]]) -> None:
        self.transform = transform
        self.sizes = sizes

    def __call__(self, image):
        return self.transform(_rgb(image))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(views={len(self.sizes)}, sizes={self.sizes})"


def _rgb(image):
    """``image`` as an RGB PIL image; a tensor ``(C, H, W)`` or array ``(H, W[, C])`` is converted first."""
    if not hasattr(image, "convert"):  # not PIL
        from torchvision.transforms.functional import to_pil_image

        image = to_pil_image(image)
    return image if image.mode == "RGB" else image.convert("RGB")


def _check_size(name: str, value) -> None:
    if not (isinstance(value, int) and value > 0):
        raise ConfigError(f"{name} must be a positive number of pixels, got {value!r}")


def _check_scale(name: str, scale) -> None:
    ok = len(scale) == 2 and all(math.isfinite(s) for s in scale) and 0 < scale[0] <= scale[1] <= 1
    if not ok:
        raise ConfigError(f"{name} must be (min, max) fractions of the image area with 0 < min <= max <= 1, "
                          f"got {tuple(scale)!r}")


def _normalize(mean: Sequence[float], std: Sequence[float]) -> dict:
    if len(mean) != 3 or len(std) != 3:
        raise ConfigError(f"mean and std need 3 values (RGB), got {list(mean)} and {list(std)}")
    if not all(math.isfinite(s) and s > 0 for s in std) or not all(math.isfinite(m) for m in mean):
        raise ConfigError(f"std must be > 0 and mean finite, got mean {list(mean)}, std {list(std)}")
    return {"mean": list(mean), "std": list(std)}


def dino_views(global_size: int = 224, local_size: int = 96, local_crops: int = 10, *,
               global_scale: tuple[float, float] = (0.4, 1.0), local_scale: tuple[float, float] = (0.05, 0.4),
               mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> ViewTransform:
    """DINO's views: ``[global_1, global_2, local_1, ..., local_n]``, ``(3, global_size, global_size)``
    then ``(3, local_size, local_size)``; the scales are the crop areas' range (DINO's defaults)."""
    from lightly.transforms import DINOTransform

    _check_size("global_size", global_size)
    _check_size("local_size", local_size)
    if not (isinstance(local_crops, int) and local_crops >= 0):
        raise ConfigError(f"local_crops must be an integer >= 0 (the paper: 10), got {local_crops!r}")
    _check_scale("global_scale", global_scale)
    _check_scale("local_scale", local_scale)
    transform = DINOTransform(global_crop_size=global_size, global_crop_scale=tuple(global_scale),
                              local_crop_size=local_size, local_crop_scale=tuple(local_scale),
                              n_local_views=local_crops, normalize=_normalize(mean, std))
    sizes = [(global_size, global_size)] * 2 + [(local_size, local_size)] * local_crops
    return ViewTransform(transform, sizes)


def mocov3_views(size: int = 224, min_scale: float = 0.08, *, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> ViewTransform:
    """MoCo v3's two views ``(3, size, size)``: random-resized crops of area ``[min_scale, 1]``."""
    from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform

    _check_size("size", size)
    _check_scale("the crop scale (min_scale, 1)", (min_scale, 1.0))
    normalize = _normalize(mean, std)
    transform = BYOLTransform(BYOLView1Transform(input_size=size, min_scale=min_scale, normalize=normalize),
                              BYOLView2Transform(input_size=size, min_scale=min_scale, normalize=normalize))
    return ViewTransform(transform, [(size, size)] * 2)


def collate_views(batch):
    """``[(views, target), ...] -> ([(B, 3, h_v, w_v) per view], targets (B,))``."""
    import torch

    views = [torch.stack(group) for group in zip(*(sample[0] for sample in batch))]  # each (B, 3, h_v, w_v)
    targets = torch.as_tensor([sample[1] for sample in batch])  # (B,)
    return views, targets
