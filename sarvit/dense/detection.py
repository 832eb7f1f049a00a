"""ViTDet on torchvision: Mask R-CNN (or Faster R-CNN without masks) on the simple feature pyramid.

The backbone is :class:`~sarvit.dense.backbone.ViTDetBackbone` (levels ``"0".."3"`` at
strides p/4, p/2, p, 2p); a fifth level ``"pool"`` (a stride-2 max-pool of the coarsest,
torchvision's ``LastLevelMaxPool``) serves the RPN only, as in ViTDet and torchvision's
FPN models. Anchors: one size per level, 8 x its stride (32 ... 512 px for p = 16, the
sizes of torchvision's and Detectron2's FPN Mask R-CNN), aspect ratios 0.5, 1, 2. RoI
features: ``MultiScaleRoIAlign`` over the four levels (7x7 for boxes, 14x14 for masks).
torchvision's own losses: RPN objectness and box regression, RoI classification, box
regression and mask BCE.

Images arrive as float ``(3, S, S)`` in [0, 1], already ``S x S``: the detector's own
resize is a no-op (``min_size = max_size = S``) and it normalises with ``mean``/``std``.

    detector = build_detector(vit, num_classes=20, img_size=512, masks=True)
    losses = detector(images, targets)          # training: dict of 5 loss terms
    detections = detector(images)               # eval: [{"boxes", "labels", "scores", "masks"}, ...]
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .backbone import LEVEL_NAMES, ViTDetBackbone

__all__ = ["build_detector", "PooledBackbone", "anchor_sizes"]

ASPECT_RATIOS = (0.5, 1.0, 2.0)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class PooledBackbone(nn.Module):
    """The pyramid plus ``"pool"``: ``max_pool2d(level "3", 1, stride 2)`` (torchvision's LastLevelMaxPool)."""

    def __init__(self, pyramid: ViTDetBackbone) -> None:
        super().__init__()
        self.body = pyramid
        self.out_channels = pyramid.out_channels
        self.strides = (*pyramid.strides, 2 * pyramid.strides[-1])

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        levels = self.body(x)
        levels["pool"] = nn.functional.max_pool2d(levels[LEVEL_NAMES[-1]], 1, 2, 0)  # (B, C, ceil(h/2), ceil(w/2))
        return levels


def anchor_sizes(strides: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """One anchor size per level: 8 x the level's stride (stride 4 -> 32 px)."""
    return tuple((8 * s,) for s in strides)


def build_detector(vit: nn.Module, num_classes: int, img_size: int, masks: bool = True, out_channels: int = 256,
                   rois_per_image: int = 512, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> nn.Module:
    """torchvision ``MaskRCNN`` (``masks``) or ``FasterRCNN`` on a ViTDet backbone of ``vit``.

    Args:
        vit: a timm ViT (SAR attached or not), weights loaded.
        num_classes: object classes, background excluded (VOC: 20).
        img_size: the side of the square inputs.
        rois_per_image: proposals sampled per training image for the RoI heads (a quarter at most
            positive; torchvision's and Detectron2's 512).
    """
    from torchvision.models.detection import FasterRCNN, MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    backbone = PooledBackbone(ViTDetBackbone(vit, img_size, out_channels))
    sizes = anchor_sizes(backbone.strides)
    anchors = AnchorGenerator(sizes, (ASPECT_RATIOS,) * len(sizes))
    common = dict(num_classes=num_classes + 1, min_size=img_size, max_size=img_size, image_mean=list(mean),
                  image_std=list(std), rpn_anchor_generator=anchors, box_batch_size_per_image=rois_per_image,
                  box_roi_pool=MultiScaleRoIAlign(list(LEVEL_NAMES), output_size=7, sampling_ratio=2))
    if masks:
        return MaskRCNN(backbone, mask_roi_pool=MultiScaleRoIAlign(list(LEVEL_NAMES), output_size=14,
                                                                   sampling_ratio=2), **common)
    return FasterRCNN(backbone, **common)
