"""Scores of the dense tasks against hand-computed cases."""

import math

import pytest
import torch

from sarvit.dense.metrics import DetectionScore, confusion_matrix, iou_from_confusion, mean_iou


def _square(x0, y0, x1, y1, size=20):
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _one(box, label=1, masks=None, score=None):
    out = {"boxes": torch.tensor([box], dtype=torch.float32), "labels": torch.tensor([label])}
    if score is not None:
        out["scores"] = torch.tensor([score])
    if masks is not None:
        out["masks"] = masks[None]
    return out


def test_a_perfect_prediction_scores_one_for_boxes_and_masks():
    score = DetectionScore(masks=True)
    truth = [_one([2, 3, 12, 13], 1, _square(2, 3, 12, 13)), _one([5, 5, 15, 9], 2, _square(5, 5, 15, 9))]
    preds = [{**t, "scores": torch.tensor([0.9]), "masks": t["masks"][:, None].float()} for t in truth]
    score.update(preds, truth)
    out = score.compute()
    assert out["map"] == pytest.approx(1.0) and out["map_50"] == pytest.approx(1.0)
    assert out["mask_map"] == pytest.approx(1.0) and out["mask_map_50"] == pytest.approx(1.0)


@pytest.mark.parametrize("shift,iou", [(2, 80 / 120), (5, 50 / 150)])
def test_a_shifted_box_scores_the_thresholds_its_iou_passes(shift, iou):
    """A 10x10 box shifted by ``shift`` px: IoU (10 - s) * 10 / ((10 + s) * 10) by hand; one object,
    one detection, so AP at a threshold is 1 when IoU >= it and 0 otherwise."""
    assert iou == pytest.approx((10 - shift) / (10 + shift))
    score = DetectionScore()
    score.update([_one([shift, 0, 10 + shift, 10], score=0.8)], [_one([0, 0, 10, 10])])
    out = score.compute()
    thresholds = [0.5 + 0.05 * i for i in range(10)]
    assert out["map_50"] == pytest.approx(1.0 if iou >= 0.5 else 0.0)
    assert out["map_75"] == pytest.approx(0.0)
    assert out["map"] == pytest.approx(sum(iou >= t - 1e-9 for t in thresholds) / 10)


def test_a_difficult_object_is_neither_hit_nor_missed():
    """VOC's difficult objects go in as crowd regions: a detection on one is no false positive,
    and missing one is no miss."""
    truth = {"boxes": torch.tensor([[0.0, 0, 10, 10], [30, 30, 40, 40]]), "labels": torch.tensor([1, 1]),
             "iscrowd": torch.tensor([0, 1])}
    found_both = {"boxes": torch.tensor([[0.0, 0, 10, 10], [30, 30, 40, 40]]), "scores": torch.tensor([0.5, 0.9]),
                  "labels": torch.tensor([1, 1])}
    score = DetectionScore()
    score.update([found_both], [truth])
    assert score.compute()["map_50"] == pytest.approx(1.0)


def test_confusion_and_miou_by_hand():
    target = torch.tensor([[0, 0, 1, 1],
                           [0, 2, 2, 255]])
    pred = torch.tensor([[0, 1, 1, 1],
                         [0, 2, 0, 2]])
    confusion = confusion_matrix(pred, target, 3)
    # rows: truth, columns: prediction; the 255 pixel counts nowhere
    assert confusion.tolist() == [[2, 1, 0], [0, 2, 0], [1, 0, 1]]
    iou = iou_from_confusion(confusion)
    # class 0: TP 2, FP 1 (a 2 predicted 0), FN 1 -> 2/4; class 1: TP 2, FP 1 -> 2/3; class 2: TP 1, FN 1 -> 1/2
    assert iou.tolist() == pytest.approx([2 / 4, 2 / 3, 1 / 2])
    assert mean_iou(confusion) == pytest.approx((2 / 4 + 2 / 3 + 1 / 2) / 3)


def test_a_class_absent_from_truth_and_prediction_is_left_out_of_the_mean():
    target = torch.tensor([[0, 1], [1, 0]])
    confusion = confusion_matrix(target, target, 4)
    assert math.isnan(iou_from_confusion(confusion)[3].item())
    assert mean_iou(confusion) == pytest.approx(1.0)


def test_an_out_of_range_class_id_is_refused():
    with pytest.raises(ValueError, match="class ids must be in"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 7]), 3)
