"""Auxiliary losses beside SAR's spatial entropy (:mod:`sarvit.entropy`), one module each.

- :mod:`.total_variation`: total variation of the similarity maps (appendix B, Eq. 14).
- :mod:`.position_entropy`: Shannon entropy of the thresholded maps over positions, the
  spatial entropy without its connected components (a control).
- :mod:`.drloc`: dense relative localisation (Liu et al. 2021, the baseline of Table 4).
- :mod:`.mocov3`: MoCo v3's contrastive loss (the main task of MoCo v3 + SAR, Table 12).
"""

from .drloc import DRLocHead, DRLocLoss, drloc_loss, sample_position_pairs
from .mocov3 import MoCoV3Loss, mocov3_contrastive_loss, mocov3_loss
from .position_entropy import PositionEntropyLoss, position_entropy
from .total_variation import TotalVariationLoss, total_variation

__all__ = ["total_variation", "TotalVariationLoss", "position_entropy", "PositionEntropyLoss",
           "sample_position_pairs", "drloc_loss", "DRLocHead", "DRLocLoss",
           "mocov3_contrastive_loss", "mocov3_loss", "MoCoV3Loss"]
