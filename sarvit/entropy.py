"""Spatial entropy of similarity maps (Eq. 5-9) and the SAR loss.

For one map ``S`` of shape ``(h, w)``:

    B    = ReLU(S - mean(S))                    (Eq. 5, mean over the h*w entries)
    C    = 8-connected components of {B > 0}    (Eq. 6, no gradient)
    P_j  = sum_{C_j} B / sum B                  (Eq. 8, pooled as in Eq. 12-13)
    H(S) = -sum_j P_j log P_j                   (Eq. 7)

The components are computed under ``no_grad`` and only select which entries of ``B``
are pooled together, so the gradient flows through ``B`` (appendix A). A map whose
entries are all equal has no component: its entropy is 0 and so is its gradient.

Two implementations of the same function, both vectorised over the maps (no Python loop
over maps or components):

- on the CPU (``backend="auto"``), compiled loops with a hand-written backward
  (:mod:`sarvit.entropy_cpu`): no torch kernel touches the maps and no thread team is
  involved, so the loss keeps its speed when data-loading workers keep every core busy;
  about 2 ms forward and backward on (256, 6, 14, 14).
- on other devices, or with ``backend="torch"`` or ``"scipy"`` (the labelling backends of
  :func:`sarvit.connected_components`), torch operations: labelling, one
  ``scatter_add`` for the masses, and autograd for the gradient. On CUDA this stays on
  the device.
"""

from __future__ import annotations

import torch
from torch import nn

from .components import connected_components, max_components
from .entropy_cpu import NON_FINITE, DivergedAttention, HostEntropy

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
            ``(B, heads, k, k)`` from Eq. 4). fp16 and bf16 inputs are promoted to float32
            before anything is computed.
        connectivity: 8 (the paper) or 4.
        backend: "auto" (the compiled CPU path for CPU tensors, device labelling
            elsewhere), or "torch" / "scipy" to compute with torch operations and label
            with that backend of :func:`sarvit.connected_components`.
        return_num_components: also return the number of components of each map.

    Returns:
        ``H`` of shape ``(...)``: float64 for a float64 input, float32 for any other
        floating dtype (the float64 result keeps gradchecks exact); with
        ``return_num_components`` also an int64 tensor of shape ``(...)``.
        Maps without entries (``h == 0`` or ``w == 0``) have no component: their
        entropy is 0 (count 0, zero gradient). An empty stack (a leading dimension of
        size 0) gives an empty result of shape ``(...)``.

    Raises:
        TypeError: if ``S`` is not a floating-point tensor.
        ValueError: if ``S`` has fewer than 2 dimensions, if ``connectivity`` or
            ``backend`` is unknown, or if ``S`` holds NaN or infinite values (detected
            through the map means; on a device, read after the labelling has
            synchronised with the host anyway, so the check costs no extra
            synchronisation).
    """
    if not isinstance(S, torch.Tensor) or not S.is_floating_point():
        got = S.dtype if isinstance(S, torch.Tensor) else type(S).__name__
        raise TypeError(f"spatial_entropy expects a floating-point tensor, got {got}")
    if S.dim() < 2:
        raise ValueError(f"spatial_entropy expects maps of shape (..., h, w), got {tuple(S.shape)}")
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity!r}")
    if backend not in ("auto", "torch", "scipy"):
        raise ValueError(f"backend must be one of ('auto', 'torch', 'scipy'), got {backend!r}")
    lead, (h, w) = S.shape[:-2], S.shape[-2:]
    S = S.to(torch.promote_types(S.dtype, torch.float32))
    if S.numel() == 0:  # no map, or maps without entries: no component anywhere
        H = S.sum(dim=(-2, -1))  # (...) zeros, attached to the graph
        count = torch.zeros(lead, dtype=torch.int64, device=S.device)
        return (H, count) if return_num_components else H
    maps = S.reshape(-1, h * w)  # (M, n)
    if S.device.type == "cpu" and backend == "auto":
        H, count = HostEntropy.apply(maps, h, w, connectivity)
    else:
        H, count = _device_entropy(maps, h, w, connectivity, backend)
    H, count = H.reshape(lead), count.reshape(lead)  # (...)
    return (H, count) if return_num_components else H


def _device_entropy(maps: torch.Tensor, h: int, w: int, connectivity: int, backend: str):
    """Torch operations on ``maps`` (M, n) -> ``(H (M,), count (M,))``; autograd does the rest."""
    n = h * w
    mean = maps.mean(dim=1, keepdim=True)  # (M, 1)
    all_finite = torch.isfinite(mean).all()  # a NaN or Inf entry makes its map's mean non-finite
    B = torch.relu(maps - mean)  # (M, n), Eq. 5
    labels = connected_components(  # (M, n) int64, 0 = background; Eq. 6
        (B > 0).reshape(-1, h, w), connectivity=connectivity, backend=backend
    ).reshape(-1, n)
    if not bool(all_finite):
        raise DivergedAttention(NON_FINITE)
    slots = max_components(h, w, connectivity) + 1  # slot 0 collects the background
    mass = B.new_zeros(B.shape[0], slots).scatter_add(1, labels, B)[:, 1:]  # (M, k), Eq. 13
    # |B|: the sum of the component masses (see _forward_maps for why).
    total = mass.sum(dim=1, keepdim=True)  # (M, 1)
    P = mass / torch.where(total > 0, total, torch.ones_like(total))  # (M, k), Eq. 8
    # -P log P with 0 log 0 = 0; the inner `where` keeps the gradient finite at P = 0.
    # (Negating before the sum keeps a one-component map at +0, not -0.)
    positive = P > 0
    terms = torch.where(positive, -P * torch.log(torch.where(positive, P, torch.ones_like(P))), 0.0)
    return terms.sum(dim=1), labels.amax(dim=1)  # (M,), Eq. 7


class SpatialEntropyLoss(nn.Module):
    """``L_se``: the mean spatial entropy over all maps (heads and batch), Eq. 9.

    ``loss_fn(S)`` with ``S`` of shape ``(B, heads, h, w)`` returns a scalar (float64 for
    a float64 ``S``, float32 otherwise). A batch in which no map has a component gives 0
    with zero gradients, and so does an empty batch (``B == 0``): the loss is a sum over
    components, and an empty batch has none.
    """

    def __init__(self, connectivity: int = 8, backend: str = "auto") -> None:
        super().__init__()
        self.connectivity = connectivity
        self.backend = backend

    def forward(self, S: torch.Tensor) -> torch.Tensor:
        H = spatial_entropy(S, connectivity=self.connectivity, backend=self.backend)
        return H.mean() if H.numel() > 0 else H.sum()

    def extra_repr(self) -> str:
        return f"connectivity={self.connectivity}, backend={self.backend!r}"
