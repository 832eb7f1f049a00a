"""DINO (Caron et al. 2021): self-distillation with multi-crop, and DINO + SAR (appendix C).

A student (backbone + DINO projection head) sees every view; a teacher of the same
architecture, an exponential moving average of the student, sees the 2 global views. The
student's outputs are pulled towards the teacher's centred and sharpened outputs:

    P_t(x) = softmax((g_t(x) - c) / tau_t),   log P_s(x') = log_softmax(g_s(x') / tau_s)
    L_dino = mean over pairs (global view v, any view v' != v) of mean_batch -sum_d P_t(v) log P_s(v')

with ``tau_s = 0.1``, ``tau_t`` warmed up linearly from ``warmup_teacher_temp`` to
``teacher_temp`` over the first ``warmup_teacher_temp_epochs`` (constant per epoch), and the
centre ``c <- m c + (1 - m) mean(teacher outputs)`` (``m = 0.9``) after every loss.
With SAR: ``L = L_dino + lambda * L_se``, ``L_se`` (Eq. 9) of the student's maps on the
2 global crops only. The head, the loss and the momentum update are lightly's.

Defaults are those of the published ``main_dino.py`` (teacher temperature 0.04 without
warm-up, weight-normalised last layer); its ViT-S/16 recipe warms the teacher temperature
from 0.04 to 0.07 over 30 epochs and leaves the last layer free (``norm_last_layer=False``).
"""

from __future__ import annotations

import copy
import math
import warnings

import torch
from torch import nn

from ..entropy import SpatialEntropyLoss
from ..errors import ConfigError
from .encoder import Encoder, backbone_width, check_similarity

__all__ = ["DINO", "teacher_momentum", "projection_head"]

GLOBAL_VIEWS = 2  # the teacher's views, first in the list of views


def projection_head(in_dim: int, out_dim: int, hidden_dim: int, bottleneck_dim: int,
                    norm_last_layer: bool) -> nn.Module:
    """lightly's ``DINOProjectionHead`` without batch norm (DINO for ViT): ``(B, in_dim) -> (B, out_dim)``:
    3-layer MLP (GELU), L2 normalisation, weight-normalised linear layer without bias."""
    from lightly.models.modules import DINOProjectionHead

    with warnings.catch_warnings():  # lightly uses the legacy weight_norm (its keys: weight_g, weight_v)
        warnings.filterwarnings("ignore", message=".*weight_norm.*", category=FutureWarning)
        return DINOProjectionHead(in_dim, hidden_dim, bottleneck_dim, out_dim, batch_norm=False,
                                  norm_last_layer=norm_last_layer)


def teacher_momentum(step: int, total_steps: int, base: float = 0.996) -> float:
    """The teacher's EMA momentum at optimizer step ``step`` of ``total_steps``: cosine from
    ``base`` (step 0) to 1 (the last step, ``total_steps - 1``), lightly's ``cosine_schedule``."""
    from lightly.utils.scheduler import cosine_schedule

    if not 0.0 <= base <= 1.0:
        raise ConfigError(f"the teacher momentum must be in [0, 1] (DINO: 0.996), got {base!r}")
    if total_steps < 1 or not 0 <= step < total_steps:
        raise ValueError(f"step must be in [0, total_steps) with total_steps >= 1; got {step} of {total_steps}")
    return cosine_schedule(step, total_steps, base, 1.0)


def _check_options(out_dim: int, hidden_dim: int, bottleneck_dim: int, warmup_teacher_temp: float,
                   teacher_temp: float, warmup_teacher_temp_epochs: int, student_temp: float,
                   center_momentum: float) -> None:
    sizes = dict(out_dim=out_dim, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim)
    bad = {k: v for k, v in sizes.items() if not (isinstance(v, int) and v > 0)}
    if bad:
        raise ConfigError(f"the DINO head's sizes must be positive integers; got {bad}")
    temps = dict(warmup_teacher_temp=warmup_teacher_temp, teacher_temp=teacher_temp, student_temp=student_temp)
    bad = {k: v for k, v in temps.items() if not (math.isfinite(v) and v > 0)}
    if bad:
        raise ConfigError(f"DINO temperatures must be > 0 (DINO: teacher 0.04-0.07, student 0.1); got {bad}")
    if not (isinstance(warmup_teacher_temp_epochs, int) and warmup_teacher_temp_epochs >= 0):
        raise ConfigError(f"warmup_teacher_temp_epochs must be an integer >= 0, got {warmup_teacher_temp_epochs!r}")
    if not 0.0 <= center_momentum < 1.0:
        raise ConfigError(f"the centre momentum must be in [0, 1) (DINO: 0.9), got {center_momentum!r}")


