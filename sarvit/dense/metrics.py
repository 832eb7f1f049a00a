"""Scores of the dense tasks: COCO mAP and VOC mAP@0.5 of boxes and masks, mIoU of class maps.

Detection (Table 5) is scored with torchmetrics' ``MeanAveragePrecision`` (pycocotools
backend: COCO's 101-point interpolated AP): ``map`` is COCO's mAP@[0.5:0.95], ``map_50``
the AP at IoU 0.5, the PASCAL VOC criterion. Segmentation (Table 6) is scored by the mean
over classes of IoU = TP / (TP + FP + FN), from a confusion matrix summed over the images;
pixels labelled ``ignore_index`` (255, VOC's void) count nowhere, and a class absent from
both the predictions and the ground truth is left out of the mean.
"""

from __future__ import annotations

import torch

__all__ = ["DetectionScore", "confusion_matrix", "iou_from_confusion", "mean_iou", "IGNORE_INDEX"]

IGNORE_INDEX = 255


class DetectionScore:
    """Accumulates detections and ground truth of images; ``compute()`` gives COCO and VOC mAP.

    ``update(predictions, targets)`` takes torchvision's lists of dicts: predictions with
    ``boxes`` ``(N, 4)`` xyxy pixels, ``scores`` ``(N,)``, ``labels`` ``(N,)`` and, with
    masks, ``masks`` ``(N, 1, H, W)`` probabilities (thresholded at 0.5, as torchvision's
    Mask R-CNN intends) or ``(N, H, W)`` booleans; targets with ``boxes``, ``labels``,
    optionally ``iscrowd`` (regions neither hit nor missed: VOC's difficult objects) and,
    with masks, ``masks`` ``(M, H, W)``.

    ``compute()`` -> ``{"map", "map_50", "map_75"}`` of the boxes and, with masks, the same
    with the prefix ``mask_``; ``-1`` where no ground truth was seen (torchmetrics' value).
    """

    def __init__(self, masks: bool = False) -> None:
        from torchmetrics.detection import MeanAveragePrecision

        self.masks = masks
        self.box = MeanAveragePrecision(iou_type="bbox", backend="pycocotools")
        self.segm = MeanAveragePrecision(iou_type="segm", backend="pycocotools") if masks else None

    def update(self, predictions: list[dict], targets: list[dict]) -> None:
        preds = [{k: p[k].detach().cpu() for k in ("boxes", "scores", "labels")} for p in predictions]
        truth = [{k: t[k].detach().cpu() for k in ("boxes", "labels", "iscrowd") if k in t} for t in targets]
        self.box.update(preds, truth)
        if self.segm is not None:
            pm = [{**p, "masks": _binary(q["masks"])} for p, q in zip(preds, predictions)]
            tm = [{**t, "masks": _binary(q["masks"])} for t, q in zip(truth, targets)]
            self.segm.update(pm, tm)

    def compute(self) -> dict[str, float]:
        out = _selected(self.box.compute(), "")
        if self.segm is not None:
            out.update(_selected(self.segm.compute(), "mask_"))
        return out


def _binary(masks: torch.Tensor) -> torch.Tensor:
    """``(N, 1, H, W)`` probabilities or ``(N, H, W)`` -> ``(N, H, W)`` bool."""
    masks = masks.detach().cpu()
    if masks.dim() == 4:
        masks = masks[:, 0]  # (N, H, W)
    return masks > 0.5 if masks.is_floating_point() else masks.bool()


def _selected(result: dict, prefix: str) -> dict[str, float]:
    return {f"{prefix}{k}": float(result[k]) for k in ("map", "map_50", "map_75")}


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``(..., H, W)`` class ids, ``(..., H, W)`` ground truth -> ``(C, C)`` int64 counts,
    row = ground-truth class, column = predicted class; ``ignore_index`` pixels are left out."""
    keep = target != ignore_index
    t, p = target[keep].long(), pred[keep].long()  # (n,)
    if t.numel() and (t.min() < 0 or t.max() >= num_classes):
        raise ValueError(f"ground-truth class ids must be in [0, {num_classes}) or {ignore_index}; "
                         f"found {int(t.min())}..{int(t.max())}")
    return torch.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def iou_from_confusion(confusion: torch.Tensor) -> torch.Tensor:
    """``(C, C)`` -> ``(C,)`` float64 IoU per class, NaN for a class neither predicted nor present."""
    confusion = confusion.double()
    tp = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - tp  # TP + FP + FN
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))


def mean_iou(confusion: torch.Tensor) -> float:
    """The mean of :func:`iou_from_confusion` over the classes that have one."""
    iou = iou_from_confusion(confusion)
    seen = ~iou.isnan()
    return float(iou[seen].mean()) if seen.any() else float("nan")
