"""A light semantic-segmentation head on the simple feature pyramid, and its pixel loss.

The head is an FPN-style fuse (the "semantic FPN" of Kirillov et al., 2019, reduced to one
conv per level): each level of :class:`~sarvit.dense.backbone.ViTDetBackbone` goes through
a 3x3 conv + LayerNorm + GELU to ``width`` channels, is upsampled (bilinear) to the finest
level (stride p/4), the four are summed, a 1x1 conv gives the class logits, and a bilinear
upsampling brings them to the input size. Why this head: it reads every level of the
pyramid (what Table 6 measures is the backbone, not a heavy decoder such as UPerNet),
costs a few convolutions, and has no dependency that is not installable here.

    model = SegmentationModel(ViTDetBackbone(vit, 512), num_classes=21)
    logits = model(images)                                  # (B, 21, H, W)
    loss = pixel_cross_entropy(logits, masks)               # 255 ignored
"""

from __future__ import annotations

import torch
from torch import nn

from .backbone import LayerNorm2d, ViTDetBackbone
from .metrics import IGNORE_INDEX

__all__ = ["SemanticFPNHead", "SegmentationModel", "pixel_cross_entropy"]


class SemanticFPNHead(nn.Module):
    """``[(B, C, H_l, W_l), ...] (finest first) -> (B, num_classes, H_0, W_0)``."""

    def __init__(self, in_channels: int, num_classes: int, levels: int = 4, width: int = 128) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(
            nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), LayerNorm2d(width), nn.GELU())
            for _ in range(levels)
        )
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        size = levels[0].shape[-2:]
        fused = sum(nn.functional.interpolate(conv(x), size=size, mode="bilinear", align_corners=False)
                    if x.shape[-2:] != size else conv(x) for conv, x in zip(self.lateral, levels))  # (B, width, H0, W0)
        return self.classifier(fused)


class SegmentationModel(nn.Module):
    """``(B, 3, H, W)`` in [0, 1] -> ``(B, num_classes, H, W)`` logits; normalises with ``mean``/``std``."""

    def __init__(self, backbone: ViTDetBackbone, num_classes: int, width: int = 128,
                 mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = SemanticFPNHead(backbone.out_channels, num_classes, width=width)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images - self.mean) / self.std
        logits = self.head(list(self.backbone(x).values()))  # (B, K, H/s0, W/s0)
        return nn.functional.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def pixel_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled pixels: ``(B, K, H, W)``, ``(B, H, W)`` with 255 ignored."""
    return nn.functional.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX)
