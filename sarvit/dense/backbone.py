"""A plain ViT as a multi-scale backbone: ViTDet's simple feature pyramid (Li et al., 2022).

ViTDet keeps the pre-trained ViT unchanged (here: with the SAR last block of Eq. 10-11
when it was trained with it) and builds the pyramid from its last map only. The patch
tokens that leave the last block (prefix tokens dropped, no final norm, as ViTDet) form
a ``(B, C, H/p, W/p)`` map, ``p`` the patch size (16 for ViT-S/16: stride 16). From it:

    stride p/4   ConvTranspose(2, 2) -> LayerNorm -> GELU -> ConvTranspose(2, 2)
    stride p/2   ConvTranspose(2, 2)
    stride p     identity
    stride 2p    MaxPool(2, 2)

each followed by ``Conv1x1 -> LN -> Conv3x3 -> LN`` to ``out_channels`` (256) channels,
LN being a LayerNorm over the channels of each position (ViTDet's ``LN`` norm). With
``p = 16``: strides 4, 8, 16, 32, the four levels of torchvision's Mask R-CNN.

The position embeddings are resampled to the input size once (``set_input_size``) and
on the fly for any other size (timm's ``dynamic_img_size``), so the padded batches of
torchvision's detectors go through.

    backbone = ViTDetBackbone(vit)                  # a timm VisionTransformer
    features = backbone(images)                     # OrderedDict "0".."3": (B, 256, H/s, W/s)
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ..errors import ConfigError, UnsupportedModel

__all__ = ["LayerNorm2d", "SimpleFeaturePyramid", "ViTDetBackbone", "check_dense_backbone", "LEVEL_NAMES"]

LEVEL_NAMES = ("0", "1", "2", "3")  # torchvision's names of the pyramid levels, finest first
SCALES = (4.0, 2.0, 1.0, 0.5)  # upsampling factor of each level relative to the ViT map


def check_dense_backbone(vit: nn.Module) -> None:
    """Raise :class:`~sarvit.errors.UnsupportedModel` unless ``vit`` is a timm ViT whose patch size
    4 divides (the finest level is 4 times finer than the patch grid)."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(vit, VisionTransformer):
        cls = type(vit)
        raise UnsupportedModel(f"the ViTDet adapter does not support {cls.__module__}.{cls.__qualname__}; it supports "
                               "timm VisionTransformer models (vit_*, deit_*, register variants), with or without SAR")
    patch = vit.patch_embed.patch_size
    if patch[0] != patch[1] or patch[0] % 4:
        raise ConfigError(f"the simple feature pyramid upsamples the patch grid 4 times: the patch size must be square "
                          f"and a multiple of 4; this model's is {tuple(patch)}")


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of every position of a ``(B, C, H, W)`` map (ViTDet's ``LN``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        return super().forward(x).permute(0, 3, 1, 2)  # (B, C, H, W)


def _rescale(dim: int, scale: float) -> nn.Module:
    """The layer that brings the ViT map to ``scale`` times its resolution: ``(B, dim, h, w) ->
    (B, dim_out, scale*h, scale*w)``; ``dim_out`` is ``dim // 4`` for 4x, ``dim // 2`` for 2x."""
    if scale == 4.0:
        return nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), LayerNorm2d(dim // 2), nn.GELU(),
                             nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2))
    if scale == 2.0:
        return nn.ConvTranspose2d(dim, dim // 2, 2, stride=2)
    if scale == 1.0:
        return nn.Identity()
    return nn.MaxPool2d(2, stride=2)


def _channels_after(dim: int, scale: float) -> int:
    return {4.0: dim // 4, 2.0: dim // 2}.get(scale, dim)


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid: ``(B, dim, h, w) -> [(B, out, 4h, 4w), (B, out, 2h, 2w),
    (B, out, h, w), (B, out, h/2, w/2)]`` (the last floor-divided)."""

    def __init__(self, dim: int, out_channels: int = 256) -> None:
        super().__init__()
        if dim % 4:
            raise ConfigError(f"the pyramid halves the ViT's width twice: its embedding dimension must be a multiple "
                              f"of 4; got {dim}")
        self.stages = nn.ModuleList()
        for scale in SCALES:
            width = _channels_after(dim, scale)
            self.stages.append(nn.Sequential(
                _rescale(dim, scale),
                nn.Conv2d(width, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels),
            ))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [stage(x) for stage in self.stages]


class ViTDetBackbone(nn.Module):
    """A timm ViT + :class:`SimpleFeaturePyramid`, as torchvision's detectors want a backbone:
    ``(B, 3, H, W) -> OrderedDict("0": (B, out, 4H/p, 4W/p), ..., "3": (B, out, H/2p, W/2p))``,
    with ``out_channels`` set. ``strides`` are the levels' strides in pixels, finest first.

    Args:
        vit: a timm ``VisionTransformer`` (SAR attached or not); its final norm and classifier head are
            removed (``prune_intermediate_layers``).
        img_size: the input size the position embeddings are resampled to (others still work).
        out_channels: channels of every level (ViTDet: 256).
    """

    def __init__(self, vit: nn.Module, img_size: int | None = None, out_channels: int = 256) -> None:
        super().__init__()
        check_dense_backbone(vit)
        if img_size is not None:
            vit.set_input_size(img_size=(img_size, img_size))
        vit.dynamic_img_size = True  # timm: resample the position embeddings to any other grid on the fly
        vit.patch_embed.strict_img_size = False
        vit.patch_embed.flatten = False
        vit.patch_embed.output_fmt = _nhwc()
        # the final norm and the classifier read nothing here: gone (timm's own pruning), so that DDP finds
        # every parameter used (it refuses parameters that get no gradient)
        vit.prune_intermediate_layers(indices=1, prune_norm=True, prune_head=True)
        self.vit = vit
        self.patch = int(vit.patch_embed.patch_size[0])
        self.pyramid = SimpleFeaturePyramid(vit.embed_dim, out_channels)
        self.out_channels = out_channels
        self.strides = tuple(int(self.patch / s) for s in SCALES)

    def vit_map(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W) -> (B, C, H/p, W/p)``: the patch tokens after the last block (prefix tokens dropped)."""
        (last,) = self.vit.forward_intermediates(x, indices=1, norm=False, output_fmt="NCHW", intermediates_only=True)
        return last  # (B, C, H/p, W/p)

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        levels = self.pyramid(self.vit_map(x))
        return OrderedDict(zip(LEVEL_NAMES, levels))


def _nhwc():
    from timm.layers import Format

    return Format.NHWC
