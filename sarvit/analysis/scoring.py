"""Jaccard similarity between thresholded attention and object masks (Table 11, pure functions).

The protocol of the published evaluation (IPViT's, used for SAR's Table 11):

1. per head, keep the patches holding 60% of the attention mass (:func:`~.maps.mass_mask`);
2. upsample that mask to pixels, nearest, by the key grid's stride (the patch size of a
   ViT; image side / grid side in general: 32 for PVT, CvT and Swin at 224);
3. for every object class present in the image's mask (ids 0, background, and 255,
   void, excluded), the IoU between the class's pixels and each head's mask; keep the
   best head;
4. the image's score is the mean over its object classes; the dataset's, the mean over
   images. An image without objects contributes nothing (the published code would
   divide by zero on it); the summary says how many images counted.

Void pixels (255): the published code tests a boolean mask against 255, a no-op, so
void pixels the attention covers count in the union. That is the default here, to match
the published numbers; ``void_fix=True`` leaves void pixels out of the intersection and
the union (the void band around VOC objects is then neither reward nor penalty).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .maps import mass_mask

__all__ = ["BACKGROUND", "VOID", "object_ious", "jaccard", "ImageScore", "JaccardSummary", "summarise"]

BACKGROUND, VOID = 0, 255


def object_ious(attn, mask, stride: int, mass: float = 0.6, void_fix: bool = False) -> dict[int, float]:
    """Best IoU over heads for every object class of one image.

    Args:
        attn: ``(heads, h, w)`` post-softmax attention of one image (tensor or array).
        mask: ``(h * stride, w * stride)`` integer class mask (0 background, 255 void).
        stride: pixels per grid cell (the key grid's stride).
        mass: attention mass each head keeps.
        void_fix: leave void pixels out of intersection and union.

    Returns:
        ``{class id: best IoU over heads}``, ascending ids; ``{}`` when no object is present.
    """
    if not isinstance(attn, torch.Tensor):
        attn = torch.from_numpy(np.asarray(attn, dtype=np.float32))
    mask = np.asarray(mask)
    if attn.dim() != 3:
        raise ValueError(f"attn must be (heads, h, w), got shape {tuple(attn.shape)}")
    heads, h, w = attn.shape
    if mask.shape != (h * stride, w * stride):
        raise ValueError(
            f"mask of shape {mask.shape} does not cover a {h}x{w} grid of {stride}-pixel cells "
            f"({h * stride}x{w * stride}); resize the image and the mask to the model's input size"
        )
    keep = mass_mask(attn.cpu(), mass).numpy()  # (heads, h, w)
    pred = keep.repeat(stride, axis=1).repeat(stride, axis=2)  # (heads, H, W), nearest upsampling
    counted = mask != VOID if void_fix else np.ones(mask.shape, dtype=bool)  # (H, W)
    scores = {}
    for c in np.unique(mask):
        if c in (BACKGROUND, VOID):
            continue
        target = mask == c  # (H, W)
        inter = (pred & target).sum(axis=(1, 2))  # (heads,)
        union = ((pred | target) & counted).sum(axis=(1, 2))  # (heads,)
        scores[int(c)] = float((inter / union).max())
    return scores


def jaccard(attn, mask, stride: int, mass: float = 0.6, void_fix: bool = False) -> float:
    """The Jaccard score of one image: the mean over its object classes of the best IoU
    over heads (see :func:`object_ious` for the arguments). ``nan`` for an image without
    objects, which the dataset mean leaves out."""
    scores = object_ious(attn, mask, stride, mass, void_fix)
    return float(np.mean(list(scores.values()))) if scores else math.nan


@dataclass
class ImageScore:
    """One image's result: its name and the best IoU of each object class."""

    stem: str
    ious: dict[int, float] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.ious.values()))) if self.ious else math.nan


@dataclass(frozen=True)
class JaccardSummary:
    """The dataset score: mean over the images that hold at least one object."""

    jaccard: float
    images: int  # images read
    images_scored: int  # images with at least one object
    objects: int  # (image, class) pairs scored
    void_fix: bool

    @property
    def void_mode(self) -> str:
        return "void excluded (--void-fix)" if self.void_fix else "void counted in the union (published protocol)"


def summarise(scores: list[ImageScore], void_fix: bool) -> JaccardSummary:
    scored = [s for s in scores if s.ious]
    mean = float(np.mean([s.mean for s in scored])) if scored else math.nan
    return JaccardSummary(mean, len(scores), len(scored), sum(len(s.ious) for s in scored), void_fix)
