"""MoCo v3's contrastive loss (Chen, Xie and He 2021, Algorithm 1), the main task of
MoCo v3 + SAR (appendix C, Table 12).

For queries ``q`` (predictor outputs, ``(B, D)``) and keys ``k`` (momentum encoder,
``(B, D)``) of the same ``B`` images, both L2-normalised here:

    ctr(q, k) = 2 tau * mean_i [ -log( exp(q_i . k_i / tau) / sum_j exp(q_i . k_j / tau) ) ]

i.e. cross-entropy of the logits ``q k^T / tau`` against the diagonal, times ``2 tau``
(the published code's scaling, which makes the gradient scale independent of ``tau``).
The symmetric total over the two views is ``ctr(q1, k2) + ctr(q2, k1)``.

Under ``torch.distributed`` the keys of every rank are gathered (no gradient flows
through the gather: the keys come from the momentum encoder anyway), so each query is
contrasted with ``world * B`` keys, and the label of query ``i`` of rank ``r`` is
``r * B + i``. All ranks must hold batches of the same size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

__all__ = ["mocov3_contrastive_loss", "mocov3_loss", "MoCoV3Loss"]


@torch.no_grad()
def _gather_keys(k: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(B, D) -> ((world * B, D), rank)``: the keys of all ranks, in rank order; no gradient."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return k, 0
    parts = [torch.empty_like(k) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, k.contiguous())
    return torch.cat(parts), dist.get_rank()  # (world * B, D)


def mocov3_contrastive_loss(q: torch.Tensor, k: torch.Tensor, tau: float = 0.2) -> torch.Tensor:
    """``ctr(q, k)``: InfoNCE of ``q`` against the (gathered) keys, times ``2 tau``.

    Args:
        q: queries ``(B, D)``, with gradient.
        k: keys ``(B, D)`` of the same images in the same order (gradient not used).
        tau: the temperature, > 0 (0.2 for ViT in MoCo v3).

    Returns:
        A float32 scalar (computed in float32 whatever the input dtype).
    """
    if q.dim() != 2 or q.shape != k.shape:
        raise ValueError(f"queries and keys must both be (B, D); got {tuple(q.shape)} and {tuple(k.shape)}")
    if not tau > 0:
        raise ConfigError(f"the MoCo v3 temperature tau must be > 0 (0.2 for ViT), got {tau!r}")
    q = F.normalize(q.float(), dim=1)
    k, rank = _gather_keys(F.normalize(k.detach().float(), dim=1))  # (world * B, D)
    logits = q @ k.T / tau  # (B, world * B)
    labels = torch.arange(q.shape[0], device=q.device) + rank * q.shape[0]  # (B,)
    return F.cross_entropy(logits, labels) * (2 * tau)


def mocov3_loss(q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor,
                tau: float = 0.2) -> torch.Tensor:
    """The symmetric MoCo v3 loss ``ctr(q1, k2) + ctr(q2, k1)``; all inputs ``(B, D)``."""
    return mocov3_contrastive_loss(q1, k2, tau) + mocov3_contrastive_loss(q2, k1, tau)


class MoCoV3Loss(nn.Module):
    """:func:`mocov3_loss` with a fixed temperature: ``(q1, q2, k1, k2) -> ()``."""

    def __init__(self, tau: float = 0.2) -> None:
        super().__init__()
        if not tau > 0:
            raise ConfigError(f"the MoCo v3 temperature tau must be > 0 (0.2 for ViT), got {tau!r}")
        self.tau = tau

    def forward(self, q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor) -> torch.Tensor:
        return mocov3_loss(q1, q2, k1, k2, self.tau)

    def extra_repr(self) -> str:
        return f"tau={self.tau}"
