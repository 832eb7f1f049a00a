"""SAR surgery for CvT (``sarvit.models.cvt``: ``cvt_13``).

The last block of the last stage is rewired (Table 1(b)). Its keys come out of a stride-2
convolutional projection, so ``S`` lies on the key grid, half the token grid (7x7 for
14x14 tokens at 224x224), not on the token grid. The query is the class token's (which
skips the convolutions), or the mean of the patch queries for a CvT without class token.
``S`` is scaled as the block scales its own logits: ``dim ** -0.5``, the stage width.
"""

from __future__ import annotations


import torch
from torch import nn

from ..errors import ConfigError, UnsupportedModel
from .block import BlockLayout, SARBlock, auto_query, install, query_logits_from_qk, similarity_from_qk, uninstall

__all__ = ["matches", "attach", "detach", "last_block", "attention_logits", "CvTSARBlock"]

NAME = "CvT"
DESCRIPTION = "sarvit.models.cvt.CvT: cvt_13; S on the stride-2 key grid of the last block"


def matches(model: nn.Module) -> bool:
    from ..models.cvt import CvT

    return isinstance(model, CvT)


class CvTSARBlock(SARBlock):
    """:class:`SARBlock` for a ``CvTBlock``, whose attention also takes the token grid ``size``.

    ``forward(x, size)``: ``(B, prefix + h*w, C) -> (B, prefix + h*w, C)``;
    ``forward_with_similarity(x, size)`` also returns ``S`` of shape ``(B, heads, h'*w')``
    over the key grid ``attn.key_grid(size)``.
    """

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self._finish(x, self.attn(self.norm1(x), size))

    def forward_with_similarity(self, x: torch.Tensor, size: tuple[int, int], similarity: str = "dot"):
        q, k, v = self.attn.qkv(self.norm1(x), size)  # q: (B, heads, p + h*w, d); k, v: (B, heads, p + h'*w', d)
        # scaled as the block scales its logits (dim ** -0.5, the stage width); S: (B, heads, h'*w')
        S = similarity_from_qk(q, k, self.attn.scale, self.num_prefix_tokens, self.query, similarity)
        return self._finish(x, self.attn.attend(q, k, v)), S


def last_block(model: nn.Module) -> nn.Module:
    """The last block of the last stage (plain, or the :class:`SARBlock` around it)."""
    return model.stages[-1].blocks[-1]


def attention_logits(model: nn.Module, inputs: tuple, query: str, image_size: tuple[int, int]):
    """``(logits, P, grid)``: the query's logits over all keys of the last block, float32
    ``(B, heads, P + h'*w')`` scaled as the block scales them, ``P`` prefix keys (the class
    token's) and the stride-2 key grid ``(h', w')``. ``inputs``: the block's ``(x, size)``."""
    block, (x, size) = last_block(model), inputs
    q, k, _ = block.attn.qkv(block.norm1(x), size)  # q: (B, heads, P + h*w, d); k: (B, heads, P + h'*w', d)
    prefix = model.stages[-1].num_prefix_tokens
    return query_logits_from_qk(q, k, block.attn.scale, prefix, query), prefix, block.attn.key_grid(size)


def _check(model: nn.Module, query: str) -> None:
    from ..models.cvt import CvTBlock

    last = model.stages[-1].blocks[-1]
    if isinstance(last, SARBlock):
        raise ValueError("this model already has SAR attached; call sarvit.detach(model) first")
    if type(last) is not CvTBlock:
        raise UnsupportedModel(f"the last block of this CvT is a {type(last).__name__}, not a CvTBlock; "
                               f"Supported: {NAME} ({DESCRIPTION})")
    if query == "cls" and model.stages[-1].cls_token is None:
        raise ConfigError("this CvT has no class token; attach it with query='mean' (the default 'auto' does)")


def attach(model: nn.Module, layout: BlockLayout, query: str) -> nn.Module:
    stage = model.stages[-1]
    query = auto_query(model, query)  # CvT.cls_token: the last stage's
    _check(model, query)
    wrapper = CvTSARBlock(stage.blocks[-1], layout, stage.num_prefix_tokens, query)
    return install(model, stage.blocks, wrapper, forward_with_similarity)


def detach(model: nn.Module) -> nn.Module:
    return uninstall(model, model.stages[-1].blocks)


def forward_with_similarity(self: nn.Module, x: torch.Tensor, similarity: str | None = "dot",
                            tokens: bool = False):
    """``(B, C_in, H, W) -> (logits, S)``, ``S`` float32 ``(B, heads, h', w')`` on the key grid of
    the last block (7x7 for CvT-13 at 224x224); the logits equal ``model(x)``.

    Mirrors ``CvT.forward_features`` + ``forward_head``.

    Args:
        similarity: ``"dot"`` (Eq. 4, scaled by ``dim ** -0.5`` as the block scales its
            logits), ``"softmax"``, ``"cosine"`` (Eq. 15), or ``None``: no map (``S`` is
            ``None`` and the last block runs its plain forward).
        tokens: also return the patch tokens that leave the last block, before the final
            norm, as ``(B, h, w, C)`` on the token grid (14x14 at 224x224; twice the key
            grid): then the result is ``(logits, S, tokens)``.
    """
    for stage in self.stages[:-1]:
        x = stage(x)  # (B, C_i, h_i, w_i)
    stage = self.stages[-1]
    x, size = stage.tokens(x)  # (B, prefix + h*w, C)
    for block in stage.blocks[:-1]:
        x = block(x, size)
    last = stage.blocks[-1]
    S = None
    if similarity is None:
        x = last(x, size)
    else:
        x, S = last.forward_with_similarity(x, size, similarity)  # S: (B, heads, h'*w')
        S = S.unflatten(-1, last.attn.key_grid(size))  # (B, heads, h', w')
    patches = x[:, stage.num_prefix_tokens:].unflatten(1, size) if tokens else None  # (B, h, w, C)
    logits = self.forward_head(self.norm(x))
    return (logits, S, patches) if tokens else (logits, S)
