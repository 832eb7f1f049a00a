"""Turn a model into a SAR model and back.

``attach(model)`` rewires the last transformer block to Eq. 10-11 (or another row of
Table 1(b)) in place and adds ``model.forward_with_similarity(x) -> (logits, S)``.
``model(x)`` keeps its call and its output. ``detach(model)`` restores the original
block with the trained weights. Both dispatch on the model family; a model of no
supported family raises :class:`~sarvit.errors.UnsupportedModel` (a ``TypeError``)
naming the supported ones.

A family is a module with ``NAME`` and ``DESCRIPTION`` (what the error messages list),
``matches(model)``, ``attach(model, layout, query)``, ``detach(model)``, ``last_block(model)``
(the block SAR rewires, plain or wrapped) and ``attention_logits(model, inputs, query,
image_size) -> (logits, P, grid)``: the query's row of the last block's attention logits
over all its keys, float32 ``(B, heads, P + h*w)`` with the ``P`` prefix keys first, from
the block's own q/k code and the block's positional ``inputs`` (what analysis reads; it
works on plain and attached models alike). ``FAMILIES`` is the registry, in the order
families are tried; :func:`family_of` finds a model's.
"""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError, UnsupportedModel
from . import cvt, pvt, pvt_v2, swin, t2t, torchvision_vit, vit
from .block import LAYOUTS, BlockLayout, SARBlock, resolve_layout

__all__ = ["attach", "detach", "is_attached", "check_supported", "supported_families", "family_of", "FAMILIES",
           "BlockLayout", "LAYOUTS", "resolve_layout", "SARBlock", "sar_block"]

# each: NAME, DESCRIPTION, matches, attach, detach, last_block, attention_logits; tried in this order
FAMILIES = [vit, t2t, pvt, pvt_v2, cvt, swin, torchvision_vit]


def supported_families() -> str:
    """``"timm VisionTransformer (vit_*, deit_*, ...); ..."``: the registry, in words."""
    return "; ".join(f"{f.NAME} ({f.DESCRIPTION})" for f in FAMILIES)


def family_of(model: nn.Module):
    """The family module of ``model`` (one of ``FAMILIES``); raises
    :class:`~sarvit.errors.UnsupportedModel` naming the supported families."""
    return _family(model)


def _family(model: nn.Module):
    for family in FAMILIES:
        if family.matches(model):
            return family
    cls = type(model)
    what = f"{cls.__module__}.{cls.__qualname__}"
    library = cls.__module__.split(".")[0]
    if library not in ("timm", "sarvit", "torch"):
        what += f" ({library}'s {cls.__name__}, not timm's: create the model with timm.create_model)"
    raise UnsupportedModel(f"SAR does not support {what}. SAR supports these families: {supported_families()}")


def check_supported(model: nn.Module) -> None:
    """Raise :class:`~sarvit.errors.UnsupportedModel` unless ``model`` is of a supported family."""
    _family(model)


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
        raise ConfigError(f"query must be 'auto', 'cls' or 'mean', got {query!r}")
    return _family(model).attach(model, resolve_layout(layout), query)


def detach(model: nn.Module) -> nn.Module:
    """Undo :func:`attach` in place: the standard last block, with the current weights."""
    if not is_attached(model):
        raise ValueError("this model has no SAR attached")
    return _family(model).detach(model)


def sar_block(model: nn.Module) -> SARBlock:
    """The block :func:`attach` rewired: its ``query`` (``"cls"`` or ``"mean"``), ``layout``, ..."""
    for module in model.modules():
        if isinstance(module, SARBlock):
            return module
    raise ValueError("this model has no SAR attached")


def is_attached(model: nn.Module) -> bool:
    """True when ``model`` went through :func:`attach` (and not through :func:`detach`)."""
    return any(isinstance(m, SARBlock) for m in model.modules()) and hasattr(model, "forward_with_similarity")
