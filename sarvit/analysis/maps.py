"""The last block's attention of a model of any SAR family, as arrays: ``attention_maps(model, images)``.

Two maps per head, both over the ``h x w`` key grid of the last block of the last stage
(the patch grid of a ViT or T2T-ViT, 14x14 at 224; the last stage's grid for PVT v1/v2,
Swin, 7x7 at 224; CvT's stride-2 key grid, 7x7 at 224):

- ``attn``: the post-softmax attention of the query, as DINO's
  ``get_last_selfattention(x)[:, :, 0, 1:]`` gives it for a ViT: the softmax is taken over
  ALL keys (the prefix keys and the key grid), then the prefix columns are dropped. The
  grid entries of a head therefore sum to ``1 - share of the prefix keys`` (the [CLS]
  key's own share and, for distilled or register models, the distillation and register
  tokens' shares), not to 1. This is the map the Jaccard protocol (Table 11) thresholds.
  The query is the class token's, or the mean of the patch queries for models without
  one (Swin, PVT v2, ViT with ``class_token=False``), as the SAR surgery uses; for Swin
  the logits leave out the relative position bias, as ``S`` does (a mean query has no
  position to index it with).
- ``S``: the pre-softmax similarity of Eq. 4 over the key grid only, the map the
  spatial-entropy loss sees; its components are those of ``ReLU(S - mean)`` (Eq. 5-6).

The maps are read with a forward pre-hook on the last block, from the block's own
weights, by the family's ``attention_logits`` (:mod:`sarvit.surgery`, the code that
computes ``S`` for training): the model is not modified, so plain models (no SAR) and SAR
models (any Table 1(b) layout) give their maps the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..components import connected_components
from ..entropy import spatial_entropy
from ..errors import UserError

__all__ = ["AttentionMaps", "attention_maps", "mass_mask", "similarity_components", "query_of", "key_stride"]


def mass_mask(attn: torch.Tensor, fraction: float = 0.6) -> torch.Tensor:
    """The DINO rule: per map, keep the largest entries that hold ``fraction`` of its mass.

    Sort ascending, normalise to sum 1, cumulative sum, keep ``cumsum > 1 - fraction``,
    undo the sort (DINO's ``visualize_attention.py``; ties are ordered by position, a
    stable sort).

    Args:
        attn: non-negative ``(..., h, w)`` maps.
        fraction: mass to keep, in ``(0, 1]``.

    Returns:
        bool ``(..., h, w)``.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    flat = attn.detach().float().flatten(-2)  # (..., h*w)
    val, idx = torch.sort(flat, dim=-1, stable=True)  # ascending
    val = val / val.sum(dim=-1, keepdim=True)
    keep_sorted = torch.cumsum(val, dim=-1) > (1.0 - fraction)
    keep = torch.empty_like(keep_sorted).scatter_(-1, idx, keep_sorted)  # unsort
    return keep.reshape(attn.shape)


def similarity_components(S: torch.Tensor) -> torch.Tensor:
    """Labels of the connected components of ``ReLU(S - mean)`` (Eq. 5-6), 8-connectivity.

    ``S (..., h, w)`` -> int64 ``(..., h, w)``: 0 where ``S <= mean``, 1..n per map.
    """
    mean = S.float().mean(dim=(-2, -1), keepdim=True)  # (..., 1, 1)
    return connected_components(S.float() > mean)


@dataclass
class AttentionMaps:
    """Per-head maps of the last block for a batch of images.

    Attributes:
        attn: float32 ``(B, heads, h, w)``, post-softmax attention of the query over the key grid.
        S: float32 ``(B, heads, h, w)``, pre-softmax similarity (Eq. 4).
        stride: pixels per key-grid cell, ``image side / grid side`` (the patch size of a
            ViT; 32 for PVT, CvT and Swin at 224).
    """

    attn: torch.Tensor
    S: torch.Tensor
    stride: int

    def mass_mask(self, fraction: float = 0.6) -> torch.Tensor:
        """bool ``(B, heads, h, w)``: each head's entries holding ``fraction`` of its attention."""
        return mass_mask(self.attn, fraction)

    @property
    def components(self) -> torch.Tensor:
        """int64 ``(B, heads, h, w)``: components of ``ReLU(S - mean)``, numbered per map."""
        return similarity_components(self.S)

    @property
    def entropy(self) -> torch.Tensor:
        """float32 ``(B, heads)``: the spatial entropy of every map (Eq. 7)."""
        return spatial_entropy(self.S)


def query_of(model: nn.Module) -> str:
    """The query the SAR surgery uses (or would use): the attached block's, else the class
    token when the model has one (timm's ``cls_token``, torchvision's ``class_token``), else
    the mean patch query."""
    from ..surgery import is_attached, sar_block

    if is_attached(model):
        return sar_block(model).query
    has_cls = getattr(model, "cls_token", None) is not None or getattr(model, "class_token", None) is not None
    return "cls" if has_cls else "mean"


def key_stride(image_size: tuple[int, int], grid: tuple[int, int]) -> int:
    """Pixels per key-grid cell; a :class:`~sarvit.errors.UserError` unless the grid tiles the image exactly."""
    (H, W), (h, w) = image_size, grid
    if H % h or W % w or H // h != W // w:
        raise UserError(f"a {H}x{W} input gives a {h}x{w} key grid, which does not tile it in square cells; use an "
                        "input size whose key grid tiles it: a multiple of the patch size for ViT and T2T (16), of "
                        "32 for PVT, CvT and Swin; models that pool their keys to a fixed grid (pvt_v2_*_li: 7x7) "
                        "need a multiple of that grid's side times the stride (224)")
    return H // h


@torch.no_grad()
def attention_maps(model: nn.Module, images: torch.Tensor) -> AttentionMaps:
    """Maps of the last block of a model of any SAR family (with or without SAR).

    Args:
        model: a model ``sarvit.attach`` supports, SAR-attached or not; its input size must
            match ``images`` (see :func:`~.models.load_analysis_model`).
        images: ``(B, 3, H, W)``, normalised as the model expects.

    Returns:
        :class:`AttentionMaps` on the images' device.
    """
    from ..surgery import family_of

    family, query = family_of(model), query_of(model)
    seen = {}

    def grab(_module, args):
        seen["inputs"] = args  # the last block's positional arguments

    handle = family.last_block(model).register_forward_pre_hook(grab)
    was_training = model.training
    try:
        model.eval()
        model(images)
    finally:
        handle.remove()
        model.train(was_training)
    logits, prefix, grid = family.attention_logits(model, seen["inputs"], query, tuple(images.shape[-2:]))
    grid = tuple(grid)
    attn = torch.softmax(logits, dim=-1)[..., prefix:].unflatten(-1, grid)  # (B, heads, h, w)
    S = logits[..., prefix:].unflatten(-1, grid)  # (B, heads, h, w)
    return AttentionMaps(attn=attn, S=S, stride=key_stride(tuple(images.shape[-2:]), grid))
