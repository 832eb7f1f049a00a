"""Spatial entropy of similarity maps (Eq. 5-9) and the SAR loss.

For one map ``S`` of shape ``(h, w)``:

    B    = ReLU(S - mean(S))                    (Eq. 5, mean over the h*w entries)
    C    = 8-connected components of {B > 0}    (Eq. 6, no gradient)
    P_j  = sum_{C_j} B / sum B                  (Eq. 8, pooled as in Eq. 12-13)
    H(S) = -sum_j P_j log P_j                   (Eq. 7)

The components are computed under ``no_grad`` and only select which entries of ``B``
are pooled together, so the gradient flows through ``B`` (appendix A). A map whose
entries are all equal has no component: its entropy is 0 and so is its gradient.

Everything is vectorised over the maps: one labelling call for the whole stack, one
``scatter_add`` to pool the component masses. No Python loop over maps or components.
"""

from __future__ import annotations

import torch
from torch import nn

from .components import connected_components, max_components

__all__ = ["spatial_entropy", "SpatialEntropyLoss"]


def spatial_entropy(
    S: torch.Tensor,
    *,
    connectivity: int = 8,
    backend: str = "auto",
    return_num_components: bool = False,
):
    """Spatial entropy of every 2-D map of ``S``.

    Args:
        S: similarity maps, floating tensor of shape ``(..., h, w)`` (typically
            ``(B, heads, k, k)`` from Eq. 4). Any floating dtype: fp16 and bf16 inputs
            are promoted to float32 before anything is computed.
        connectivity: 8 (the paper) or 4.
        backend: labelling backend, see :func:`sarvit.connected_components`.
        return_num_components: also return the number of components of each map.

    Returns:
        ``H`` of shape ``(...)``, float32 (float64 for a float64 input), and with
        ``return_num_components`` also an int64 tensor of shape ``(...)``.

    Raises:
        ValueError: if ``S`` holds NaN or infinite values (detected through the map
            means, and read after the labelling has synchronised with the device
            anyway, so the check costs no extra host synchronisation).
    """
    if not isinstance(S, torch.Tensor) or not S.is_floating_point():
        got = S.dtype if isinstance(S, torch.Tensor) else type(S).__name__
        raise TypeError(f"spatial_entropy expects a floating-point tensor, got {got}")
    if S.dim() < 2:
        raise ValueError(f"spatial_entropy expects maps of shape (..., h, w), got {tuple(S.shape)}")
    lead, (h, w) = S.shape[:-2], S.shape[-2:]
    n = h * w
    dtype = torch.promote_types(S.dtype, torch.float32)
    S = S.to(dtype).reshape(-1, n)  # (M, n)
    mean = S.mean(dim=1, keepdim=True)  # (M, 1)
    all_finite = torch.isfinite(mean).all()  # a NaN or Inf entry makes its map's mean non-finite
    B = torch.relu(S - mean)  # (M, n), Eq. 5
    labels = connected_components(  # (M, n) int64, 0 = background; Eq. 6
        (B > 0).reshape(-1, h, w), connectivity=connectivity, backend=backend
    ).reshape(-1, n)
    if not bool(all_finite):
        raise ValueError(
            "spatial_entropy: the similarity maps contain NaN or Inf values (or values so "
            "large that a map's mean overflows), so the loss is undefined. The model's "
            "last-block attention has diverged (often fp16 overflow or a too-high learning "
            "rate): lower the learning rate, enable gradient clipping, or train with bf16 "
            "instead of fp16."
        )

    slots = max_components(h, w, connectivity) + 1  # slot 0 collects the background
    mass = B.new_zeros(B.shape[0], slots).scatter_add(1, labels, B)[:, 1:]  # (M, k), Eq. 13
    # |B^h|: every positive entry of B lies in a component, so summing the component masses
    # gives the same value, and a single component gets P = 1 (entropy exactly 0) without
    # rounding between two summation orders.
    total = mass.sum(dim=1, keepdim=True)  # (M, 1)
    P = mass / torch.where(total > 0, total, torch.ones_like(total))  # (M, k), Eq. 8
    # -P log P with 0 log 0 = 0; the inner `where` keeps the gradient finite at P = 0.
    # (Negating before the sum keeps a one-component map at +0, not -0.)
    positive = P > 0
    terms = torch.where(positive, -P * torch.log(torch.where(positive, P, torch.ones_like(P))), 0.0)
    H = terms.sum(dim=1).reshape(lead)  # (...), Eq. 7
    if return_num_components:
        return H, labels.amax(dim=1).reshape(lead)
    return H


class SpatialEntropyLoss(nn.Module):
    """``L_se``: the mean spatial entropy over all maps (heads and batch), Eq. 9.

    ``loss_fn(S)`` with ``S`` of shape ``(B, heads, h, w)`` returns a float32 scalar.
    A batch in which no map has a component gives 0 with zero gradients.
    """

    def __init__(self, connectivity: int = 8, backend: str = "auto") -> None:
        super().__init__()
        self.connectivity = connectivity
        self.backend = backend

    def forward(self, S: torch.Tensor) -> torch.Tensor:
        return spatial_entropy(S, connectivity=self.connectivity, backend=self.backend).mean()

    def extra_repr(self) -> str:
        return f"connectivity={self.connectivity}, backend={self.backend!r}"
