"""CvT: Convolutional vision Transformer (Wu et al., "CvT: Introducing Convolutions to Vision
Transformers", ICCV 2021), registered with timm as ``cvt_13``.

Three stages. Each stage starts with a convolutional token embedding (a strided convolution
on the 2-D map of the previous stage, then LayerNorm) and stacks transformer blocks whose
attention projects queries, keys and values with a convolutional projection: a depthwise
3x3 convolution and BatchNorm on the 2-D token map, then a linear layer. Keys and values
are projected with stride 2 (the key grid is half the token grid), queries with stride 1.
There is no position embedding. Only the last stage has a class token; it never goes
through a convolution: it is concatenated to the projected patch tokens.

CvT-13 at 224x224 (tokens per stage, heads, width):

    stage 1   conv 7x7 / 4, pad 2   56x56 tokens   1 head    64    1 block
    stage 2   conv 3x3 / 2, pad 1   28x28 tokens   3 heads  192    2 blocks
    stage 3   conv 3x3 / 2, pad 1   14x14 tokens   6 heads  384   10 blocks, [CLS]; keys on 7x7

20.0 M parameters. The classifier reads the final LayerNorm of the class token.

Facts taken from the published implementation (microsoft/CvT) where the paper is silent:
the MLP activation is QuickGELU (``x * sigmoid(1.702 x)``); the depthwise convolutions have
no bias; the q/k/v linear layers have a bias; the attention logits are scaled by
``dim ** -0.5`` (the stage width), not by the head width; stochastic depth is used only in
the last stage, growing linearly from 0 to ``drop_path_rate`` over its blocks.

``qkv_kernel`` and ``stride_kv`` set the convolutional projections of every stage (padding
``qkv_kernel // 2``; queries always stride 1); the paper's ablations vary ``stride_kv``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, QuickGELU, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from ..errors import ConfigError

__all__ = ["CvT", "CvTBlock", "ConvAttention", "ConvProjection", "ConvEmbed", "CvTStage"]


class ConvEmbed(nn.Module):
    """Convolutional token embedding: ``(B, C_in, H, W) -> (B, h*w, C), (h, w)``.

    A strided convolution (overlapping windows) followed by LayerNorm over the channels.
    """

    def __init__(self, in_chans: int, dim: int, kernel: int, stride: int, padding: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=kernel, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)  # (B, C, h, w)
        size = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), size  # (B, h*w, C)


class ConvProjection(nn.Module):
    """Depthwise convolution + BatchNorm on the token map: ``(B, C, h, w) -> (B, h'*w', C)``."""

    def __init__(self, dim: int, kernel: int, stride: int, padding: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size=kernel, stride=stride, padding=padding, groups=dim, bias=False)
        self.bn = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)).flatten(2).transpose(1, 2)  # (B, h'*w', C)


class ConvAttention(nn.Module):
    """Multi-head self-attention with convolutional projections (CvT Sec. 3.2).

    ``forward(x, size)`` maps ``(B, prefix + h*w, C) -> (B, prefix + h*w, C)``; the
    ``prefix`` tokens (the class token) skip the convolutions and are concatenated in
    front of the projected patch tokens. Keys and values lie on the grid that
    ``key_grid(size)`` gives (``stride_kv`` 2: half the token grid, rounded up).
    """

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = True, qkv_kernel: int = 3, stride_kv: int = 2,
                 num_prefix_tokens: int = 0, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        # CvT scales the logits by the stage width, dim ** -0.5, not by the head width
        # (head_dim ** -0.5) as ViT does; the published models were trained that way.
        self.scale = dim ** -0.5
        self.num_prefix_tokens = num_prefix_tokens
        padding = qkv_kernel // 2
        self.conv_proj_q = ConvProjection(dim, qkv_kernel, 1, padding)
        self.conv_proj_k = ConvProjection(dim, qkv_kernel, stride_kv, padding)
        self.conv_proj_v = ConvProjection(dim, qkv_kernel, stride_kv, padding)
        self.proj_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def key_grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """The ``(h', w')`` grid of the keys for a ``size = (h, w)`` token grid."""
        conv = self.conv_proj_k.conv
        return tuple(  # type: ignore[return-value]
            (n + 2 * p - k) // s + 1 for n, p, k, s in zip(size, conv.padding, conv.kernel_size, conv.stride)
        )

    def qkv(self, x: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(B, prefix + h*w, C)`` -> ``q (B, heads, prefix + h*w, d)``, ``k, v (B, heads, prefix + h'*w', d)``."""
        p = self.num_prefix_tokens
        prefix, patches = x[:, :p], x[:, p:]
        grid = patches.transpose(1, 2).unflatten(2, size)  # (B, C, h, w)
        out = []
        for conv, linear in ((self.conv_proj_q, self.proj_q), (self.conv_proj_k, self.proj_k),
                             (self.conv_proj_v, self.proj_v)):
            t = linear(torch.cat([prefix, conv(grid)], dim=1))  # (B, prefix + n, C)
            out.append(t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2))  # (B, heads, prefix + n, d)
        return out[0], out[1], out[2]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T * scale) v, fused, then the output projection: ``(B, heads, N, d) -> (B, N, C)``."""
        drop = self.attn_drop.p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, scale=self.scale)  # (B, heads, N, d)
        out = out.transpose(1, 2).flatten(2)  # (B, N, heads * d)
        return self.proj_drop(self.proj(out))

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.attend(*self.qkv(x, size))


class CvTBlock(nn.Module):
    """Pre-norm transformer block with convolutional attention:
    ``z' = z + MSA(LN1(z))``, ``z = z' + MLP(LN2(z'))`` on ``(B, prefix + h*w, C)``.

    The submodule names are timm's ``Block`` (``norm1, attn, ls1, drop_path1, norm2, mlp,
    ls2, drop_path2``); CvT has no LayerScale, so ``ls1``/``ls2`` are identities.
    """

    def __init__(self, dim: int, num_heads: int, *, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 num_prefix_tokens: int = 0, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 **conv_kwargs) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ConvAttention(dim, num_heads, qkv_bias=qkv_bias, num_prefix_tokens=num_prefix_tokens,
                                  attn_drop=attn_drop, proj_drop=drop, **conv_kwargs)
        self.ls1 = nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=QuickGELU, drop=drop)
        self.ls2 = nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), size)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class CvTStage(nn.Module):
    """A convolutional token embedding, an optional class token, and one transformer block
    per entry of ``drop_path`` (its stochastic-depth rate).

    ``tokens(x)``: ``(B, C_in, H, W) -> (B, prefix + h*w, C), (h, w)``, the embedded tokens
    with the class token in front; ``forward(x)``: ``(B, C_in, H, W) -> (B, C, h, w)``, the
    patch tokens after the blocks, as a map (the class token, if any, is dropped).
    """

    def __init__(self, in_chans: int, dim: int, num_heads: int, *, kernel: int, stride: int, padding: int,
                 cls_token: bool, drop_path: Sequence[float], **block_kwargs) -> None:
        super().__init__()
        self.patch_embed = ConvEmbed(in_chans, dim, kernel, stride, padding)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None
        self.num_prefix_tokens = int(cls_token)
        self.blocks = nn.ModuleList(
            CvTBlock(dim, num_heads, num_prefix_tokens=self.num_prefix_tokens, drop_path=dp, **block_kwargs)
            for dp in drop_path
        )

    def tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x, size = self.patch_embed(x)  # (B, h*w, C)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + h*w, C)
        return x, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, size = self.tokens(x)
        for block in self.blocks:
            x = block(x, size)
        return x[:, self.num_prefix_tokens:].transpose(1, 2).unflatten(2, size)  # (B, C, h, w)


class CvT(nn.Module):
    """Convolutional vision Transformer; ``forward: (B, in_chans, H, W) -> (B, num_classes)``.

    The per-stage arguments are sequences with one entry per stage. ``drop_path_rate`` is
    the stochastic-depth rate of the last block, reached linearly over the last stage (the
    earlier stages have none, as in CvT-13's published configuration). No part of the
    network depends on ``img_size`` (there is no position embedding): any input of at
    least ``kernels[0] - 2 * paddings[0]`` pixels a side runs; sides that are multiples of
    ``patch_size`` (the product of the strides, 16) give exact grids (224: 56, 28, 14).
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, in_chans: int = 3, num_classes: int = 1000,
                 global_pool: str = "token", dims: Sequence[int] = (64, 192, 384), depths: Sequence[int] = (1, 2, 10),
                 num_heads: Sequence[int] = (1, 3, 6), kernels: Sequence[int] = (7, 3, 3),
                 strides: Sequence[int] = (4, 2, 2), paddings: Sequence[int] = (2, 1, 1), mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, qkv_kernel: int = 3, stride_kv: int = 2, cls_token: bool = True,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        _check_args(img_size, in_chans, num_classes, global_pool, dims, depths, num_heads, kernels, strides, paddings,
                    mlp_ratio, (qkv_kernel, stride_kv), cls_token, drop_rate, attn_drop_rate,
                    drop_path_rate)
        self.img_size = _pair(img_size)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.embed_dim = dims[-1]
        self.num_prefix_tokens = int(cls_token)
        # pixels per token of the last stage (224 -> 14x14 tokens): sizes it divides give exact grids
        self.patch_size = math.prod(strides)
        stages = []
        for i, (dim, depth, heads) in enumerate(zip(dims, depths, num_heads)):
            last = i == len(dims) - 1
            rates = [drop_path_rate * j / max(depth - 1, 1) if last else 0.0 for j in range(depth)]  # linspace
            stages.append(CvTStage(in_chans if i == 0 else dims[i - 1], dim, heads, kernel=kernels[i],
                                   stride=strides[i], padding=paddings[i], cls_token=cls_token and last,
                                   drop_path=rates, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate,
                                   attn_drop=attn_drop_rate, qkv_kernel=qkv_kernel, stride_kv=stride_kv))
        self.stages = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(dims[-1])
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)
        if cls_token:
            trunc_normal_(self.stages[-1].cls_token, std=0.02)

    @property
    def cls_token(self) -> nn.Parameter | None:
        """The class token of the last stage (``None`` without one)."""
        return self.stages[-1].cls_token

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {f"stages.{len(self.stages) - 1}.cls_token"} if self.num_prefix_tokens else set()

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            _check_pool(global_pool, bool(self.num_prefix_tokens))
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def set_input_size(self, img_size: int | tuple[int, int] | None = None, **_) -> None:
        """Record the nominal input size; nothing else depends on it (no position embedding)."""
        if img_size is not None:
            self.img_size = _pair(img_size)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W) -> (B, prefix + h*w, C)``: the last stage's tokens, normalised."""
        for stage in self.stages[:-1]:
            x = stage(x)  # (B, C_i, h_i, w_i)
        last = self.stages[-1]
        x, size = last.tokens(x)  # (B, prefix + h*w, C)
        for block in last.blocks:
            x = block(x, size)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``(B, prefix + h*w, C) -> (B, num_classes)``: the class token, or the mean patch token."""
        x = x[:, 0] if self.global_pool == "token" else x[:, self.num_prefix_tokens:].mean(dim=1)  # (B, C)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _init_weights(m: nn.Module) -> None:
    """CvT's ``trunc_norm`` initialisation: linear weights N(0, 0.02) truncated, zero biases,
    norms at identity; convolutions keep PyTorch's default."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _check_pool(global_pool: str, cls_token: bool) -> None:
    if global_pool not in ("token", "avg"):
        raise ConfigError(f"CvT global_pool must be 'token' (the class token) or 'avg'; got {global_pool!r}")
    if global_pool == "token" and not cls_token:
        raise ConfigError("CvT global_pool='token' needs a class token; use cls_token=True or global_pool='avg'")


