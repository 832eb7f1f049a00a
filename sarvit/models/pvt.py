"""PVT v1, the Pyramid Vision Transformer (Wang et al., ICCV 2021), registered with timm.

``timm.create_model("pvt_small")`` / ``"pvt_tiny"`` after ``import sarvit.models``.

Four stages of shrinking token grids (strides 4, 8, 16, 32: 56, 28, 14 and 7 tokens a
side at 224). Stage ``i``:

- a patch embedding: a convolution with kernel = stride (4 in stage 1, 2 after), then
  LayerNorm;
- learned position embeddings, resampled (bilinear, as PVT does) when the grid differs
  from the one they were made for; the [CLS] token joins the tokens in the last stage
  only, and its output feeds the head;
- pre-norm transformer blocks whose attention is spatial-reduction attention (SRA): the
  queries come from every token, the keys and values from the token map reduced by a
  convolution with kernel = stride = ``sr_ratio`` (then LayerNorm). With the published
  ratios 8, 4, 2, 1 the keys lie on the 7x7 grid in every stage at 224.

Parameter names follow timm's PVT v2 (``patch_embed``, ``stages.i.downsample``,
``stages.i.blocks.j``); :func:`checkpoint_filter_fn` maps the published PVT checkpoints
(``patch_embed1``, ``pos_embed1``, ``block1.0``, ...) onto them.
"""

from __future__ import annotations

import math
import re
from functools import partial

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models._builder import build_model_with_cfg
from timm.models._manipulate import checkpoint
from timm.models._registry import generate_default_cfgs, register_model
from torch import nn
from torch.nn import functional as F

from ..errors import ConfigError

__all__ = ["PyramidVisionTransformer", "checkpoint_filter_fn"]


