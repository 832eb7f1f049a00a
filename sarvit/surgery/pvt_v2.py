"""SAR surgery for timm's PVT v2 (``pvt_v2_b0`` ... ``pvt_v2_b5``, ``pvt_v2_b2_li``).

PVT v2 has no class token: the query of Eq. 4 is the mean of the last block's patch
queries (``query="mean"``, Sec. 5.2's suggestion). The keys are those of the last block
of the last stage, on the grid they lie on: the stage's own grid when its ``sr_ratio``
is 1 (the published models: 7x7 at 224), the reduced grid ``(H/R, W/R)`` otherwise, and
7x7 (adaptive average pooling) for the linear variants (``pvt_v2_b2_li``, ``linear=True``).
Eq. 10-11 rewire that block; its MLP keeps its depthwise convolution over the token grid.
"""

from __future__ import annotations


import torch
from torch import nn

from ..errors import ConfigError, UnsupportedModel
from .block import BlockLayout, SARBlock, install, uninstall
from .pvt import GridSARBlock, last_block, run_last_block, sr_attention_logits

__all__ = ["matches", "attach", "detach", "last_block", "attention_logits"]

NAME = "timm PVT v2"
DESCRIPTION = ("timm.models.pvt_v2.PyramidVisionTransformerV2: pvt_v2_b0 ... pvt_v2_b5, pvt_v2_b2_li; no class "
               "token: the mean patch query of the last block against its keys, 7x7 at 224")


class PVTv2SARBlock(GridSARBlock):
    """The SAR last block of PVT v2: its MLP takes the token grid (a depthwise convolution)."""

    MLP_TAKES_GRID = True


def matches(model: nn.Module) -> bool:
    from timm.models.pvt_v2 import PyramidVisionTransformerV2

    return isinstance(model, PyramidVisionTransformerV2)


def attention_logits(model: nn.Module, inputs: tuple, query: str, image_size: tuple[int, int]):
    """``(logits, 0, grid)``: the mean query's logits over the keys of the last block, float32
    ``(B, heads, h*w)``, on the key grid ``(h, w)``. ``inputs``: the block's ``(x, feat_size)``."""
    logits, grid = sr_attention_logits(last_block(model), inputs[0], tuple(inputs[1]), 0, query)
    return logits, 0, grid


def _check(model: nn.Module, query: str) -> None:
    from timm.models.pvt_v2 import Attention, Block

    last = model.stages[-1].blocks[-1]
    if isinstance(last, SARBlock):
        raise ValueError("this model already has SAR attached; call sarvit.detach(model) first")
    if not isinstance(last, Block) or not isinstance(last.attn, Attention):
        raise UnsupportedModel(f"SAR needs timm's PVT v2 last block; this model's is {type(last).__name__}. "
                               f"Supported: {NAME} ({DESCRIPTION})")
    if query == "cls":
        raise ConfigError("PVT v2 has no class token; attach it with query='mean' (the default 'auto' does)")


def attach(model: nn.Module, layout: BlockLayout, query: str) -> nn.Module:
    query = "mean" if query == "auto" else query
    _check(model, query)
    stage = model.stages[-1]
    wrapper = PVTv2SARBlock(stage.blocks[-1], layout, 0, query)
    return install(model, stage.blocks, wrapper, forward_with_similarity)


def detach(model: nn.Module) -> nn.Module:
    return uninstall(model, model.stages[-1].blocks)


def forward_with_similarity(self: nn.Module, x: torch.Tensor, similarity: str | None = "dot",
                            tokens: bool = False):
    """``(B, 3, H, W) -> (logits, S)``, ``S`` float32 ``(B, heads, h, w)`` on the last block's key grid.

    Mirrors ``PyramidVisionTransformerV2.forward_features`` (and its last stage's forward)
    + ``forward_head``; the logits equal ``model(x)``. ``similarity`` and ``tokens`` as in
    :mod:`sarvit.surgery.vit`: ``tokens=True`` adds the tokens leaving the last block,
    before the stage's final norm, ``(B, H, W, C)``.
    """
    from timm.models._manipulate import checkpoint

    x = self.patch_embed(x)  # (B, H, W, C)
    x = self.stages[:-1](x)  # (B, C, H, W), or (B, H, W, C) with one stage
    last = self.stages[-1]
    if last.downsample is not None:
        x = last.downsample(x)  # (B, H, W, C)
    B, H, W, C = x.shape
    grid = (H, W)
    x = x.reshape(B, H * W, C)  # (B, H*W, C)
    for block in last.blocks[:-1]:
        if last.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint(block, x, grid)
        else:
            x = block(x, grid)
    x, S = run_last_block(last, x, grid, similarity)
    patches = x.unflatten(1, grid) if tokens else None  # (B, H, W, C)
    x = last.norm(x).reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W)
    logits = self.forward_head(x)
    return (logits, S, patches) if tokens else (logits, S)