def _check_args(img_size, in_chans, num_classes, global_pool, dims, depths, num_heads, kernels, strides, paddings,
                mlp_ratio, projection, cls_token, drop_rate, attn_drop_rate, drop_path_rate) -> None:
    """Raise :class:`ConfigError` for arguments CvT cannot be built with."""
    stages = len(dims)
    for name, values in (("depths", depths), ("num_heads", num_heads), ("kernels", kernels), ("strides", strides),
                         ("paddings", paddings)):
        if len(values) != stages:
            raise ConfigError(f"CvT {name} needs one entry per stage ({stages}, as dims); got {list(values)}")
    positive = {"dims": dims, "depths": depths, "num_heads": num_heads, "kernels": kernels, "strides": strides}
    for name, values in positive.items():
        if any(int(v) != v or v < 1 for v in values):
            raise ConfigError(f"CvT {name} must be positive integers; got {list(values)}")
    qkv_kernel, stride_kv = projection
    if any(int(v) != v or v < 1 for v in projection) or qkv_kernel % 2 == 0:
        raise ConfigError(f"CvT qkv_kernel must be an odd positive integer and stride_kv a positive integer; "
                          f"got {qkv_kernel} and {stride_kv}")
    if any(int(p) != p or p < 0 for p in paddings):
        raise ConfigError(f"CvT paddings must be non-negative integers; got {list(paddings)}")
    bad = [(d, h) for d, h in zip(dims, num_heads) if d % h]
    if bad:
        raise ConfigError(f"CvT dims must be multiples of num_heads; {bad[0][0]} is not a multiple of {bad[0][1]}")
    side = min(_pair(img_size))
    if side < kernels[0] - 2 * paddings[0] or side < 1:
        raise ConfigError(f"CvT img_size {img_size} is too small: the first convolution needs at least "
                          f"{max(kernels[0] - 2 * paddings[0], 1)} pixels a side")
    if in_chans < 1 or num_classes < 0:
        raise ConfigError(f"CvT needs in_chans >= 1 and num_classes >= 0; got {in_chans} and {num_classes}")
    if mlp_ratio <= 0:
        raise ConfigError(f"CvT mlp_ratio must be positive; got {mlp_ratio}")
    for name, rate in (("drop_rate", drop_rate), ("attn_drop_rate", attn_drop_rate),
                       ("drop_path_rate", drop_path_rate)):
        if not 0 <= rate < 1:
            raise ConfigError(f"CvT {name} must be in [0, 1); got {rate}")
    _check_pool(global_pool, cls_token)


def _cfg(**kwargs) -> dict:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.875,
        "interpolation": "bicubic", "fixed_input_size": False, "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD, "first_conv": "stages.0.patch_embed.proj", "classifier": "head",
        "paper_ids": "arXiv:2103.15808", "paper_name": "CvT: Introducing Convolutions to Vision Transformers",
        "origin_url": "https://github.com/microsoft/CvT", "license": "mit", **kwargs,
    }


default_cfgs = generate_default_cfgs({"cvt_13": _cfg()})


def _create_cvt(variant: str, pretrained: bool = False, **kwargs) -> CvT:
    if kwargs.get("features_only"):
        raise ConfigError(f"{variant} does not support features_only")
    return build_model_with_cfg(CvT, variant, pretrained, **kwargs)


@register_model
def cvt_13(pretrained: bool = False, **kwargs) -> CvT:
    """CvT-13 (20.0 M parameters): dims 64/192/384, depths 1/2/10, heads 1/3/6."""
    args = dict(dims=(64, 192, 384), depths=(1, 2, 10), num_heads=(1, 3, 6), kernels=(7, 3, 3), strides=(4, 2, 2),
                paddings=(2, 1, 1))
    return _create_cvt("cvt_13", pretrained=pretrained, **dict(args, **kwargs))