class PatchEmbed(nn.Module):
    """Non-overlapping patches: ``(B, C_in, H, W) -> (B, H/p, W/p, C)``, a strided conv then LayerNorm."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = to_2tuple(patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))  # (B, h, w, C)


class Attention(nn.Module):
    """Spatial-reduction attention (SRA): keys and values from the map reduced ``sr_ratio`` times.

    ``forward(x, feat_size)``: ``x`` ``(B, prefix + H*W, C)``, the tokens of an ``H x W``
    grid (a reduction needs no prefix tokens) -> ``(B, prefix + H*W, C)``.
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 1, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.sr_ratio = sr_ratio
        self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio) if sr_ratio > 1 else None
        self.norm = nn.LayerNorm(dim) if sr_ratio > 1 else None

    def key_tokens(self, x: torch.Tensor, feat_size: tuple[int, int]) -> torch.Tensor:
        """The tokens the keys and values come from: ``(B, N, C)`` or, reduced, ``(B, H*W/R^2, C)``."""
        if self.sr is None:
            return x
        B, N, C = x.shape
        maps = x.transpose(1, 2).reshape(B, C, *feat_size)  # (B, C, H, W)
        return self.norm(self.sr(maps).flatten(2).transpose(1, 2))  # (B, H*W/R^2, C)

    def forward(self, x: torch.Tensor, feat_size: tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, N, d)
        kv = self.kv(self.key_tokens(x, feat_size))  # (B, n, 2C)
        k, v = kv.reshape(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, n, d)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, N, heads * d)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    """Pre-norm block: ``x + SRA(LN1(x))``, then ``x + MLP(LN2(x))``; ``(B, N, C) -> (B, N, C)``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, sr_ratio: int, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 norm_layer=nn.LayerNorm) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, sr_ratio, qkv_bias, attn_drop, proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, feat_size: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), feat_size))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class PyramidVisionTransformerStage(nn.Module):
    """A patch embedding (``downsample``; stage 1's is the model's ``patch_embed``), position
    embeddings for a ``grid`` of tokens (after ``num_prefix_tokens`` class tokens) and blocks."""

    def __init__(self, dim_in: int, dim: int, depth: int, grid: tuple[int, int], downsample: bool,
                 num_prefix_tokens: int, drop_path: list[float], pos_drop: float = 0.0, **block_kwargs) -> None:
        super().__init__()
        self.grid = grid
        self.num_prefix_tokens = num_prefix_tokens
        self.grad_checkpointing = False
        self.downsample = PatchEmbed(dim_in, dim, 2) if downsample else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_prefix_tokens + grid[0] * grid[1], dim))
        self.pos_drop = nn.Dropout(pos_drop)
        self.blocks = nn.ModuleList([Block(dim, drop_path=drop_path[j], **block_kwargs) for j in range(depth)])

    def embed(self, x: torch.Tensor, prefix: torch.Tensor | None = None):
        """``(B, C_in, H, W)`` maps (or, without ``downsample``, ``(B, h, w, C)`` patches) and
        the ``(1, P, C)`` prefix tokens -> ``(B, P + h*w, C)`` tokens with their position, and ``(h, w)``."""
        if self.downsample is not None:
            x = self.downsample(x)  # (B, h, w, C)
        B, h, w, C = x.shape
        x = x.reshape(B, h * w, C)  # (B, h*w, C)
        if prefix is not None:
            x = torch.cat([prefix.expand(B, -1, -1), x], dim=1)  # (B, P + h*w, C)
        return self.pos_drop(x + self.position_embedding((h, w))), (h, w)

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """``(1, P + h*w, C)``: the learned embeddings, bilinearly resampled to another grid."""
        if tuple(grid) == self.grid:
            return self.pos_embed
        return resample_abs_pos_embed(self.pos_embed, list(grid), list(self.grid), self.num_prefix_tokens,
                                      interpolation="bilinear", antialias=False)

    def run_blocks(self, x: torch.Tensor, grid: tuple[int, int], blocks=None) -> torch.Tensor:
        for block in self.blocks if blocks is None else blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, grid)
            else:
                x = block(x, grid)
        return x

    def forward(self, x: torch.Tensor, prefix: torch.Tensor | None = None):
        x, grid = self.embed(x, prefix)
        return self.run_blocks(x, grid), grid


class PyramidVisionTransformer(nn.Module):
    """PVT v1 for classification: ``(B, in_chans, H, W) -> (B, num_classes)``.

    ``H`` and ``W`` must be multiples of :attr:`input_step` (32 for the published models:
    the total stride times each stage's reduction ratio), so that no convolution drops a
    row or column of pixels or tokens.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dims: tuple[int, ...] = (64, 128, 320, 512),
        num_heads: tuple[int, ...] = (1, 2, 5, 8),
        mlp_ratios: tuple[float, ...] = (8, 8, 4, 4),
        depths: tuple[int, ...] = (3, 4, 6, 3),
        sr_ratios: tuple[int, ...] = (8, 4, 2, 1),
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    ) -> None:
        super().__init__()
        img_size = to_2tuple(img_size)
        _check_config(img_size, patch_size, embed_dims, num_heads, mlp_ratios, depths, sr_ratios, global_pool)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.img_size = tuple(img_size)
        self.num_prefix_tokens = 1
        self.input_step = input_step(patch_size, sr_ratios)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0], patch_size)
        n = sum(depths)
        rates = [drop_path_rate * j / max(n - 1, 1) for j in range(n)]  # stochastic depth, linear over all blocks
        stages, self.feature_info = [], []
        for i, depth in enumerate(depths):
            stride = patch_size * 2**i
            stages.append(PyramidVisionTransformerStage(
                dim_in=embed_dims[max(i - 1, 0)], dim=embed_dims[i], depth=depth,
                grid=(img_size[0] // stride, img_size[1] // stride), downsample=i > 0,
                num_prefix_tokens=1 if i == len(depths) - 1 else 0, drop_path=rates[sum(depths[:i]):][:depth],
                pos_drop=pos_drop_rate, num_heads=num_heads[i], mlp_ratio=mlp_ratios[i], sr_ratio=sr_ratios[i],
                qkv_bias=qkv_bias, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, norm_layer=norm_layer,
            ))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=stride, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims[-1]))
        self.norm = norm_layer(embed_dims[-1])
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        for stage in self.stages:
            trunc_normal_(stage.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"cls_token"}  # as published: the position embeddings are decayed

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^cls_token|^patch_embed|^stages\.0\.pos_embed",
                    blocks=r"^stages\.(\d+)" if coarse else [(r"^stages\.(\d+)\.blocks\.(\d+)", None),
                                                            (r"^stages\.(\d+)", (0,)), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, "token"):
            raise ConfigError(f"PVT pools with its class token (global_pool='token'); got {global_pool!r}")
        self.num_classes = num_classes
        device = self.cls_token.device
        self.head = nn.Linear(self.num_features, num_classes, device=device) if num_classes > 0 else nn.Identity()

    def set_input_size(self, img_size: int | tuple[int, int]) -> None:
        """Make ``img_size`` the native resolution: resample every stage's position embeddings to it."""
        img_size = to_2tuple(img_size)
        _check_multiple(img_size, self.input_step, "img_size")
        stride = self.patch_embed.patch_size[0]
        for stage in self.stages:
            grid = (img_size[0] // stride, img_size[1] // stride)
            stage.pos_embed = nn.Parameter(stage.position_embedding(grid).detach())
            stage.grid, stride = grid, stride * 2
        self.img_size = tuple(img_size)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """Check the input size and embed the patches: ``(B, C, H, W) -> (B, H/4, W/4, C1)``."""
        _check_multiple(tuple(x.shape[-2:]), self.input_step, "the input")
        return self.patch_embed(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, 1 + h*w, C4)``: the [CLS] and patch tokens after the final norm."""
        x = self.forward_stem(x)  # (B, h, w, C1)
        for stage in self.stages[:-1]:
            x, grid = stage(x)  # (B, h*w, C)
            x = x.transpose(1, 2).unflatten(2, grid)  # (B, C, h, w)
        x, _ = self.stages[-1](x, self.cls_token)  # (B, 1 + h*w, C4)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x[:, 0])  # (B, C4): the class token
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def input_step(patch_size: int, sr_ratios) -> int:
    """The input sizes that tile exactly: multiples of every stage's stride times its reduction."""
    strides = [patch_size * 2**i * r for i, r in enumerate(sr_ratios)] + [patch_size * 2 ** (len(sr_ratios) - 1)]
    return math.lcm(*strides)


def _check_multiple(size: tuple[int, int], step: int, what: str) -> None:
    if size[0] % step or size[1] % step:
        below = max(step, (min(size) // step) * step)
        raise ConfigError(f"{what} is {size[0]}x{size[1]}: PVT needs multiples of {step} (its total stride times "
                          f"the spatial-reduction ratios), else convolutions drop pixels; use e.g. {below}")


def _check_config(img_size, patch_size, embed_dims, num_heads, mlp_ratios, depths, sr_ratios, global_pool) -> None:
    lengths = [len(t) for t in (embed_dims, num_heads, mlp_ratios, depths, sr_ratios)]
    if len(set(lengths)) != 1 or lengths[0] == 0:
        raise ConfigError("PVT needs one value per stage in embed_dims, num_heads, mlp_ratios, depths and "
                          f"sr_ratios; got lengths {lengths}")
    if patch_size < 1 or min(depths) < 1 or min(sr_ratios) < 1 or min(mlp_ratios) <= 0:
        raise ConfigError(f"PVT needs patch_size, depths and sr_ratios >= 1 and mlp_ratios > 0; got patch_size "
                          f"{patch_size}, depths {depths}, sr_ratios {sr_ratios}, mlp_ratios {mlp_ratios}")
    bad = [(d, h) for d, h in zip(embed_dims, num_heads) if h < 1 or d % h]
    if bad:
        raise ConfigError(f"every embed_dim must be a multiple of its stage's num_heads; {bad} are not")
    if sr_ratios[-1] != 1:
        raise ConfigError(f"the last stage holds the class token, which a spatial reduction cannot take: "
                          f"sr_ratios[-1] must be 1, got {sr_ratios[-1]}")
    if global_pool != "token":
        raise ConfigError(f"PVT pools with its class token (global_pool='token'); got {global_pool!r}")
    _check_multiple(img_size, input_step(patch_size, sr_ratios), "img_size")


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


_PUBLISHED_KEYS = [
    (r"^patch_embed1\.", "patch_embed."),
    (r"^patch_embed(\d+)\.", lambda m: f"stages.{int(m[1]) - 1}.downsample."),
    (r"^pos_embed(\d+)$", lambda m: f"stages.{int(m[1]) - 1}.pos_embed"),
    (r"^block(\d+)\.", lambda m: f"stages.{int(m[1]) - 1}.blocks."),
]


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """The published PVT v1 checkpoints (``{"model": ...}``, keys ``block1.0.attn.q.weight``,
    ``patch_embed2.proj.weight``, ``pos_embed4``, ...) in this module's names."""
    state_dict = state_dict.get("model", state_dict)
    if "patch_embed.proj.weight" in state_dict:
        return state_dict
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in _PUBLISHED_KEYS:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def _create_pvt(variant: str, pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    return build_model_with_cfg(PyramidVisionTransformer, variant, pretrained,
                                pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


def _cfg(**kwargs) -> dict:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.875,
        "interpolation": "bicubic", "fixed_input_size": True, "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD, "first_conv": "patch_embed.proj", "classifier": "head",
        "license": "apache-2.0", "paper_ids": "arXiv:2102.12122",
        "paper_name": "Pyramid Vision Transformer: A Versatile Backbone for Dense Prediction without Convolutions",
        "origin_url": "https://github.com/whai362/PVT/tree/v1", **kwargs,
    }


default_cfgs = generate_default_cfgs({"pvt_tiny": _cfg(), "pvt_small": _cfg()})

_PVT_V1 = dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4), sr_ratios=(8, 4, 2, 1))


@register_model
def pvt_tiny(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    """PVT-Tiny: depths 2/2/2/2, 13.2 M parameters."""
    return _create_pvt("pvt_tiny", pretrained, **{**_PVT_V1, "depths": (2, 2, 2, 2), **kwargs})


@register_model
def pvt_small(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    """PVT-Small: depths 3/4/6/3, 24.5 M parameters."""
    return _create_pvt("pvt_small", pretrained, **{**_PVT_V1, "depths": (3, 4, 6, 3), **kwargs})
