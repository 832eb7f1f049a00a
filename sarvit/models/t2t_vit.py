"""T2T-ViT (Yuan et al., "Tokens-to-Token ViT: Training Vision Transformers from Scratch on
ImageNet", ICCV 2021), registered with timm as ``t2t_vit_14`` and ``t2t_vit_t_14``.

The Tokens-to-Token module replaces ViT's patch embedding. Three soft splits (``nn.Unfold``:
kernel 7 stride 4 padding 2, then kernel 3 stride 2 padding 1 twice) each gather the
overlapping neighbourhood of every token into one longer token; between them a one-head
token transformer (a Performer in ``t2t_vit_14``, a standard transformer block in
``t2t_vit_t_14``) maps the tokens to ``token_dim`` channels, and the tokens are put back on
their image grid (the paper's "re-structurization"). A linear projection gives the tokens of
the backbone: at 224 px a 14 x 14 grid (stride 16), plus a [CLS] token, a fixed sinusoidal
position embedding, 14 timm ``Block``s of width 384 (6 heads, MLP ratio 3, no qkv bias), a
final LayerNorm and a linear head on the [CLS] token. 21.5 M parameters.

Facts of the published code (github.com/yitu-opensource/T2T-ViT) that the paper does not
state, kept here because they produced the published numbers:

- the token blocks have no residual around their attention; the attention's own value
  tokens ``v`` (already ``token_dim`` wide) are the skip: ``z = v + Proj(Att(LN1(x)))``,
  then ``z + MLP(LN2(z))`` with an MLP of ratio 1;
- the transformer token block scales ``q . k`` by ``dim ** -0.5`` with ``dim`` the width
  of its INPUT tokens (147 or 576), not ``token_dim``;
- the Performer has ``m = token_dim / 2`` positive random features
  ``phi(x) = exp(w x - |x|^2 / 2) / sqrt(m)`` (no ``1/sqrt(d)`` temperature), with ``w``
  random orthogonal rows scaled by ``sqrt(m)``, drawn once at construction (a buffer: it
  is saved with the weights), and dropout 0.1 after its projection and its MLP;
- the position embedding is the 1-D sinusoid of Vaswani et al. over the ``1 + h*w``
  positions of the flattened sequence, [CLS] first; it is not trained.

The module names are the published ones (``tokens_to_token.attention1.kqv``, ``blocks.0.
attn.qkv``, ...), so the state dicts share their keys (the published ImageNet weights were
trained with ``q . k`` scaled by ``384 ** -0.5`` in the 14 blocks, not by the head width's
``64 ** -0.5`` that timm's ``Block`` uses: they load, but compute another function). ``patch_embed`` names the
tokens-to-token module too (``patch_size``, ``grid_size``, ``img_size``), for code written
for timm's ViT.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Mlp, resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._manipulate import checkpoint_seq
from timm.models.vision_transformer import Block
from torch import nn

from ..errors import ConfigError

__all__ = ["T2TViT", "TokensToToken", "TokenPerformer", "TokenTransformer", "sinusoid_table", "t2t_grid"]

# (kernel, stride, padding) of the three soft splits
SOFT_SPLITS = ((7, 4, 2), (3, 2, 1), (3, 2, 1))
TOKEN_BLOCKS = ("performer", "transformer")


def sinusoid_table(positions: int, dim: int) -> torch.Tensor:
    """The fixed position embedding, ``(positions, dim)`` float32:
    ``PE[p, 2i] = sin(p / 10000^(2i/dim))``, ``PE[p, 2i+1] = cos(p / 10000^(2i/dim))``."""
    channel = torch.arange(dim)
    rate = 10000.0 ** (-(channel // 2 * 2).double() / dim)  # (dim,)
    angle = torch.arange(positions, dtype=torch.float64)[:, None] * rate  # (positions, dim)
    return torch.where(channel % 2 == 0, angle.sin(), angle.cos()).float()


def _split_size(size: tuple[int, int], kernel: int, stride: int, padding: int) -> tuple[int, int]:
    """The grid ``nn.Unfold(kernel, stride=stride, padding=padding)`` makes of an ``(h, w)`` grid."""
    return tuple((s + 2 * padding - kernel) // stride + 1 for s in size)


def t2t_grid(img_size: tuple[int, int]) -> tuple[int, int]:
    """The token grid of an ``(H, W)`` image after the three soft splits: ``(H/16, W/16)``
    for multiples of 16, e.g. ``(14, 14)`` at 224."""
    for split in SOFT_SPLITS:
        img_size = _split_size(img_size, *split)
    return img_size


def _full_precision(device: torch.device):
    """A context with autocast off on ``device`` (a no-op where autocast does not exist, e.g. meta)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


