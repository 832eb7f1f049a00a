"""The two names the demo uses, kept as thin wrappers over :mod:`.maps` and :mod:`.figures`."""

from __future__ import annotations

from pathlib import Path

import torch

from ..entropy import spatial_entropy
from .figures import ModelMaps, plot_attention_figure
from .maps import attention_maps, mass_mask, similarity_components

__all__ = ["cls_attention_maps", "plot_attention_grid"]


def cls_attention_maps(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``images (B, 3, H, W)`` -> ``(attn, S)``, both ``(B, heads, h, w)`` float32: the
    post-softmax [CLS] attention over the patches and the pre-softmax similarity (Eq. 4);
    see :func:`.maps.attention_maps`."""
    maps = attention_maps(model, images)
    return maps.attn, maps.S


def plot_attention_grid(
    images: torch.Tensor,
    maps: dict[str, tuple[torch.Tensor, torch.Tensor]],
    path: str | Path,
    captions: list[str] | None = None,
) -> Path:
    """The figure of :func:`.figures.plot_attention_figure` for ``images (B, 3, H, W)`` in
    [0, 1] and ``maps``: model name -> ``(attn, S)`` from :func:`cls_attention_maps`."""
    groups = [
        ModelMaps(name, attn.cpu().numpy(), mass_mask(attn).cpu().numpy(), similarity_components(S).cpu().numpy(),
                  spatial_entropy(S).cpu().numpy())
        for name, (attn, S) in maps.items()
    ]
    display = images.permute(0, 2, 3, 1).clamp(0, 1).cpu().numpy()  # (B, H, W, 3)
    plot_attention_figure(display, groups, path, captions)
    return Path(path)
