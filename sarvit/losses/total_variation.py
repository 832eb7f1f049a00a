"""Total variation of the similarity maps (appendix B, Eq. 14).

For the maps ``S^h`` of shape ``(k, k)`` of the H heads:

    L_tv = 1/H sum_h sum_{x,y} |S^h_{x,y} - S^h_{x,y+1}| + |S^h_{x,y} - S^h_{x+1,y}|

with the differences taken between grid neighbours only (no wrap-around). Averaged
over the batch like ``L_se`` (Eq. 9). Rectangular grids are allowed.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["total_variation", "TotalVariationLoss"]


def total_variation(S: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation of every 2-D map of ``S``.

    Args:
        S: floating tensor ``(..., h, w)``; fp16/bf16 are promoted to float32.

    Returns:
        ``(...)``: the sum of absolute differences between horizontal and vertical
        neighbours of each map.
    """
    if not isinstance(S, torch.Tensor) or not S.is_floating_point():
        got = S.dtype if isinstance(S, torch.Tensor) else type(S).__name__
        raise TypeError(f"total_variation expects a floating-point tensor, got {got}")
    if S.dim() < 2:
        raise ValueError(f"total_variation expects maps of shape (..., h, w), got {tuple(S.shape)}")
    S = S.to(torch.promote_types(S.dtype, torch.float32))
    across = (S[..., :, 1:] - S[..., :, :-1]).abs().sum(dim=(-2, -1))  # (...), |S[x,y] - S[x,y+1]|
    down = (S[..., 1:, :] - S[..., :-1, :]).abs().sum(dim=(-2, -1))  # (...), |S[x,y] - S[x+1,y]|
    return across + down


class TotalVariationLoss(nn.Module):
    """``L_tv`` of Eq. 14: the mean total variation over heads and batch; ``(B, H, h, w) -> ()``."""

    def forward(self, S: torch.Tensor) -> torch.Tensor:
        return total_variation(S).mean()
