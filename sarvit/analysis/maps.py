"""The last block's [CLS] attention of a ViT, as arrays: ``attention_maps(model, images)``.

Two maps per head, both over the ``h x w`` patch grid:

- ``attn``: the post-softmax attention of the [CLS] query, as DINO's
  ``get_last_selfattention(x)[:, :, 0, 1:]`` gives it: the softmax is taken over ALL
  keys (the prefix tokens and the patches), then the prefix columns are dropped. The
  patch entries of a head therefore sum to ``1 - share of the prefix keys`` (the [CLS]
  key's own share and, for distilled or register models, the distillation and register
  tokens' shares), not to 1. This is the map the Jaccard protocol (Table 11) thresholds;
  prefix tokens never enter the grid and their share is simply left out.
- ``S``: the pre-softmax similarity of Eq. 4 over the patch keys only, the map the
  spatial-entropy loss sees; its components are those of ``ReLU(S - mean)`` (Eq. 5-6).

The maps are read with a forward pre-hook on the last block, from the block's own
``norm1`` and ``attn.qkv`` weights: the model is not modified, so plain timm models
(no SAR) and SAR models (any Table 1(b) layout) give their maps the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..components import connected_components
from ..entropy import spatial_entropy
from ..surgery.block import similarity_from_qk

__all__ = ["AttentionMaps", "attention_maps", "mass_mask", "similarity_components"]


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
        attn: float32 ``(B, heads, h, w)``, post-softmax [CLS] attention over the patches.
        S: float32 ``(B, heads, h, w)``, pre-softmax similarity (Eq. 4).
        patch_size: pixels per grid cell (the model's patch stride).
    """

    attn: torch.Tensor
    S: torch.Tensor
    patch_size: int

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


def _query_logits(block: nn.Module, x: torch.Tensor, prefix: int, query: str) -> torch.Tensor:
    """The query row of the last block's attention logits over all keys.

    Args:
        block: a pre-norm block with ``norm1`` and a timm ``Attention`` as ``attn``.
        x: ``(B, N, C)``, the tokens entering the block.

    Returns:
        float32 ``(B, heads, N)``: ``<q_query, k_j> * scale`` for every token ``j``.
    """
    attn = block.attn
    B, N, _ = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(B, N, 3, attn.num_heads, attn.head_dim)  # (B, N, 3, heads, d)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, d)
    q, k = attn.q_norm(q), attn.k_norm(k)
    patches = similarity_from_qk(q, k, attn.scale, prefix, query)  # (B, heads, N - prefix)
    if prefix == 0:
        return patches
    q0 = q[:, :, :1] if query == "cls" else q[:, :, prefix:].mean(dim=2, keepdim=True)  # (B, heads, 1, d)
    head = (q0.float() * attn.scale) @ k[:, :, :prefix].float().transpose(-2, -1)  # (B, heads, 1, prefix)
    return torch.cat([head.squeeze(-2), patches], dim=-1)  # (B, heads, N)


def _query_of(model: nn.Module) -> str:
    """The query the SAR surgery uses: the class token, or the mean patch query without one."""
    attached = getattr(model.blocks[-1], "query", None)
    return attached or ("cls" if getattr(model, "cls_token", None) is not None else "mean")


@torch.no_grad()
def attention_maps(model: nn.Module, images: torch.Tensor) -> AttentionMaps:
    """Maps of the last block of a timm ``VisionTransformer`` (with or without SAR).

    Args:
        model: a timm ViT/DeiT, SAR-attached or not; its input size must match
            ``images`` (see ``model.set_input_size``) unless it has ``dynamic_img_size``.
        images: ``(B, 3, H, W)``, normalised as the model expects.

    Returns:
        :class:`AttentionMaps` on the images' device. Models without a class token use
        the mean patch query (as the SAR surgery does) for both maps.
    """
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise TypeError(f"attention maps need a timm VisionTransformer, got {type(model).__name__}")
    prefix, query = model.num_prefix_tokens, _query_of(model)
    block = model.blocks[-1]
    seen = {}

    def grab(_module, args):
        seen["logits"] = _query_logits(block, args[0], prefix, query)  # (B, heads, N)

    handle = block.register_forward_pre_hook(grab)
    was_training = model.training
    try:
        model.eval()
        model.forward_features(images)
    finally:
        handle.remove()
        model.train(was_training)
    logits = seen["logits"]
    embed = model.patch_embed
    dynamic = getattr(embed, "dynamic_img_size", False) or getattr(model, "dynamic_img_size", False)
    grid = tuple(embed.dynamic_feat_size(tuple(images.shape[-2:]))) if dynamic else tuple(embed.grid_size)
    attn = torch.softmax(logits, dim=-1)[..., prefix:].unflatten(-1, grid)  # (B, heads, h, w)
    S = logits[..., prefix:].unflatten(-1, grid)  # (B, heads, h, w)
    return AttentionMaps(attn=attn, S=S, patch_size=int(model.patch_embed.patch_size[0]))
