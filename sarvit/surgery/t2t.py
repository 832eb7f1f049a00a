"""SAR surgery for T2T-ViT (``sarvit.models.t2t_vit``: ``t2t_vit_14``, ``t2t_vit_t_14``).

After its tokens-to-token module, T2T-ViT is a plain ViT backbone: a [CLS] token and timm
``Block``s. So the last block is wrapped by :class:`SARBlock` as is, and ``S`` is the
[CLS] query of the last block against its keys on the token grid (14x14 at 224x224).
"""

from __future__ import annotations


import torch
from torch import nn

from ..errors import ConfigError, UnsupportedModel
from .block import BlockLayout, SARBlock, install, uninstall

__all__ = ["matches", "attach", "detach"]

NAME = "T2T-ViT"
DESCRIPTION = "sarvit.models.t2t_vit.T2TViT: t2t_vit_14, t2t_vit_t_14; S on the token grid (14x14 at 224x224)"


def matches(model: nn.Module) -> bool:
    from ..models.t2t_vit import T2TViT

    return isinstance(model, T2TViT)


def _check(model: nn.Module, query: str) -> None:
    from timm.layers import Attention
    from timm.models.vision_transformer import Block

    last = model.blocks[-1]
    if isinstance(last, SARBlock):
        raise ValueError("this model already has SAR attached; call sarvit.detach(model) first")
    if type(last) is not Block or not isinstance(last.attn, Attention):
        raise UnsupportedModel(f"the last block of this T2T-ViT is a {type(last).__name__}, not timm's Block; "
                               f"Supported: {NAME} ({DESCRIPTION})")
    if query == "cls" and getattr(model, "cls_token", None) is None:
        raise ConfigError("this T2T-ViT has no class token; attach it with query='mean' (the default 'auto' does)")


def attach(model: nn.Module, layout: BlockLayout, query: str) -> nn.Module:
    if query == "auto":
        query = "cls" if getattr(model, "cls_token", None) is not None else "mean"
    _check(model, query)
    wrapper = SARBlock(model.blocks[-1], layout, model.num_prefix_tokens, query)
    return install(model, model.blocks, wrapper, forward_with_similarity)


def detach(model: nn.Module) -> nn.Module:
    return uninstall(model, model.blocks)


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
    S = None
    if similarity is None:
        x = self.blocks[-1](x)
    else:
        x, S = self.blocks[-1].forward_with_similarity(x, similarity)  # S: (B, heads, h*w)
        S = S.unflatten(-1, grid)  # (B, heads, h, w)
    patches = x[:, self.num_prefix_tokens:].unflatten(1, grid) if tokens else None  # (B, h, w, C)
    logits = self.forward_head(self.norm(x))
    return (logits, S, patches) if tokens else (logits, S)
