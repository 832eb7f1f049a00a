"""MoCo v3 (Chen, Xie and He 2021) for ViT, and MoCo v3 + SAR (appendix C).

The base encoder (backbone + 3-layer projection MLP) and a predictor (2-layer MLP) map
two views ``x1, x2`` of the same images to queries ``q1, q2``; a momentum encoder (an
exponential moving average of the base encoder, no gradient) maps them to keys
``k1, k2``. The loss is :func:`sarvit.losses.mocov3_loss`: ``ctr(q1, k2) + ctr(q2, k1)``.
With SAR: ``L = L_moco + lambda * L_se``, ``L_se`` (Eq. 9) of the base encoder's maps
on both views.

As the published code: MLPs with bias-free linear layers, batch norm and ReLU, the
projector's last batch norm without affine parameters, the predictor's last layer
without batch norm; hidden width 4096, output 256; temperature 0.2; the ViT's patch
projection frozen at its random initialisation ("random patch projection", for
stability). The momentum follows ``m = 1 - (1 + cos(pi * epoch / epochs)) / 2 * (1 - 0.99)``.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ..entropy import SpatialEntropyLoss
from ..errors import ConfigError
from ..losses.mocov3 import mocov3_loss
from .encoder import Encoder, backbone_width, check_similarity

__all__ = ["MoCoV3", "mlp", "momentum_at", "freeze_patch_embedding"]


def mlp(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool) -> nn.Sequential:
    """MoCo v3's MLP ``(B, in_dim) -> (B, out_dim)``: ``num_layers`` bias-free linear layers,
    batch norm and ReLU between them, and with ``last_bn`` a final batch norm without affine."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else hidden_dim
        d_out = out_dim if i == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


def momentum_at(epoch: float, epochs: int, base: float = 0.99) -> float:
    """MoCo v3's momentum at a fractional ``epoch`` of ``epochs``:
    ``1 - (1 + cos(pi * epoch / epochs)) / 2 * (1 - base)``, from ``base`` to 1."""
    if not 0.0 <= base <= 1.0:
        raise ConfigError(f"the MoCo v3 momentum must be in [0, 1] (0.99 for ViT), got {base!r}")
    if epochs <= 0 or not 0 <= epoch <= epochs:
        raise ValueError(f"epoch must be in [0, epochs] with epochs > 0; got {epoch} of {epochs}")
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) * (1.0 - base)


def freeze_patch_embedding(backbone: nn.Module) -> None:
    """Stop the gradient of the patch projection (timm's ``patch_embed``, torchvision's
    ``conv_proj``): MoCo v3's random patch projection."""
    embed = getattr(backbone, "patch_embed", None)
    if embed is None:
        embed = getattr(backbone, "conv_proj", None)
    if embed is None:
        raise ConfigError(f"{type(backbone).__name__} has no patch embedding (patch_embed) to freeze; "
                          "set freeze_patch_embed=False")
    for p in embed.parameters():
        p.requires_grad_(False)


def _check_options(dim: int, mlp_dim: int, temperature: float) -> None:
    bad = {k: v for k, v in dict(dim=dim, mlp_dim=mlp_dim).items() if not (isinstance(v, int) and v > 0)}
    if bad:
        raise ConfigError(f"the MoCo v3 MLP sizes must be positive integers; got {bad}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"the MoCo v3 temperature must be > 0 (0.2 for ViT), got {temperature!r}")


class MoCoV3(nn.Module):
    """Base encoder, predictor and momentum encoder of MoCo v3 around one backbone.

    Args:
        backbone: a model whose forward returns pooled features ``(B, C)`` (``num_classes=0``);
            a SAR-attached one (:func:`sarvit.attach`) for MoCo v3 + SAR.
        embed_dim: ``C``; by default the backbone's ``num_features``.
        dim: output width of the projector and the predictor (256).
        mlp_dim: hidden width of both MLPs (4096).
        temperature: ``tau`` of the contrastive loss (0.2 for ViT).
        freeze_patch_embed: freeze the backbone's patch projection (MoCo v3 for ViT: on).

    ``state_dict()`` holds the base encoder (``encoder.*``), the predictor and the momentum
    encoder (``momentum_encoder.*``, including its batch-norm statistics).
    """

    def __init__(self, backbone: nn.Module, *, embed_dim: int | None = None, dim: int = 256,
                 mlp_dim: int = 4096, temperature: float = 0.2, freeze_patch_embed: bool = True) -> None:
        from lightly.models.utils import deactivate_requires_grad

        super().__init__()
        _check_options(dim, mlp_dim, temperature)
        width = backbone_width(backbone, embed_dim)
        if freeze_patch_embed:
            freeze_patch_embedding(backbone)
        self.temperature = temperature
        self.encoder = Encoder(backbone, mlp(3, width, mlp_dim, dim, last_bn=True))
        self.predictor = mlp(2, dim, mlp_dim, dim, last_bn=False)
        self.momentum_encoder = copy.deepcopy(self.encoder)
        deactivate_requires_grad(self.momentum_encoder)
        self.se = SpatialEntropyLoss()

    def forward(self, views: list[torch.Tensor], se_kind: str | None = None) -> dict:
        """Queries and keys of the two views ``[x1, x2]`` (each ``(B, 3, H, W)``).

        Each view goes through the encoders on its own (batch-norm statistics per view,
        as the published code). Returns ``{"q1", "q2"}`` (predictor outputs, ``(B, dim)``),
        ``{"k1", "k2"}`` (momentum encoder, no gradient, ``(B, dim)``) and, with ``se_kind``,
        ``"S"``: the base encoder's maps of both views, ``(2B, heads, h, w)``, x1's then x2's.
        """
        if len(views) != 2:
            raise ValueError(f"MoCo v3 takes 2 views, got {len(views)}")
        check_similarity(self.encoder.backbone, se_kind)
        (z1, S1), (z2, S2) = (self.encoder(x, se_kind) for x in views)
        out = {"q1": self.predictor(z1), "q2": self.predictor(z2)}
        with torch.no_grad():
            out["k1"], out["k2"] = (self.momentum_encoder(x)[0] for x in views)
        if se_kind is not None:
            out["S"] = torch.cat([S1, S2])  # (2B, heads, h, w)
        return out

    def loss(self, outputs: dict, lam: float = 0.0) -> dict[str, torch.Tensor]:
        """``{"moco", "se" (with maps), "loss"}``, float32 scalars; ``loss = moco + lam * se``."""
        terms = {"moco": mocov3_loss(outputs["q1"], outputs["q2"], outputs["k1"], outputs["k2"], self.temperature)}
        loss = terms["moco"]
        if "S" in outputs:
            terms["se"] = self.se(outputs["S"])
            loss = loss + lam * terms["se"]
        terms["loss"] = loss
        return terms

    @torch.no_grad()
    def update_momentum(self, m: float) -> None:
        """``w_k <- m w_k + (1 - m) w_q`` for every parameter of the momentum encoder."""
        from lightly.models.utils import update_momentum

        if not 0.0 <= m <= 1.0:
            raise ValueError(f"the momentum must be in [0, 1], got {m!r}")
        update_momentum(self.encoder, self.momentum_encoder, m)

    def backbone_for_evaluation(self) -> nn.Module:
        """The base encoder's backbone (MoCo v3's linear probe reads it)."""
        return self.encoder.backbone
