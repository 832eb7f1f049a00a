"""Dense relative localisation, DRLoc (Liu et al. 2021), the baseline of Table 4.

From the final ``h x w`` grid of patch tokens (the [CLS] token dropped), draw ``m``
position pairs per image uniformly with replacement, concatenate the two embeddings
and regress the absolute offsets ``(|dx|, |dy|)`` (in grid cells, unnormalised) with
an MLP ``Linear(2C, 512)-ReLU-Linear(512, 512)-ReLU-Linear(512, 2)`` under an L1 loss,
as the published DRLoc code does (github.com/yhlleo/VTs-Drloc, ``drloc/aux_modules.py``
in ``l1`` mode with ``--use_abs``, as its ``train.sh`` runs it):

    L_drloc = E_{(u, v)} || (|u_x - v_x|, |u_y - v_y|) - f([e_u, e_v]) ||_1

That code takes the tokens of the last block *before* the model's final norm (in its
ViT the norm sits inside the classification head; in its Swin the head reads
``norm(x)`` while DRLoc reads ``x``), and so does :class:`DRLocLoss`. Its sampler draws
both coordinates below the grid height (square grids only); here rows and columns are
drawn below ``h`` and ``w``. The MLP is trained with the backbone but is not part of it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["sample_position_pairs", "drloc_loss", "DRLocHead", "DRLocLoss"]


def sample_position_pairs(batch: int, h: int, w: int, m: int, generator: torch.Generator | None = None,
                          device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``m`` uniform position pairs per image, with replacement.

    Returns:
        ``(first, second)``, each int64 ``(batch, m, 2)`` holding ``(row, column)``.
    """
    def draw(high: int) -> torch.Tensor:
        return torch.randint(high, (batch, m, 1), generator=generator, device=device)

    first = torch.cat([draw(h), draw(w)], dim=-1)  # (batch, m, 2)
    second = torch.cat([draw(h), draw(w)], dim=-1)  # (batch, m, 2)
    return first, second


def _gather(tokens: torch.Tensor, pos: torch.Tensor, w: int) -> torch.Tensor:
    """Embeddings at ``pos``: tokens ``(B, h*w, C)``, pos ``(B, m, 2)`` -> ``(B, m, C)``."""
    flat = pos[..., 0] * w + pos[..., 1]  # (B, m), raster index
    return tokens.gather(1, flat.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


class DRLocHead(nn.Module):
    """The DRLoc MLP: ``(..., 2C) -> (..., 2)`` predicted ``(|dx|, |dy|)``."""

    def __init__(self, dim: int, hidden: int = 512) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(2 * dim, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, 2),
        )

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        return self.mlp(pairs)


def drloc_loss(tokens: torch.Tensor, grid: tuple[int, int], head: DRLocHead, m: int = 64,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """L1 loss of the predicted against the true absolute offsets of ``m`` pairs per image.

    Args:
        tokens: patch tokens of the last block, ``(B, h*w, C)`` in raster order (no prefix tokens).
        grid: ``(h, w)``.
        head: the :class:`DRLocHead` that is trained with the backbone.
        m: pairs per image (64 in Table 4's setting).

    Returns:
        float32 scalar: the mean absolute error over images, pairs and both coordinates.
    """
    b, n, c = tokens.shape
    h, w = grid
    if n != h * w:
        raise ValueError(f"drloc_loss: {n} tokens do not form a {h}x{w} grid")
    first, second = sample_position_pairs(b, h, w, m, generator=generator, device=tokens.device)
    pairs = torch.cat([_gather(tokens, first, w), _gather(tokens, second, w)], dim=-1)  # (B, m, 2C)
    predicted = head(pairs).float()  # (B, m, 2)
    target = (first - second).abs().float()  # (B, m, 2): (|dy|, |dx|) in grid cells
    return F.l1_loss(predicted, target)


class DRLocLoss(nn.Module):
    """``L_drloc`` with its own trained :class:`DRLocHead`: ``tokens (B, h, w, C) -> ()``.

    The pairs are drawn from torch's generator of the tokens' device (checkpointed with
    the run, so a resumed run draws the same pairs).
    """

    def __init__(self, dim: int, m: int = 64, hidden: int = 512) -> None:
        super().__init__()
        self.m = m
        self.head = DRLocHead(dim, hidden)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        grid = tuple(tokens.shape[1:3])
        return drloc_loss(tokens.flatten(1, 2), grid, self.head, m=self.m)  # tokens (B, h*w, C)

    def extra_repr(self) -> str:
        return f"m={self.m}"
