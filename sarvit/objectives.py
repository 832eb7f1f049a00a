"""Training objectives as sums of named terms: ``L_tot = L_ce + lambda * L_se``.

``SupervisedObjective(...)(logits, targets, S, lam)`` returns a dict of tensors:
``loss`` (what to back-propagate) and one entry per term (``ce``, ``se``), so logs and
later objectives (DRLoc, total variation, ...) share one shape.

``lambda_at`` gives the weight of the SE term at a (fractional) epoch: ``constant``
(the paper's text) or ``warmup_cosine`` (the published code: linear warm-up from 0 over
the first epochs, then cosine decay to 0 at the end of training).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .entropy import SpatialEntropyLoss

__all__ = ["lambda_at", "SupervisedObjective", "classification_loss"]


def lambda_at(schedule: str, lam: float, epoch: float, epochs: int, warmup_epochs: int = 10) -> float:
    """Weight of the SE term after ``epoch`` epochs of training (fractional epochs allowed)."""
    if schedule == "constant":
        return lam
    if schedule != "warmup_cosine":
        raise ValueError(f"unknown lambda schedule {schedule!r}; use 'constant' or 'warmup_cosine'")
    warmup = min(warmup_epochs, epochs)
    if epoch < warmup:
        return lam * epoch / warmup
    span = max(epochs - warmup, 1e-12)
    progress = min(max((epoch - warmup) / span, 0.0), 1.0)
    return lam * 0.5 * (1.0 + math.cos(math.pi * progress))


def classification_loss(mixup_active: bool, smoothing: float) -> nn.Module:
    """timm's losses: soft-target CE under Mixup/CutMix, label smoothing, or plain CE."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if mixup_active:
        return SoftTargetCrossEntropy()  # Mixup already smooths the targets
    if smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=smoothing)
    return nn.CrossEntropyLoss()


class SupervisedObjective(nn.Module):
    """``ce(logits, targets) + lam * L_se(S)``; without ``S`` the SE term is left out.

    Returns ``{"loss", "ce", "se"}`` (``se`` only when ``S`` is given), float32 scalars.
    """

    def __init__(self, ce: nn.Module, se: SpatialEntropyLoss | None = None) -> None:
        super().__init__()
        self.ce = ce
        self.se = se if se is not None else SpatialEntropyLoss()

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, S: torch.Tensor | None = None, lam: float = 0.0):
        terms = {"ce": self.ce(logits.float(), targets)}
        loss = terms["ce"]
        if S is not None:
            terms["se"] = self.se(S)
            loss = loss + lam * terms["se"]
        terms["loss"] = loss
        return terms