class TokenPerformer(nn.Module):
    """One-head Performer token block: ``(B, T, dim) -> (B, T, token_dim)``.

    ``q, k, v = LN1(x) W`` (each ``token_dim`` wide); the softmax kernel ``exp(q . k)`` is
    replaced by ``phi(q) . phi(k)`` (FAVOR+), so the attention costs ``O(T m)``, not
    ``O(T^2)``; ``z = v + Proj(Att)``, output ``z + MLP(LN2(z))``.
    """

    def __init__(self, dim: int, token_dim: int, kernel_ratio: float = 0.5, drop: float = 0.0) -> None:
        super().__init__()
        self.emb = token_dim
        self.kqv = nn.Linear(dim, 3 * token_dim)
        self.dp = nn.Dropout(drop)
        self.proj = nn.Linear(token_dim, token_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(token_dim)
        self.epsilon = 1e-8
        self.mlp = nn.Sequential(nn.Linear(token_dim, token_dim), nn.GELU(), nn.Linear(token_dim, token_dim),
                                 nn.Dropout(drop))
        self.m = int(token_dim * kernel_ratio)
        w = nn.init.orthogonal_(torch.empty(self.m, token_dim)) * math.sqrt(self.m)  # (m, token_dim)
        self.register_buffer("w", w)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Positive random features ``(B, T, d) -> (B, T, m)``, float32:
        ``exp(w x - |x|^2 / 2) / sqrt(m)``."""
        x = x.float()
        wx = x @ self.w.float().T  # (B, T, m)
        return torch.exp(wx - x.square().sum(dim=-1, keepdim=True) / 2) / math.sqrt(self.m)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, dim) -> (B, T, token_dim)``: ``v + Proj(D^-1 phi(q) (phi(k)^T v))``."""
        k, q, v = self.kqv(x).split(self.emb, dim=-1)  # each (B, T, token_dim); the published order
        with _full_precision(x.device):  # phi reaches exp(m / 2): beyond fp16
            kp, qp = self.features(k), self.features(q)  # (B, T, m)
            kv = kp.transpose(1, 2) @ v.float()  # (B, m, token_dim)
            norm = qp @ kp.sum(dim=1).unsqueeze(-1)  # (B, T, 1)
            y = (qp @ kv) / (norm + self.epsilon)  # (B, T, token_dim)
        return v + self.dp(self.proj(y.to(v.dtype)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attend(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TokenAttention(nn.Module):
    """One-head softmax attention from ``dim`` to ``token_dim`` channels, with the value
    tokens as its skip: ``(B, T, dim) -> (B, T, token_dim)``."""

    def __init__(self, dim: int, token_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.token_dim = token_dim
        self.scale = dim ** -0.5  # the input width, as in the published code
        self.qkv = nn.Linear(dim, 3 * token_dim, bias=False)
        self.proj = nn.Linear(token_dim, token_dim)
        self.proj_drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unsqueeze(1).split(self.token_dim, dim=-1)  # each (B, 1, T, token_dim)
        a = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (B, 1, T, token_dim)
        return (v + self.proj_drop(self.proj(a))).squeeze(1)  # (B, T, token_dim)


class TokenTransformer(nn.Module):
    """One-head transformer token block: ``(B, T, dim) -> (B, T, token_dim)``,
    ``z = v + Proj(Att(LN1(x)))``, output ``z + MLP(LN2(z))``."""

    def __init__(self, dim: int, token_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TokenAttention(dim, token_dim, drop)
        self.norm2 = nn.LayerNorm(token_dim)
        self.mlp = Mlp(token_dim, token_dim, token_dim, drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _as_image(tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Re-structurization: ``(B, h*w, C)`` tokens in row-major order -> ``(B, C, h, w)``."""
    return tokens.transpose(1, 2).unflatten(2, size)  # (B, C, h, w)


class TokensToToken(nn.Module):
    """The T2T module: ``(B, in_chans, H, W) -> (B, h*w, embed_dim)``, ``(h, w) = t2t_grid((H, W))``."""

    def __init__(self, img_size: tuple[int, int], in_chans: int, embed_dim: int, token_dim: int,
                 token_block: str, drop: float = 0.0) -> None:
        super().__init__()
        block = TokenPerformer if token_block == "performer" else TokenTransformer
        (k0, s0, p0), (k1, s1, p1), (k2, s2, p2) = SOFT_SPLITS
        self.soft_split0 = nn.Unfold(kernel_size=k0, stride=s0, padding=p0)
        self.soft_split1 = nn.Unfold(kernel_size=k1, stride=s1, padding=p1)
        self.soft_split2 = nn.Unfold(kernel_size=k2, stride=s2, padding=p2)
        self.attention1 = block(in_chans * k0 * k0, token_dim, drop=drop)
        self.attention2 = block(token_dim * k1 * k1, token_dim, drop=drop)
        self.project = nn.Linear(token_dim * k2 * k2, embed_dim)
        self.patch_size = (s0 * s1 * s2,) * 2  # the stride of the token grid, in pixels
        self.set_img_size(img_size)

    def set_img_size(self, img_size: tuple[int, int]) -> None:
        self.img_size = tuple(img_size)
        self.grid_size = t2t_grid(self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = tuple(x.shape[-2:])
        splits = (self.soft_split0, self.soft_split1, self.soft_split2)
        for split, attention in zip(splits, (self.attention1, self.attention2, None)):
            size = _split_size(size, split.kernel_size, split.stride, split.padding)
            x = split(x).transpose(1, 2)  # soft split: (B, h*w, C * k * k)
            if attention is not None:
                x = _as_image(attention(x), size)  # (B, token_dim, h, w)
        return self.project(x)  # (B, h*w, embed_dim)


class T2TViT(nn.Module):
    """T2T-ViT: ``(B, in_chans, H, W) -> (B, num_classes)``; see the module docstring.

    Args:
        img_size: the input size the position embedding is made for (int or ``(H, W)``).
        token_block: ``"performer"`` (T2T-ViT) or ``"transformer"`` (T2T-ViT_t).
        token_dim: channels of the tokens inside the T2T module.
        token_drop_rate: dropout inside the token blocks (0.1 in the published Performer).
        drop_rate, attn_drop_rate, drop_path_rate: dropout of the backbone's tokens and
            blocks; the drop-path rate grows linearly over the blocks to ``drop_path_rate``.
    """

    def __init__(
        self, img_size: int | tuple[int, int] = 224, in_chans: int = 3, num_classes: int = 1000,
        embed_dim: int = 384, depth: int = 14, num_heads: int = 6, mlp_ratio: float = 3.0,
        qkv_bias: bool = False, token_block: str = "performer", token_dim: int = 64,
        token_drop_rate: float = 0.0, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        img_size = to_2tuple(img_size)
        _check_arguments(img_size, in_chans, num_classes, embed_dim, depth, num_heads, mlp_ratio, token_block,
                         token_dim, {"token_drop_rate": token_drop_rate, "drop_rate": drop_rate,
                                     "attn_drop_rate": attn_drop_rate, "drop_path_rate": drop_path_rate})
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.global_pool = "token"
        self.grad_checkpointing = False
        self.tokens_to_token = TokensToToken(img_size, in_chans, embed_dim, token_dim, token_block, token_drop_rate)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        positions = 1 + self.tokens_to_token.num_patches
        self.register_buffer("pos_embed", sinusoid_table(positions, embed_dim).unsqueeze(0))  # (1, 1 + h*w, C)
        self.pos_drop = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.Sequential(*(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, proj_drop=drop_rate, attn_drop=attn_drop_rate,
                  drop_path=rate, norm_layer=nn.LayerNorm)
            for rate in rates
        ))
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    @property
    def patch_embed(self) -> TokensToToken:
        """The tokens-to-token module, under the name timm's ViT code looks for."""
        return self.tokens_to_token

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"cls_token"}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, "token"):
            raise ConfigError(f"T2T-ViT pools its [CLS] token; global_pool {global_pool!r} is not supported")
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def set_input_size(self, img_size: int | tuple[int, int]) -> None:
        """Take ``img_size`` inputs from now on: the patch part of the position embedding is
        resampled (bicubic) from the old grid to the new one, as for a trained model."""
        old = self.tokens_to_token.grid_size
        self.tokens_to_token.set_img_size(to_2tuple(img_size))
        new = self.tokens_to_token.grid_size
        if new != old:
            self.pos_embed = resample_abs_pos_embed(self.pos_embed, list(new), list(old), num_prefix_tokens=1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W) -> (B, 1 + h*w, C)``: the tokens entering the blocks."""
        grid = t2t_grid(tuple(x.shape[-2:]))
        if grid != self.tokens_to_token.grid_size:
            raise ValueError(
                f"a {x.shape[-2]}x{x.shape[-1]} input gives a {grid[0]}x{grid[1]} token grid, but the position "
                f"embedding is made for {self.tokens_to_token.grid_size[0]}x{self.tokens_to_token.grid_size[1]} "
                f"({self.tokens_to_token.img_size[0]}x{self.tokens_to_token.img_size[1]} inputs); create the model "
                "with this img_size or call model.set_input_size(img_size)"
            )
        x = self.tokens_to_token(x)  # (B, h*w, C)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + h*w, C)
        return self.pos_drop(x + self.pos_embed)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W) -> (B, 1 + h*w, C)``, after the final norm."""
        x = self.embed(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``(B, 1 + h*w, C) -> (B, num_classes)`` from the [CLS] token (``(B, C)`` with ``pre_logits``)."""
        x = x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _init_weights(module: nn.Module) -> None:
    """The published initialisation: truncated normal (std 0.02) linear weights, zero biases."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _check_arguments(img_size, in_chans, num_classes, embed_dim, depth, num_heads, mlp_ratio, token_block,
                     token_dim, rates) -> None:
    """Raise :class:`ConfigError` for arguments that cannot make a T2T-ViT."""
    positive = {"in_chans": in_chans, "embed_dim": embed_dim, "depth": depth, "num_heads": num_heads,
                "token_dim": token_dim}
    problems = [f"{name} must be a positive integer, got {value!r}" for name, value in positive.items()
                if not isinstance(value, int) or isinstance(value, bool) or value < 1]
    if not problems and embed_dim % num_heads:
        problems.append(f"embed_dim {embed_dim} must be a multiple of num_heads {num_heads}")
    if not isinstance(num_classes, int) or num_classes < 0:
        problems.append(f"num_classes must be an integer >= 0, got {num_classes!r}")
    if not (isinstance(mlp_ratio, (int, float)) and mlp_ratio > 0):
        problems.append(f"mlp_ratio must be a positive number, got {mlp_ratio!r}")
    if token_block not in TOKEN_BLOCKS:
        problems.append(f"token_block must be one of {', '.join(TOKEN_BLOCKS)}, got {token_block!r}")
    problems += [f"{name} must be in [0, 1), got {rate!r}" for name, rate in rates.items()
                 if not (isinstance(rate, (int, float)) and 0 <= rate < 1)]
    if not all(isinstance(s, int) and s >= 16 for s in img_size):
        problems.append(f"img_size must be at least 16 pixels a side, got {img_size!r}")
    if problems:
        raise ConfigError("T2T-ViT: " + "; ".join(problems))


def _cfg(first_conv: str) -> dict:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.9,
        "interpolation": "bicubic", "fixed_input_size": True, "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD, "first_conv": first_conv, "classifier": "head",
    }


default_cfgs = generate_default_cfgs({
    "t2t_vit_14": _cfg(first_conv="tokens_to_token.attention1.kqv"),
    "t2t_vit_t_14": _cfg(first_conv="tokens_to_token.attention1.attn.qkv"),
})

# the backbone of T2T-ViT-14 (Table 1 of the T2T-ViT paper)
_T2T_14 = dict(embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0, token_dim=64)


def _create(variant: str, pretrained: bool, defaults: dict, kwargs: dict) -> T2TViT:
    return build_model_with_cfg(T2TViT, variant, pretrained, **{**defaults, **kwargs})


@register_model
def t2t_vit_14(pretrained: bool = False, **kwargs) -> T2TViT:
    """T2T-ViT-14: Performer token blocks, 14 blocks of width 384; 21.5 M parameters."""
    return _create("t2t_vit_14", pretrained, dict(_T2T_14, token_block="performer", token_drop_rate=0.1), kwargs)


@register_model
def t2t_vit_t_14(pretrained: bool = False, **kwargs) -> T2TViT:
    """T2T-ViT_t-14: transformer token blocks, 14 blocks of width 384; 21.5 M parameters."""
    return _create("t2t_vit_t_14", pretrained, dict(_T2T_14, token_block="transformer"), kwargs)
