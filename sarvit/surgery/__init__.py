"""Turn a model into a SAR model and back.

``attach(model)`` rewires the last transformer block to Eq. 10-11 (or another row of
Table 1(b)) in place and adds ``model.forward_with_similarity(x) -> (logits, S)``.
``model(x)`` keeps its call and its output. ``detach(model)`` restores the original
block with the trained weights. Both dispatch on the model family; a model of no
supported family raises ``TypeError`` naming the supported ones.
"""

from __future__ import annotations

from torch import nn

from . import vit
from .block import LAYOUTS, BlockLayout, SARBlock, resolve_layout

__all__ = ["attach", "detach", "is_attached", "BlockLayout", "LAYOUTS", "resolve_layout", "SARBlock"]

_FAMILIES = (vit,)  # each: NAME, matches(model), attach(model, layout, query), detach(model)


def _family(model: nn.Module):
    for family in _FAMILIES:
        if family.matches(model):
            return family
    supported = "; ".join(f.NAME for f in _FAMILIES)
    raise TypeError(f"SAR does not support {type(model).__name__} models yet. Supported: {supported}")


def attach(model: nn.Module, layout: str | BlockLayout = "sar", query: str = "auto") -> nn.Module:
    """Make ``model`` a SAR model, in place, and return it.

    Args:
        model: e.g. ``timm.create_model("vit_small_patch16_224", num_classes=100)``.
        layout: the last block's layout, a row of Table 1(b): ``"sar"``/``"C"``
            (Eq. 10-11, the default), ``"standard"``/``"A"``, ``"B"`` or ``"D"``.
        query: the query of Eq. 4: ``"cls"``, ``"mean"`` (mean of the patch queries) or
            ``"auto"`` (the class token when the model has one).

    Returns:
        ``model``, with ``model.forward_with_similarity(x) -> (logits, S)`` where ``S``
        is float32 ``(B, heads, h, w)``.
    """
    if query not in ("auto", "cls", "mean"):
        raise ValueError(f"query must be 'auto', 'cls' or 'mean', got {query!r}")
    return _family(model).attach(model, resolve_layout(layout), query)


def detach(model: nn.Module) -> nn.Module:
    """Undo :func:`attach` in place: the standard last block, with the current weights."""
    if not is_attached(model):
        raise ValueError("this model has no SAR attached")
    return _family(model).detach(model)


def is_attached(model: nn.Module) -> bool:
    """True when ``model`` went through :func:`attach` (and not through :func:`detach`)."""
    return any(isinstance(m, SARBlock) for m in model.modules()) and hasattr(model, "forward_with_similarity")
