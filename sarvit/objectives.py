"""Training objectives as sums of named terms: ``L_tot = L_ce + lambda * L_aux``.

An objective returns a dict of tensors: ``loss`` (what to back-propagate), ``ce``, and
its auxiliary term under its own name. It says which model outputs it reads
(:class:`Needs`): the kind of similarity map, and whether the final patch tokens; the
model computes only those. ``build_objective(name, ...)`` makes the ones
``sarvit train --objective`` offers:

=============  ===========  ==========================================================
objective      term         auxiliary term
=============  ===========  ==========================================================
sar            se           L_se (Eq. 9) of the pre-softmax maps S (Eq. 4)
sar_softmax    se_softmax   L_se of the post-softmax maps (Sec. 4.3)
sar_cosine     se_cosine    L_se of the cosine-similarity maps (Eq. 15)
tv             tv           total variation of S (Eq. 14)
entropy        entropy      entropy of the thresholded S over positions (no components)
drloc          drloc        dense relative localisation (Liu et al. 2021), trained MLP
=============  ===========  ==========================================================

``lambda_at`` gives the weight of the SE-family terms at a (fractional) epoch:
``constant`` (the paper's text) or ``warmup_cosine`` (the published code: linear warm-up
from 0 over the first epochs, then cosine decay to 0 at the end of training).
``drloc_lambda_at`` gives DRLoc's: linear warm-up, then linear decay to 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .entropy import SpatialEntropyLoss

__all__ = ["OBJECTIVES", "Needs", "lambda_at", "drloc_lambda_at", "Objective", "SupervisedObjective", "DRLocObjective",
           "build_objective", "classification_loss"]


@dataclass(frozen=True)
class Needs:
    """The model outputs an auxiliary term reads besides the logits.

    ``similarity``: ``"dot"`` (Eq. 4), ``"softmax"`` or ``"cosine"`` (Eq. 15) maps of the last
    block, or ``None`` for none; ``tokens``: the patch tokens leaving the last block.
    """

    similarity: str | None = "dot"
    tokens: bool = False


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


def drloc_lambda_at(lam: float, epoch: float, epochs: int, warmup_epochs: int = 20) -> float:
    """Weight of the DRLoc term: linear from 0 to ``lam`` over ``min(warmup_epochs, epochs)``
    epochs, then linear down to 0 at ``epochs`` (fractional epochs allowed)."""
    warmup = min(warmup_epochs, epochs)
    if epoch < warmup:
        return lam * epoch / warmup
    if epochs == warmup:  # the warm-up takes the whole run: no decay left
        return lam
    return lam * min(max(1.0 - (epoch - warmup) / (epochs - warmup), 0.0), 1.0)


def classification_loss(mixup_active: bool, smoothing: float) -> nn.Module:
    """timm's losses: soft-target CE under Mixup/CutMix, label smoothing, or plain CE."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if mixup_active:
        return SoftTargetCrossEntropy()  # Mixup already smooths the targets
    if smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=smoothing)
    return nn.CrossEntropyLoss()


class Objective(nn.Module):
    """``ce(logits, targets) + lam * (auxiliary term)``, the term named ``term``.

    ``needs``: the model outputs the auxiliary term reads; ``inner``: a loss with
    parameters that runs inside the wrapped forward (:class:`~sarvit.engine.TrainForward`,
    so that DistributedDataParallel sees it), or ``None``.

    ``forward(logits, targets, outputs=None, lam=0.0)``: ``outputs`` is what
    ``TrainForward`` returns beside the logits (``None`` when nothing was asked for).
    Returns ``{"ce", term, "loss"}`` (``term`` only when ``outputs`` is given), float32
    scalars.
    """

    needs: Needs = Needs()
    term: str = ""

    def __init__(self, ce: nn.Module) -> None:
        super().__init__()
        self.ce = ce

    @property
    def inner(self) -> nn.Module | None:
        return None

    def auxiliary(self, outputs) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, outputs=None, lam: float = 0.0):
        terms = {"ce": self.ce(logits.float(), targets)}
        loss = terms["ce"]
        if outputs is not None:
            terms[self.term] = self.auxiliary(outputs)
            loss = loss + lam * terms[self.term]
        terms["loss"] = loss
        return terms


class SupervisedObjective(Objective):
    """``ce + lam * aux(maps)``: SAR and the other losses of the similarity maps.

    Args:
        ce: the classification loss.
        aux: a loss of the maps, ``(B, heads, h, w) -> ()``; default
            :class:`~sarvit.entropy.SpatialEntropyLoss` (SAR, Eq. 9).
        term: the name of the auxiliary term.
        similarity: the kind of map ``aux`` reads (see :class:`Needs`).

    ``outputs`` holds the maps under ``"S"`` (or is the maps tensor itself).
    """

    def __init__(self, ce: nn.Module, aux: nn.Module | None = None, *, term: str = "se",
                 similarity: str = "dot") -> None:
        super().__init__(ce)
        self.aux = aux if aux is not None else SpatialEntropyLoss()
        self.term = term
        self.needs = Needs(similarity=similarity)

    def auxiliary(self, outputs) -> torch.Tensor:
        return self.aux(outputs if isinstance(outputs, torch.Tensor) else outputs["S"])


class DRLocObjective(Objective):
    """``ce + lam * L_drloc``; the DRLoc MLP (:class:`~sarvit.losses.DRLocLoss`) is its
    ``inner`` loss, whose value ``TrainForward`` leaves under ``outputs["inner"]``.

    Args:
        dim: the width ``C`` of the patch tokens.
        pairs: ``m``, position pairs per image.
    """

    needs = Needs(similarity=None, tokens=True)
    term = "drloc"

    def __init__(self, ce: nn.Module, dim: int, pairs: int = 64) -> None:
        from .losses import DRLocLoss

        super().__init__(ce)
        self.drloc = DRLocLoss(dim, m=pairs)

    @property
    def inner(self) -> nn.Module:
        return self.drloc

    def auxiliary(self, outputs) -> torch.Tensor:
        return outputs["inner"]


# the SE-family objectives: name -> (term, similarity kind, loss of the maps)
def _map_losses() -> dict:
    from .losses import PositionEntropyLoss, TotalVariationLoss

    return {
        "sar": ("se", "dot", SpatialEntropyLoss),
        "sar_softmax": ("se_softmax", "softmax", SpatialEntropyLoss),
        "sar_cosine": ("se_cosine", "cosine", SpatialEntropyLoss),
        "tv": ("tv", "dot", TotalVariationLoss),
        "entropy": ("entropy", "dot", PositionEntropyLoss),
    }


OBJECTIVES = ("sar", "sar_softmax", "sar_cosine", "tv", "entropy", "drloc")


def build_objective(name: str, ce: nn.Module, *, dim: int | None = None, drloc_pairs: int = 64) -> Objective:
    """The objective ``--objective name`` trains with; ``dim`` (token width) is needed by ``drloc``."""
    if name == "drloc":
        if dim is None:
            raise ValueError("the drloc objective needs the width of the patch tokens (dim)")
        return DRLocObjective(ce, dim, drloc_pairs)
    losses = _map_losses()
    if name not in losses:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    term, similarity, loss = losses[name]
    return SupervisedObjective(ce, loss(), term=term, similarity=similarity)
