"""A backbone and a head as one network, with the backbone's similarity maps on demand.

The backbone is a model whose forward returns pooled features ``(B, C)`` (a timm model
created with ``num_classes=0``, e.g. ``sarvit.factory.create_model(name, num_classes=0)``);
a SAR-attached one (:func:`sarvit.attach`) also gives the maps ``S`` of its last block
through ``forward_with_similarity``. Self-supervised methods put their projection heads
on top of it and keep a momentum copy of the whole.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["Encoder", "backbone_width", "check_similarity"]


def backbone_width(backbone: nn.Module, embed_dim: int | None = None) -> int:
    """``C``, the width of the features ``backbone(x)`` returns: ``embed_dim`` when given, else
    timm's ``num_features``. Refuses a backbone that still has a classifier."""
    if getattr(backbone, "num_classes", 0):
        raise ConfigError(f"the backbone has a classifier of {backbone.num_classes} classes; create it with "
                          "num_classes=0 so that its forward returns the pooled features")
    width = embed_dim if embed_dim is not None else getattr(backbone, "num_features", None)
    if not isinstance(width, int) or width <= 0:
        raise ConfigError(f"cannot tell the width of the backbone's features (got {width!r}); pass embed_dim, "
                          "the size C of the (B, C) features its forward returns")
    return width


def check_similarity(backbone: nn.Module, se_kind: str | None) -> None:
    """Refuse ``se_kind`` for a backbone without SAR (no ``forward_with_similarity``)."""
    if se_kind is not None and not hasattr(backbone, "forward_with_similarity"):
        raise ConfigError(f"se_kind={se_kind!r} needs the similarity maps of a SAR backbone: "
                          "attach SAR first (sarvit.attach(backbone), or sarvit.factory.create_model)")


class Encoder(nn.Module):
    """``head(backbone(x))``; with ``se_kind`` also the backbone's maps.

    ``features(x, se_kind=None) -> (f (B, C), S (B, heads, h, w) or None)``;
    ``forward(x, se_kind=None) -> (head(f) (B, D), S or None)``. ``se_kind`` is the kind
    of map (``"dot"``, Eq. 4; ``"softmax"``; ``"cosine"``, Eq. 15).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def features(self, x: torch.Tensor, se_kind: str | None = None):
        if se_kind is None:
            return self.backbone(x), None
        check_similarity(self.backbone, se_kind)
        return self.backbone.forward_with_similarity(x, se_kind)

    def forward(self, x: torch.Tensor, se_kind: str | None = None):
        f, S = self.features(x, se_kind)
        return self.head(f), S
