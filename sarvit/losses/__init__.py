"""Auxiliary losses beside SAR's spatial entropy, one module each.

- :mod:`.total_variation`: total variation of the similarity maps (appendix B, Eq. 14).
- :mod:`.drloc`: dense relative localisation (Liu et al. 2021, the baseline of Table 4).
"""

from .drloc import DRLocHead, drloc_loss, sample_position_pairs
from .total_variation import TotalVariationLoss, total_variation

__all__ = ["total_variation", "TotalVariationLoss", "sample_position_pairs", "drloc_loss", "DRLocHead"]
