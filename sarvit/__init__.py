"""sarvit: SAR, the spatial-entropy regulariser for vision transformers.

    import timm, sarvit
    model = sarvit.attach(timm.create_model("vit_small_patch16_224", num_classes=100))
    logits, S = model.forward_with_similarity(images)        # S: (B, heads, 14, 14)
    loss = ce(logits, targets) + 0.01 * sarvit.SpatialEntropyLoss()(S)

The names below are imported on first use (PEP 562), so that ``import sarvit`` and
``sarvit --help`` do not wait for torch and timm.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "connected_components": ".components",
    "spatial_entropy": ".entropy",
    "SpatialEntropyLoss": ".entropy",
    "attach": ".surgery",
    "detach": ".surgery",
    "is_attached": ".surgery",
    "BlockLayout": ".surgery",
    "create_model": ".factory",
    "load_model": ".factory",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from .components import connected_components
    from .entropy import SpatialEntropyLoss, spatial_entropy
    from .factory import create_model, load_model
    from .surgery import BlockLayout, attach, detach, is_attached


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sarvit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
