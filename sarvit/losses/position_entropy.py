"""Shannon entropy of the thresholded similarity maps over positions: SE without space.

A control for the spatial entropy (Eq. 5-9): the same threshold, but every one of the
``h * w`` positions is its own "component", so the grid's adjacency plays no part. For
one map ``S`` of shape ``(h, w)``:

    B      = ReLU(S - mean(S))                       (Eq. 5, mean over the h*w entries)
    p_xy   = B_xy / sum B
    H(S)   = -sum_{xy : p_xy > 0} p_xy log p_xy

A map whose entries are all equal has ``B = 0``: its entropy is 0 and so is its
gradient. ``L_entropy`` is the mean over heads and batch, like ``L_se`` (Eq. 9).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["position_entropy", "PositionEntropyLoss"]


def position_entropy(S: torch.Tensor) -> torch.Tensor:
    """Entropy of every thresholded 2-D map of ``S`` as a distribution over its positions.

    Args:
        S: floating tensor ``(..., h, w)``; fp16/bf16 are promoted to float32.

    Returns:
        ``(...)``, in nats.
    """
    if not isinstance(S, torch.Tensor) or not S.is_floating_point():
        got = S.dtype if isinstance(S, torch.Tensor) else type(S).__name__
        raise TypeError(f"position_entropy expects a floating-point tensor, got {got}")
    if S.dim() < 2:
        raise ValueError(f"position_entropy expects maps of shape (..., h, w), got {tuple(S.shape)}")
    S = S.to(torch.promote_types(S.dtype, torch.float32))
    maps = S.flatten(-2)  # (..., h*w)
    B = torch.relu(maps - maps.mean(dim=-1, keepdim=True))  # (..., h*w), Eq. 5
    total = B.sum(dim=-1, keepdim=True)  # (..., 1)
    p = B / torch.where(total > 0, total, torch.ones_like(total))  # (..., h*w)
    # -p log p with 0 log 0 = 0; the inner `where` keeps the gradient finite at p = 0
    positive = p > 0
    terms = torch.where(positive, -p * torch.log(torch.where(positive, p, torch.ones_like(p))), 0.0)
    return terms.sum(dim=-1)  # (...)


class PositionEntropyLoss(nn.Module):
    """``L_entropy``: the mean position entropy over heads and batch; ``(B, H, h, w) -> ()``."""

    def forward(self, S: torch.Tensor) -> torch.Tensor:
        H = position_entropy(S)
        return H.mean() if H.numel() > 0 else H.sum()
