"""SAR surgery for timm's ``VisionTransformer`` family (ViT, DeiT, distilled DeiT, DeiT-III,
registers, LayerScale, ``dynamic_img_size``)."""

from __future__ import annotations


import torch
from torch import nn

from ..errors import ConfigError, UnsupportedModel
from .block import (BlockLayout, SARBlock, auto_query, install, last_block_with_similarity, timm_attention_logits,
                    uninstall)

__all__ = ["matches", "attach", "detach", "last_block", "attention_logits", "check_timm_block", "attach_timm_blocks"]

NAME = "timm VisionTransformer"
DESCRIPTION = ("timm.models.vision_transformer.VisionTransformer: vit_*, deit_*, deit3_*, distilled DeiT, "
               "register and LayerScale variants, with a pre-norm last block")


def matches(model: nn.Module) -> bool:
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


def last_block(model: nn.Module) -> nn.Module:
    """The block SAR rewires and analysis reads (plain, or the :class:`SARBlock` around it)."""
    return model.blocks[-1]


def check_timm_block(model: nn.Module, query: str, supported: str) -> None:
    """Checks shared by the families whose last block is timm's ``Block`` in ``model.blocks``
    (ViT, T2T-ViT); ``supported`` names the family in the error messages."""
    from timm.layers import Attention
    from timm.models.vision_transformer import Block

    last = model.blocks[-1]
    if isinstance(last, SARBlock):
        raise ValueError("this model already has SAR attached; call sarvit.detach(model) first")
    if not isinstance(last, Block) or not isinstance(last.attn, Attention):
        raise UnsupportedModel(
            f"SAR needs a standard pre-norm last block with timm's Attention; this model's last "
            f"block is {type(last).__name__} with {type(getattr(last, 'attn', None)).__name__}. "
            f"Supported: {supported}"
        )
    if any(True for _ in last.named_parameters(recurse=False)) or any(True for _ in last.named_buffers(recurse=False)):
        raise UnsupportedModel(f"the last block {type(last).__name__} holds tensors of its own; SAR cannot wrap it")
    if query == "cls" and getattr(model, "cls_token", None) is None:
        raise ConfigError("this model has no class token; attach it with query='mean' (the default 'auto' does)")


def attach_timm_blocks(model: nn.Module, layout: BlockLayout, query: str, forward) -> nn.Module:
    """Wrap ``model.blocks[-1]`` in a :class:`SARBlock` and install the family's ``forward``."""
    wrapper = SARBlock(model.blocks[-1], layout, model.num_prefix_tokens, query)
    return install(model, model.blocks, wrapper, forward)


def _check(model: nn.Module, query: str) -> None:
    check_timm_block(model, query, f"{NAME} ({DESCRIPTION})")
    if not isinstance(model.patch_drop, nn.Identity):
        raise ConfigError(
            "patch dropout removes tokens from the grid, so the similarity maps lose their "
            "spatial layout; create the model with patch_drop_rate=0"
        )
    if getattr(model, "attn_pool", None) is not None and query == "cls":
        raise ConfigError("models with attention pooling have no class token; use query='mean'")


def attach(model: nn.Module, layout: BlockLayout, query: str) -> nn.Module:
    query = auto_query(model, query)
    _check(model, query)
    return attach_timm_blocks(model, layout, query, forward_with_similarity)


def detach(model: nn.Module) -> nn.Module:
    return uninstall(model, model.blocks)


def attention_logits(model: nn.Module, inputs: tuple, query: str, image_size: tuple[int, int]):
    """The query's attention logits over all keys of the last block.

    Args:
        inputs: the last block's positional arguments, ``(x,)`` with ``x`` ``(B, P + h*w, C)``.
        query: ``"cls"`` or ``"mean"``.
        image_size: ``(H, W)`` of the images the tokens come from.

    Returns:
        ``(logits, P, grid)``: float32 ``(B, heads, P + h*w)``, the number of prefix keys and
        the key grid ``(h, w)``.
    """
    embed = model.patch_embed
    dynamic = getattr(embed, "dynamic_img_size", False) or getattr(model, "dynamic_img_size", False)
    grid = tuple(embed.dynamic_feat_size(tuple(image_size))) if dynamic else tuple(embed.grid_size)
    prefix = model.num_prefix_tokens
    return timm_attention_logits(last_block(model), inputs[0], prefix, query), prefix, grid


def forward_with_similarity(self: nn.Module, x: torch.Tensor, similarity: str | None = "dot",
                            tokens: bool = False):
    """``(B, 3, H, W) -> (logits, S)``, ``S`` float32 ``(B, heads, h, w)`` from the last block.

    Mirrors ``VisionTransformer.forward_features`` + ``forward_head``; the logits equal
    ``model(x)``.

    Args:
        similarity: the kind of map (``"dot"``, Eq. 4; ``"softmax"``; ``"cosine"``, Eq. 15;
            see :func:`sarvit.surgery.block.similarity_from_qk`), or ``None``: no map
            (``S`` is ``None`` and the last block runs its plain forward).
        tokens: also return the patch tokens that leave the last block, before the
            model's final norm, as ``(B, h, w, C)``: then the result is ``(logits, S, tokens)``.
    """
    from timm.models._manipulate import checkpoint_seq

    x = self.patch_embed(x)  # (B, h*w, C), or (B, h, w, C) with dynamic_img_size
    grid = tuple(x.shape[1:3]) if x.dim() == 4 else tuple(self.patch_embed.grid_size)
    x = self._pos_embed(x)  # (B, prefix + h*w, C)
    x = self.patch_drop(x)
    x = self.norm_pre(x)
    body = self.blocks[:-1]
    if self.grad_checkpointing and not torch.jit.is_scripting():
        x = checkpoint_seq(body, x)
    else:
        x = body(x)
    x, S, patches = last_block_with_similarity(self.blocks, x, grid, self.num_prefix_tokens, similarity, tokens)
    x = self.norm(x)
    logits = self.forward_head(x)
    return (logits, S, patches) if tokens else (logits, S)
