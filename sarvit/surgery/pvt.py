"""SAR surgery for PVT v1 (``sarvit.models.pvt``: ``pvt_tiny``, ``pvt_small``).

The last stage holds the [CLS] token and has no spatial reduction (``sr_ratio`` 1), so
S is the class token's query against the keys of the last block of the last stage, on
that stage's grid (7x7 at 224). Eq. 10-11 rewire that block.

:func:`sr_attention_with_similarity` and :class:`GridSARBlock` serve PVT v2 as well: both
use spatial-reduction attention, whose keys may lie on a coarser grid than the queries.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModel
from .block import BlockLayout, SARBlock, install, query_logits_from_qk, similarity_from_qk, uninstall

__all__ = ["matches", "attach", "detach", "last_block", "attention_logits", "sr_qkv", "sr_attention_with_similarity",
           "sr_attention_logits", "GridSARBlock"]

NAME = "PVT v1"
DESCRIPTION = ("sarvit.models.pvt.PyramidVisionTransformer: pvt_tiny, pvt_small; the [CLS] query of the last "
               "block against its keys, 7x7 at 224")


def reduced_key_tokens(attn: nn.Module, x: torch.Tensor, feat_size: tuple[int, int], num_prefix_tokens: int):
    """The tokens a spatial-reduction attention takes its keys and values from, and their grid.

    Args:
        attn: PVT's attention (v1 or timm's v2): ``sr`` (a strided conv or None), ``norm``,
            and for PVT v2's linear variant ``pool`` (adaptive average pooling to 7x7) and ``act``.
        x: ``(B, P + H*W, C)`` normalised tokens of the ``feat_size = (H, W)`` grid.

    Returns:
        ``(tokens, grid)``: ``(B, P + h*w, C)`` and ``(h, w)``, the key grid.
    """
    pool, sr = getattr(attn, "pool", None), attn.sr
    if pool is None and sr is None:
        return x, tuple(feat_size)
    if num_prefix_tokens:
        raise UnsupportedModel("a spatial reduction of the keys cannot take prefix (class) tokens")
    B, N, C = x.shape
    maps = x.transpose(1, 2).reshape(B, C, *feat_size)  # (B, C, H, W)
    if pool is not None:
        maps = pool(maps)  # (B, C, 7, 7)
    maps = sr(maps)  # (B, C, h, w)
    grid = tuple(maps.shape[-2:])
    tokens = attn.norm(maps.flatten(2).transpose(1, 2))  # (B, h*w, C)
    act = getattr(attn, "act", None)
    return (act(tokens) if act is not None else tokens), grid


def sr_qkv(attn: nn.Module, x: torch.Tensor, feat_size: tuple[int, int], num_prefix_tokens: int):
    """The queries, keys and values of a spatial-reduction attention, and the key grid.

    Args:
        attn: PVT v1's or timm's PVT v2 ``Attention``.
        x: ``(B, P + H*W, C)``, the normalised tokens of the ``feat_size = (H, W)`` grid.

    Returns:
        ``(q, k, v, grid)``: ``q`` ``(B, heads, P + H*W, d)``; ``k``, ``v`` ``(B, heads, P + h*w, d)``;
        ``grid`` the key grid ``(h, w)``.
    """
    B, N, C = x.shape
    heads = attn.num_heads
    q = attn.q(x).reshape(B, N, heads, C // heads).transpose(1, 2)  # (B, heads, N, d)
    tokens, grid = reduced_key_tokens(attn, x, feat_size, num_prefix_tokens)  # (B, P + h*w, C)
    kv = attn.kv(tokens).reshape(B, -1, 2, heads, C // heads).permute(2, 0, 3, 1, 4)  # (2, B, heads, P + h*w, d)
    k, v = kv.unbind(0)
    return q, k, v, grid


def sr_attention_logits(block: nn.Module, x: torch.Tensor, feat_size: tuple[int, int], num_prefix_tokens: int,
                        query: str):
    """The query's attention logits over all keys of a PVT block (plain or SAR-wrapped).

    Args:
        x: ``(B, P + H*W, C)``, the tokens entering the block.

    Returns:
        ``(logits, grid)``: float32 ``(B, heads, P + h*w)`` and the key grid ``(h, w)``.
    """
    q, k, _, grid = sr_qkv(block.attn, block.norm1(x), feat_size, num_prefix_tokens)
    return query_logits_from_qk(q, k, block.attn.scale, num_prefix_tokens, query), grid


def sr_attention_with_similarity(attn: nn.Module, x: torch.Tensor, feat_size: tuple[int, int],
                                 num_prefix_tokens: int, query: str, similarity: str = "dot"):
    """PVT's spatial-reduction attention that also returns the similarity maps (Eq. 4 by default).

    Args:
        attn: PVT v1's or timm's PVT v2 ``Attention`` (``q``, ``kv``, ``sr``, ``norm``, ``proj``).
        x: ``(B, P + H*W, C)``, the normalised tokens entering the attention.
        feat_size: ``(H, W)``, the grid of the queries.
        similarity: ``"dot"`` (Eq. 4), ``"softmax"`` or ``"cosine"`` (Eq. 15).

    Returns:
        ``(out, S)``: ``out`` ``(B, P + H*W, C)`` equals ``attn(x, feat_size)`` (fused
        ``scaled_dot_product_attention``); ``S`` float32 ``(B, heads, h, w)`` on the key grid.
    """
    B, N, C = x.shape
    q, k, v, grid = sr_qkv(attn, x, feat_size, num_prefix_tokens)
    S = similarity_from_qk(q, k, attn.scale, num_prefix_tokens, query, similarity)  # (B, heads, h*w)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    out = out.transpose(1, 2).reshape(B, N, C)  # (B, N, heads * d)
    return attn.proj_drop(attn.proj(out)), S.unflatten(-1, grid)  # S: (B, heads, h, w)


class GridSARBlock(SARBlock):
    """:class:`SARBlock` for blocks called as ``block(x, feat_size)`` with a spatial-reduction attention.

    ``forward(x, feat_size)``; ``forward_with_similarity(x, feat_size, similarity)`` returns
    ``(out, S)`` with ``S`` ``(B, heads, h, w)`` on the key grid. ``MLP_TAKES_GRID``: the
    MLP is also called with ``feat_size`` (PVT v2's depthwise convolution).
    """

    MLP_TAKES_GRID = False

    def forward(self, x: torch.Tensor, feat_size: tuple[int, int]) -> torch.Tensor:
        return self._finish(x, self.attn(self.norm1(x), feat_size), *self._mlp_args(feat_size))

    def forward_with_similarity(self, x: torch.Tensor, feat_size: tuple[int, int], similarity: str = "dot"):
        a, S = sr_attention_with_similarity(self.attn, self.norm1(x), feat_size, self.num_prefix_tokens, self.query,
                                            similarity)
        return self._finish(x, a, *self._mlp_args(feat_size)), S

    def _mlp_args(self, feat_size: tuple[int, int]) -> tuple:
        return (feat_size,) if self.MLP_TAKES_GRID else ()


def run_last_block(stage: nn.Module, x: torch.Tensor, grid: tuple[int, int], similarity: str | None):
    """The last block of ``stage`` on ``(B, N, C)`` tokens: ``(tokens, S)``, ``S`` None without a similarity."""
    if similarity is None:
        return stage.blocks[-1](x, grid), None
    return stage.blocks[-1].forward_with_similarity(x, grid, similarity)


def matches(model: nn.Module) -> bool:
    from ..models.pvt import PyramidVisionTransformer

    return isinstance(model, PyramidVisionTransformer)


def last_block(model: nn.Module) -> nn.Module:
    """The last block of the last stage (plain, or the :class:`SARBlock` around it)."""
    return model.stages[-1].blocks[-1]


def attention_logits(model: nn.Module, inputs: tuple, query: str, image_size: tuple[int, int]):
    """``(logits, P, grid)``: the query's logits over all keys of the last block, float32
    ``(B, heads, P + h*w)``, ``P`` prefix keys (the [CLS] key) and the key grid ``(h, w)``.
    ``inputs`` are the block's arguments ``(x, feat_size)``."""
    prefix = model.stages[-1].num_prefix_tokens
    logits, grid = sr_attention_logits(last_block(model), inputs[0], tuple(inputs[1]), prefix, query)
    return logits, prefix, grid


def _check(model: nn.Module) -> None:
    from ..models.pvt import Attention, Block

    last = model.stages[-1].blocks[-1]
    if isinstance(last, SARBlock):
        raise ValueError("this model already has SAR attached; call sarvit.detach(model) first")
    if not isinstance(last, Block) or not isinstance(last.attn, Attention):
        raise UnsupportedModel(f"SAR needs PVT's own last block; this model's is {type(last).__name__}. "
                               f"Supported: {NAME} ({DESCRIPTION})")


def attach(model: nn.Module, layout: BlockLayout, query: str) -> nn.Module:
    query = "cls" if query == "auto" else query  # PVT v1's last stage has the class token
    _check(model)
    stage = model.stages[-1]
    wrapper = GridSARBlock(stage.blocks[-1], layout, stage.num_prefix_tokens, query)
    return install(model, stage.blocks, wrapper, forward_with_similarity)


def detach(model: nn.Module) -> nn.Module:
    return uninstall(model, model.stages[-1].blocks)


def forward_with_similarity(self: nn.Module, x: torch.Tensor, similarity: str | None = "dot",
                            tokens: bool = False):
    """``(B, 3, H, W) -> (logits, S)``, ``S`` float32 ``(B, heads, h, w)`` from the last block.

    Mirrors ``PyramidVisionTransformer.forward_features`` + ``forward_head``; the logits
    equal ``model(x)``. ``similarity`` and ``tokens`` as in :mod:`sarvit.surgery.vit`:
    ``tokens=True`` adds the patch tokens leaving the last block, before the final norm,
    ``(B, h, w, C)``.
    """
    x = self.forward_stem(x)  # (B, h, w, C1)
    for stage in self.stages[:-1]:
        x, grid = stage(x)  # (B, h*w, C)
        x = x.transpose(1, 2).unflatten(2, grid)  # (B, C, h, w)
    last = self.stages[-1]
    x, grid = last.embed(x, self.cls_token)  # (B, 1 + h*w, C4)
    x = last.run_blocks(x, grid, last.blocks[:-1])
    x, S = run_last_block(last, x, grid, similarity)
    patches = x[:, last.num_prefix_tokens:].unflatten(1, grid) if tokens else None  # (B, h, w, C4)
    logits = self.forward_head(self.norm(x))
    return (logits, S, patches) if tokens else (logits, S)
