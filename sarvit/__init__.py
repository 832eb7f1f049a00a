"""sarvit: SAR, the spatial-entropy regulariser for vision transformers.

    import timm, sarvit
    model = sarvit.attach(timm.create_model("vit_small_patch16_224", num_classes=100))
    logits, S = model.forward_with_similarity(images)        # S: (B, heads, 14, 14)
    loss = ce(logits, targets) + 0.01 * sarvit.SpatialEntropyLoss()(S)

The names below are imported on first use (PEP 562), so that ``import sarvit`` and
``sarvit --help`` do not wait for torch and timm. The architectures of ``sarvit.models``
(T2T-ViT, PVT v1, CvT) are registered with timm as soon as timm is imported.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
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


class _RegisterAfterTimm(importlib.abc.Loader):
    """timm's own loader, then ``sarvit.models`` (which registers its architectures with timm)."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        importlib.import_module(".models", __name__)

    def __getattr__(self, name: str) -> Any:  # resource readers and the like: timm's loader
        return getattr(self.loader, name)


class _TimmImportHook(importlib.abc.MetaPathFinder):
    """Registers sarvit's architectures the moment timm is imported, so that ``import sarvit``
    stays fast (no torch, no timm) and ``timm.create_model("cvt_13")`` still works after it."""

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)  # once: the other finders locate timm itself
        spec = importlib.util.find_spec("timm")
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfterTimm(spec.loader)
        return spec


if "timm" in sys.modules:
    importlib.import_module(".models", __name__)
elif not any(isinstance(f, _TimmImportHook) for f in sys.meta_path):
    sys.meta_path.insert(0, _TimmImportHook())


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sarvit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