class DINO(nn.Module):
    """Student and teacher of DINO around one backbone.

    Args:
        backbone: a model whose forward returns pooled features ``(B, C)`` (``num_classes=0``);
            a SAR-attached one (:func:`sarvit.attach`) for DINO + SAR. A ViT that sees
            global and local crops needs timm's ``dynamic_img_size=True``. The teacher
            gets a deep copy of it (so a SAR student has a SAR teacher).
        embed_dim: ``C``; by default the backbone's ``num_features``.
        out_dim, hidden_dim, bottleneck_dim, norm_last_layer: the projection head.
        warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, student_temp,
        center_momentum: the loss (lightly's ``DINOLoss``).

    The teacher never trains (``requires_grad=False``) and always runs in eval mode:
    DINO's teacher has no stochastic depth. ``state_dict()`` holds the student
    (``student.*``), the teacher (``teacher.*``) and the loss centre (``criterion.center``).
    """

    def __init__(self, backbone: nn.Module, *, embed_dim: int | None = None, out_dim: int = 65536,
                 hidden_dim: int = 2048, bottleneck_dim: int = 256, norm_last_layer: bool = True,
                 warmup_teacher_temp: float = 0.04, teacher_temp: float = 0.04,
                 warmup_teacher_temp_epochs: int = 0, student_temp: float = 0.1,
                 center_momentum: float = 0.9) -> None:
        from lightly.loss import DINOLoss
        from lightly.models.utils import deactivate_requires_grad

        super().__init__()
        _check_options(out_dim, hidden_dim, bottleneck_dim, warmup_teacher_temp, teacher_temp,
                       warmup_teacher_temp_epochs, student_temp, center_momentum)
        width = backbone_width(backbone, embed_dim)
        head = (width, out_dim, hidden_dim, bottleneck_dim)
        self.student = Encoder(backbone, projection_head(*head, norm_last_layer))
        # lightly's weight-normalised layer cannot be deep-copied: a new head, loaded with the student's weights
        teacher_head = projection_head(*head, norm_last_layer)
        teacher_head.load_state_dict(self.student.head.state_dict())
        self.teacher = Encoder(copy.deepcopy(backbone), teacher_head)
        deactivate_requires_grad(self.teacher)
        self.teacher.eval()
        self.criterion = DINOLoss(out_dim, warmup_teacher_temp=warmup_teacher_temp, teacher_temp=teacher_temp,
                                  warmup_teacher_temp_epochs=warmup_teacher_temp_epochs,
                                  student_temp=student_temp, center_momentum=center_momentum)
        self.se = SpatialEntropyLoss()

    def train(self, mode: bool = True) -> "DINO":
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, views: list[torch.Tensor], se_kind: str | None = None) -> dict:
        """Run the student on every view and the teacher on the first 2 (the global ones).

        Args:
            views: ``[global_1, global_2, local_1, ...]``, each ``(B, 3, h_v, w_v)``; the two
                global views share one size.
            se_kind: the kind of similarity map for SAR (``"dot"``, ...), or ``None``.

        Returns:
            ``{"student": [(B, out_dim) per view], "teacher": [(B, out_dim)] * 2}`` and, with
            ``se_kind``, ``"S"``: the student's maps of the 2 global views,
            ``(2B, heads, h, w)``, view 1's images then view 2's.
        """
        _check_views(views)
        check_similarity(self.student.backbone, se_kind)
        student, S = self._student(views, se_kind)
        with torch.no_grad():
            teacher, _ = self.teacher(torch.cat(views[:GLOBAL_VIEWS]))  # (2B, out_dim)
        out = {"student": list(student.chunk(len(views))), "teacher": list(teacher.chunk(GLOBAL_VIEWS))}
        if se_kind is not None:
            out["S"] = S
        return out

    def _student(self, views: list[torch.Tensor], se_kind: str | None):
        """Student outputs ``(V * B, out_dim)`` in view order, and the maps of the global views.

        As DINO's ``MultiCropWrapper``: one backbone pass per run of consecutive views of one
        size, one head pass over all the features."""
        features, maps, start = [], None, 0
        for run in _same_size_runs(views):
            kind = se_kind if start == 0 else None  # the first run holds the 2 global views
            f, S = self.student.features(torch.cat(views[start:start + run]), kind)  # (run * B, C)
            features.append(f)
            if S is not None:
                maps = S[: GLOBAL_VIEWS * views[0].shape[0]]  # (2B, heads, h, w): the global views only
            start += run
        return self.student.head(torch.cat(features)), maps  # (V * B, out_dim)

    def loss(self, outputs: dict, epoch: float, lam: float = 0.0) -> dict[str, torch.Tensor]:
        """``{"dino", "se" (with maps), "loss"}``, float32 scalars; ``loss = dino + lam * se``.

        ``epoch`` (fractional allowed) picks the teacher temperature. Updates the centre
        with the teacher outputs (call once per step)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch!r}")
        student = [s.float() for s in outputs["student"]]
        teacher = [t.float() for t in outputs["teacher"]]
        terms = {"dino": self.criterion(teacher, student, epoch=int(epoch))}
        loss = terms["dino"]
        if "S" in outputs:
            terms["se"] = self.se(outputs["S"])
            loss = loss + lam * terms["se"]
        terms["loss"] = loss
        return terms

    def teacher_temperature(self, epoch: float) -> float:
        """``tau_t`` at ``epoch``: DINO's per-epoch schedule (lightly's ``teacher_temp_schedule``)."""
        schedule = self.criterion.teacher_temp_schedule
        index = int(epoch)
        return float(schedule[index]) if index < len(schedule) else float(self.criterion.teacher_temp)

    def cancel_last_layer_gradients(self, epoch: float, freeze_last_layer: int = 1) -> None:
        """Drop the gradients of the head's last layer while ``epoch < freeze_last_layer``
        (DINO: 1), after ``backward`` and before the optimizer step."""
        if epoch >= freeze_last_layer:
            return
        for p in self.student.head.last_layer.parameters():
            p.grad = None

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """``w_t <- m w_t + (1 - m) w_s`` for every parameter (after the optimizer step)."""
        from lightly.models.utils import update_momentum

        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"the teacher momentum must be in [0, 1], got {momentum!r}")
        update_momentum(self.student, self.teacher, momentum)

    def backbone_for_evaluation(self) -> nn.Module:
        """The teacher's backbone: DINO evaluates (k-NN, linear probe) the teacher."""
        return self.teacher.backbone


def _check_views(views: list[torch.Tensor]) -> None:
    if len(views) < GLOBAL_VIEWS:
        raise ValueError(f"DINO needs at least the 2 global views, got {len(views)} view(s)")
    if views[0].shape != views[1].shape:
        raise ValueError(f"the 2 global views must have one shape; got {tuple(views[0].shape)} "
                         f"and {tuple(views[1].shape)}")
    if len({v.shape[0] for v in views}) != 1:
        raise ValueError(f"every view must hold the same images; batch sizes {[v.shape[0] for v in views]}")


def _same_size_runs(views: list[torch.Tensor]) -> list[int]:
    """Lengths of the runs of consecutive views of one spatial size: ``[2, 10]`` for 2 global
    and 10 local crops."""
    runs: list[int] = []
    for i, v in enumerate(views):
        if i > 0 and v.shape[-2:] == views[i - 1].shape[-2:]:
            runs[-1] += 1
        else:
            runs.append(1)
    return runs
