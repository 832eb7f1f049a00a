"""SAR surgery for timm's ``SwinTransformer`` (``swin_*``, ``swin_s3_*``).

Swin has no class token: the query of Eq. 4 is the mean of the last block's patch queries
(``query="mean"``, Sec. 5.2's average-pooling suggestion applied to the queries). The keys
are those of the last block of the last stage. At 224 px that stage is a 7 x 7 grid
attended by one 7 x 7 window without shift, so the mean query sees every key: ``S`` is
``(B, heads, 7, 7)``. When the last stage holds several windows (a larger ``img_size``,
``always_partition``) one query cannot see every key, and :func:`attach` refuses.

The relative position bias does not enter ``S``. Swin's pre-softmax logits are
``q.k * scale + bias``, but Eq. 4 is ``q.k * scale``: the bias is a learned table indexed
by relative position only, the same for every image. Inside ``S`` the spatial-entropy
loss could lower itself by shaping that table into one blob, whatever the image shows,
which is not the content-dependent locality SAR asks for. (For the mean query the bias
would also need a query position; the mean query has none.) The block's own attention
keeps its bias, and the bias table trains through the cross-entropy term as usual.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, UnsupportedModel
from .block import BlockLayout, SARBlock, install, query_logits_from_qk, similarity_from_qk, uninstall

__all__ = ["matches", "attach", "detach", "last_block", "attention_logits", "window_attention_with_similarity",
           "SwinSARBlock"]

NAME = "timm Swin Transformer"
DESCRIPTION = "timm.models.swin_transformer.SwinTransformer: swin_*, swin_s3_*, last stage one window (224 px)"


def matches(model: nn.Module) -> bool:
    from timm.models.swin_transformer import SwinTransformer

    return isinstance(model, SwinTransformer)


def window_qkv(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The queries, keys and values of a ``WindowAttention`` over one window: ``(B, N, C)`` -> three
    ``(B, heads, N, d)``."""
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)  # (3, B, heads, N, d)
    q, k, v = qkv.unbind(0)
    return q, k, v


def window_attention_with_similarity(attn: nn.Module, x: torch.Tensor, query: str, similarity: str = "dot"):
    """timm ``WindowAttention.forward`` over ONE window, also returning the similarity maps.

    Args:
        attn: a ``timm.models.swin_transformer.WindowAttention``.
        x: ``(B, N, C)``, the normalised tokens of the window (the whole grid), row-major.
        query: ``"mean"`` (the mean of the patch queries; Swin has no class token).
        similarity: ``"dot"`` (Eq. 4, without the relative position bias), ``"softmax"`` or
            ``"cosine"``; see :func:`~sarvit.surgery.block.similarity_from_qk`.

    Returns:
        ``(out, S)``: ``out`` ``(B, N, C)`` equals ``attn(x)`` (the bias included) and is
        computed with fused ``scaled_dot_product_attention``; ``S`` float32 ``(B, heads, N)``.
    """
    B, N, _ = x.shape
    q, k, v = window_qkv(attn, x)  # (B, heads, N, d) each
    S = similarity_from_qk(q, k, attn.scale, 0, query, similarity)  # (B, heads, N)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn._get_rel_pos_bias(), dropout_p=attn.attn_drop.p if attn.training else 0.0,
    )  # (B, heads, N, d)
    out = out.transpose(1, 2).reshape(B, N, -1)  # (B, N, heads * d)
    return attn.proj_drop(attn.proj(out)), S


