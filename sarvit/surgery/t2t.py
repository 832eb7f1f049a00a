"""SAR surgery for T2T-ViT (``sarvit.models.t2t_vit``: ``t2t_vit_14``, ``t2t_vit_t_14``).

After its tokens-to-token module, T2T-ViT is a plain ViT backbone: a [CLS] token and timm
``Block``s. So the last block is wrapped by :class:`SARBlock` as is, and ``S`` is the
[CLS] query of the last block against its keys on the token grid (14x14 at 224x224).
"""

from __future__ import annotations


import torch
from torch import nn

from .block import BlockLayout, auto_query, last_block_with_similarity, timm_attention_logits, uninstall
from .vit import attach_timm_blocks, check_timm_block, last_block

__all__ = ["matches", "attach", "detach", "last_block", "attention_logits"]

NAME = "T2T-ViT"
DESCRIPTION = "sarvit.models.t2t_vit.T2TViT: t2t_vit_14, t2t_vit_t_14; S on the token grid (14x14 at 224x224)"


def matches(model: nn.Module) -> bool:
    from ..models.t2t_vit import T2TViT

    return isinstance(model, T2TViT)


def attach(model: nn.Module, layout: BlockLayout, query: str) -> nn.Module:
    query = auto_query(model, query)
    check_timm_block(model, query, f"{NAME} ({DESCRIPTION})")
    return attach_timm_blocks(model, layout, query, forward_with_similarity)


def detach(model: nn.Module) -> nn.Module:
    return uninstall(model, model.blocks)


def attention_logits(model: nn.Module, inputs: tuple, query: str, image_size: tuple[int, int]):
    """``(logits, P, grid)``: the query's logits over all keys of the last block, float32
    ``(B, heads, 1 + h*w)``, on the token grid; as :func:`sarvit.surgery.vit.attention_logits`."""
    from ..models.t2t_vit import t2t_grid

    prefix = model.num_prefix_tokens
    return timm_attention_logits(last_block(model), inputs[0], prefix, query), prefix, t2t_grid(tuple(image_size))


def forward_with_similarity(self: nn.Module, x: torch.Tensor, similarity: str | None = "dot",
                            tokens: bool = False):
    """``(B, C_in, H, W) -> (logits, S)``, ``S`` float32 ``(B, heads, h, w)`` from the last
    block, on the token grid (14x14 at 224x224); the logits equal ``model(x)``.

    Mirrors ``T2TViT.forward_features`` + ``forward_head``.

    Args:
        similarity: ``"dot"`` (Eq. 4), ``"softmax"``, ``"cosine"`` (Eq. 15), or ``None``:
            no map (``S`` is ``None`` and the last block runs its plain forward).
        tokens: also return the patch tokens that leave the last block, before the final
            norm, as ``(B, h, w, C)``: then the result is ``(logits, S, tokens)``.
    """
    from timm.models._manipulate import checkpoint_seq

    x = self.embed(x)  # (B, 1 + h*w, C)
    grid = tuple(self.patch_embed.grid_size)
    body = self.blocks[:-1]
    x = checkpoint_seq(body, x) if self.grad_checkpointing and not torch.jit.is_scripting() else body(x)
    x, S, patches = last_block_with_similarity(self.blocks, x, grid, self.num_prefix_tokens, similarity, tokens)
    logits = self.forward_head(self.norm(x))
    return (logits, S, patches) if tokens else (logits, S)
