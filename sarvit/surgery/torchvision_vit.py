"""SAR surgery for torchvision's ``VisionTransformer`` (``vit_b_16``, ``vit_b_32``, ``vit_l_16``,
``vit_l_32``, ``vit_h_14``, and the class built directly).

The last block is ``encoder.layers[-1]``, an ``EncoderBlock``: pre-norm, ``ln_1``,
``self_attention`` (an ``nn.MultiheadAttention``), ``dropout``, ``ln_2``, ``mlp``; no
drop-path, no LayerScale. Its ``dropout`` acts on the attention output, like timm's
``proj_drop``, so it stays on the MSA branch in every layout: Eq. 10-11 become
``z' = Dropout(MSA(LN1(z)))`` and ``z = MLP(z') + z'``. ``S`` (Eq. 4) comes from the block's
own in-projection (``in_proj_weight``/``in_proj_bias`` split into q, k, v; scale
``head_dim ** -0.5``), with the class token at index 0 as the query.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModel
from .block import (BlockLayout, SARBlock, install, last_block_with_similarity, query_logits_from_qk,
                    similarity_from_qk, uninstall)

__all__ = ["matches", "attach", "detach", "last_block", "attention_logits", "mha_with_similarity", "EncoderSARBlock"]

NAME = "torchvision VisionTransformer"
DESCRIPTION = ("torchvision.models.vision_transformer.VisionTransformer: vit_b_16, vit_b_32, vit_l_16, vit_l_32, "
               "vit_h_14")

_MODULE = "torchvision.models.vision_transformer"


def matches(model: nn.Module) -> bool:
    module = sys.modules.get(_MODULE)  # not imported: the model cannot be one of its classes
    return module is not None and isinstance(model, module.VisionTransformer)


def packed_qkv(mha: nn.MultiheadAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of a self-attention ``nn.MultiheadAttention`` from its packed in-projection:
    ``(B, N, C)`` -> three ``(B, heads, N, d)``."""
    B, N, C = x.shape
    qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias)  # (B, N, 3C): rows of q, then k, then v
    q, k, v = qkv.reshape(B, N, 3, mha.num_heads, C // mha.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v  # (B, heads, N, d) each


def last_block(model: nn.Module) -> nn.Module:
    """The last encoder block (plain, or the :class:`SARBlock` around it)."""
    return model.encoder.layers[-1]


def attention_logits(model: nn.Module, inputs: tuple, query: str, image_size: tuple[int, int]):
    """``(logits, 1, grid)``: the query's logits over all keys of the last block, float32
    ``(B, heads, 1 + h*w)`` (the class key first), and the patch grid ``(h, w)``.
    ``inputs``: the block's ``(x,)``, ``x`` ``(B, 1 + h*w, C)``."""
    block, x = last_block(model), inputs[0]
    q, k, _ = packed_qkv(block.self_attention, block.ln_1(x))  # (B, heads, N, d) each
    scale = (x.shape[-1] // block.self_attention.num_heads) ** -0.5
    grid = (image_size[0] // model.patch_size, image_size[1] // model.patch_size)
    return query_logits_from_qk(q, k, scale, 1, query), 1, grid


def mha_with_similarity(mha: nn.MultiheadAttention, x: torch.Tensor, query: str, similarity: str = "dot"):
    """``mha(x, x, x)[0]`` (self-attention, ``batch_first``) that also returns the similarity maps.

    Args:
        mha: an ``nn.MultiheadAttention`` with one packed in-projection, no ``bias_k``/``bias_v``
            and no zero attention.
        x: ``(B, N, C)``, the normalised tokens, the class token first.
        query: ``"cls"`` (token 0) or ``"mean"`` (mean of the patch queries).
        similarity: ``"dot"`` (Eq. 4), ``"softmax"`` or ``"cosine"``; see
            :func:`~sarvit.surgery.block.similarity_from_qk`.

    Returns:
        ``(out, S)``: ``out`` ``(B, N, C)`` equals ``mha(x, x, x)[0]``, computed with fused
        ``scaled_dot_product_attention``; ``S`` float32 ``(B, heads, N - 1)``.
    """
    B, N, C = x.shape
    q, k, v = packed_qkv(mha, x)  # (B, heads, N, d) each
    S = similarity_from_qk(q, k, (C // mha.num_heads) ** -0.5, 1, query, similarity)  # (B, heads, N - 1)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=mha.dropout if mha.training else 0.0)  # (B, heads, N, d)
    out = out.transpose(1, 2).reshape(B, N, C)  # (B, N, heads * d)
    return mha.out_proj(out), S


class EncoderSARBlock(SARBlock):
    """torchvision's ``EncoderBlock`` rewired to a Table 1(b) layout; ``(B, N, C) -> (B, N, C)``."""

    NORM2 = "ln_2"

    def __init__(self, block: nn.Module, layout: BlockLayout, query: str) -> None:
        super().__init__(block, layout, num_prefix_tokens=1, query=query)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        a, _ = self.self_attention(h, h, h, need_weights=False)
        return self._finish(x, self.dropout(a))

    def forward_with_similarity(self, x: torch.Tensor, similarity: str = "dot"):
        a, S = mha_with_similarity(self.self_attention, self.ln_1(x), self.query, similarity)
        return self._finish(x, self.dropout(a)), S


def _check(model: nn.Module) -> None:
    from torchvision.models.vision_transformer import EncoderBlock

    last = model.encoder.layers[-1]
    if isinstance(last, SARBlock):
        raise ValueError("this model already has SAR attached; call sarvit.detach(model) first")
    mha = getattr(last, "self_attention", None)
    if not isinstance(last, EncoderBlock) or not isinstance(mha, nn.MultiheadAttention):
        raise UnsupportedModel(f"SAR needs torchvision's EncoderBlock as the last block; this model's is "
                               f"{type(last).__name__}. Supported: {NAME} ({DESCRIPTION})")
    if (not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn or not mha.batch_first):
        raise UnsupportedModel("SAR needs the last block's MultiheadAttention with one packed in-projection, "
                               "batch_first, no bias_k/bias_v and no zero attention, as torchvision builds it")


def attach(model: nn.Module, layout: BlockLayout, query: str) -> nn.Module:
    query = "cls" if query == "auto" else query  # torchvision's ViT always has a class token
    _check(model)
    layers = model.encoder.layers
    wrapper = EncoderSARBlock(layers[-1], layout, query)  # keeps the name encoder_layer_{L-1}
    return install(model, layers, wrapper, forward_with_similarity)


def detach(model: nn.Module) -> nn.Module:
    return uninstall(model, model.encoder.layers)


def forward_with_similarity(self: nn.Module, x: torch.Tensor, similarity: str | None = "dot",
                            tokens: bool = False):
    """``(B, 3, H, W) -> (logits, S)``, ``S`` float32 ``(B, heads, h, w)`` from the last block.

    Mirrors ``VisionTransformer.forward`` and ``Encoder.forward``; the logits equal
    ``model(x)``. ``similarity`` and ``tokens`` as in :func:`sarvit.surgery.vit.forward_with_similarity`.
    """
    x = self._process_input(x)  # (B, h*w, C)
    grid = (self.image_size // self.patch_size,) * 2
    x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + h*w, C)
    encoder = self.encoder
    x = encoder.layers[:-1](encoder.dropout(x + encoder.pos_embedding))
    x, S, patches = last_block_with_similarity(encoder.layers, x, grid, 1, similarity, tokens)
    logits = self.heads(encoder.ln(x)[:, 0])
    return (logits, S, patches) if tokens else (logits, S)