class SwinSARBlock(SARBlock):
    """timm's ``SwinTransformerBlock`` rewired to a Table 1(b) layout, for a last stage that is
    one window without shift. Maps ``(B, H, W, C) -> (B, H, W, C)`` like the wrapped block
    (pre-norm: norm1, attn, drop_path1, norm2, mlp, drop_path2; no LayerScale)."""

    def __init__(self, block: nn.Module, layout: BlockLayout, query: str) -> None:
        super().__init__(block, layout, num_prefix_tokens=0, query=query)

    @property
    def window_size(self) -> tuple[int, int]:
        return tuple(self.attn.window_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._finish(x, self._attention(self.norm1(x), None)[0])

    def forward_with_similarity(self, x: torch.Tensor, similarity: str = "dot"):
        """``(B, H, W, C) -> ((B, H, W, C), S)``, ``S`` float32 ``(B, heads, H * W)``."""
        a, S = self._attention(self.norm1(x), similarity)
        return self._finish(x, a), S

    def _attention(self, x: torch.Tensor, similarity: str | None):
        """The window attention of ``x`` ``(B, H, W, C)``: one window, so no partition, shift or mask."""
        B, H, W, C = x.shape
        if (H, W) != self.window_size:
            raise ConfigError(_several_windows((H, W), self.window_size, (0, 0)))
        tokens = x.reshape(B, H * W, C)  # (B, N, C): window_partition of the one window, row-major
        if similarity is None:
            return self.attn(tokens).reshape(B, H, W, C), None
        out, S = window_attention_with_similarity(self.attn, tokens, self.query, similarity)
        return out.reshape(B, H, W, C), S  # (B, H, W, C), (B, heads, N)

    def set_input_size(self, *args, **kwargs) -> None:
        """timm's ``set_input_size``, applied to the wrapped block (its parts are this block's)."""
        self._original[0].set_input_size(*args, **kwargs)


def last_block(model: nn.Module) -> nn.Module:
    """The last block of the last stage (plain, or the :class:`SARBlock` around it)."""
    return model.layers[-1].blocks[-1]


def attention_logits(model: nn.Module, inputs: tuple, query: str, image_size: tuple[int, int]):
    """``(logits, 0, grid)``: the mean query's logits over the keys of the last block, float32
    ``(B, heads, h*w)`` on the last stage's grid ``(h, w)``. ``inputs``: the block's ``(x,)``,
    ``x`` ``(B, h, w, C)``.

    The logits are ``q_mean . k * scale``, without the relative position bias, as ``S``
    (the mean query has no position to index the bias with; see the module docstring).
    The grid must be one window without shift, else :class:`~sarvit.errors.ConfigError`.
    """
    block, x = last_block(model), inputs[0]
    B, H, W, C = x.shape
    window, shift = tuple(block.attn.window_size), tuple(getattr(block, "shift_size", (0, 0)))
    if (H, W) != window or any(shift):
        raise ConfigError(_several_windows((H, W), window, shift))
    q, k, _ = window_qkv(block.attn, block.norm1(x).reshape(B, H * W, C))  # (B, heads, N, d) each
    return query_logits_from_qk(q, k, block.attn.scale, 0, query), 0, (H, W)


def _several_windows(grid, window, shift, stage_windows=None) -> str:
    """The error message for a last stage of several windows (or a shifted one)."""
    windows = -(-grid[0] // window[0]) * -(-grid[1] // window[1])
    shifted = ", shifted" if any(shift) else ""
    if stage_windows:  # one [h, w] per stage, the last one covering the last grid
        per_stage = ", ".join(f"[{h}, {w}]" for h, w in [*stage_windows[:-1], grid])
        how = f"--model-kwargs '{{window_size: [{per_stage}]}}'"
    else:
        how = f"window_size={grid[0]} for the last stage"
    return (f"SAR on Swin needs the last stage to be ONE attention window without shift, so that the mean query "
            f"sees every key; here the last stage's grid is {grid[0]}x{grid[1]} and its window "
            f"{window[0]}x{window[1]} ({windows} window(s){shifted}). Train at the image size whose last grid "
            f"equals the window (224 px for window 7), or give the last stage a {grid[0]}x{grid[1]} window: {how}")


def _check(model: nn.Module, query: str) -> None:
    from timm.models.swin_transformer import SwinTransformerBlock, WindowAttention

    last = model.layers[-1].blocks[-1]
    if isinstance(last, SARBlock):
        raise ValueError("this model already has SAR attached; call sarvit.detach(model) first")
    if not isinstance(last, SwinTransformerBlock) or not isinstance(last.attn, WindowAttention):
        raise UnsupportedModel(f"SAR needs timm's SwinTransformerBlock as the last block; this model's is "
                               f"{type(last).__name__}. Supported: {NAME} ({DESCRIPTION})")
    if any(True for _ in last.named_parameters(recurse=False)):
        raise UnsupportedModel(f"the last block {type(last).__name__} holds parameters of its own; SAR cannot wrap it")
    grid, window, shift = tuple(last.input_resolution), tuple(last.window_size), tuple(last.shift_size)
    if grid != window or any(shift):
        configured = getattr(model, "_ref_window_sizes", None)  # timm's per-stage windows, before clamping
        stage_windows = configured or [stage.blocks[0].window_size for stage in model.layers]
        raise ConfigError(_several_windows(grid, window, shift, stage_windows))
    if query == "cls":
        raise ConfigError("Swin has no class token; attach it with query='mean' (the default 'auto' does)")


def attach(model: nn.Module, layout: BlockLayout, query: str) -> nn.Module:
    query = "mean" if query == "auto" else query
    _check(model, query)
    blocks = model.layers[-1].blocks
    return install(model, blocks, SwinSARBlock(blocks[-1], layout, query), forward_with_similarity)


def detach(model: nn.Module) -> nn.Module:
    return uninstall(model, model.layers[-1].blocks)


def forward_with_similarity(self: nn.Module, x: torch.Tensor, similarity: str | None = "dot",
                            tokens: bool = False):
    """``(B, 3, H, W) -> (logits, S)``, ``S`` float32 ``(B, heads, h, w)`` on the last stage's grid.

    Mirrors ``SwinTransformer.forward_features`` + ``forward_head``; the logits equal
    ``model(x)``. ``similarity`` and ``tokens`` as in :func:`sarvit.surgery.vit.forward_with_similarity`
    (``tokens``: the last block's output ``(B, h, w, C)``, before the final norm).
    """
    from timm.models._manipulate import checkpoint_seq

    x = self.patch_embed(x)  # (B, H0, W0, C0)
    x = self.layers[:-1](x)
    stage = self.layers[-1]
    x = stage.downsample(x)  # (B, h, w, C)
    body = stage.blocks[:-1]
    if stage.grad_checkpointing and not torch.jit.is_scripting():
        x = checkpoint_seq(body, x)
    else:
        x = body(x)
    S = None
    if similarity is None:
        x = stage.blocks[-1](x)
    else:
        x, S = stage.blocks[-1].forward_with_similarity(x, similarity)  # S: (B, heads, h*w)
        S = S.unflatten(-1, tuple(x.shape[1:3]))  # (B, heads, h, w)
    patches = x if tokens else None  # (B, h, w, C)
    logits = self.forward_head(self.norm(x))
    return (logits, S, patches) if tokens else (logits, S)
