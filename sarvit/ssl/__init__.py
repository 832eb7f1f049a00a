"""Self-supervised pre-training with SAR (appendix C, Table 12): DINO and MoCo v3.

- :mod:`.encoder`: a backbone and a projection head as one network, with the maps ``S``.
- :mod:`.dino`: :class:`DINO`, student and teacher, multi-crop, lightly's DINO loss.
- :mod:`.mocov3`: :class:`MoCoV3`, base and momentum encoders, predictor.
- :mod:`.views`: the augmented views (lightly's transforms) and their collate.

A method module is a ``nn.Module`` with ``forward(views, se_kind=None) -> outputs``,
``loss(outputs, ...) -> {"loss", <main term>, "se"?}``, a momentum update and
``backbone_for_evaluation()``. The names are imported on first use, so that importing
this package does not import torch or lightly.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Encoder": ".encoder",
    "DINO": ".dino",
    "teacher_momentum": ".dino",
    "MoCoV3": ".mocov3",
    "momentum_at": ".mocov3",
    "ViewTransform": ".views",
    "dino_views": ".views",
    "mocov3_views": ".views",
    "collate_views": ".views",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from .dino import DINO, teacher_momentum
    from .encoder import Encoder
    from .mocov3 import MoCoV3, momentum_at
    from .views import ViewTransform, collate_views, dino_views, mocov3_views


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sarvit.ssl' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
