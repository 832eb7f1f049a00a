"""Readers of the dense tasks on tiny trees written here, their missing-file errors, and the joint transforms."""

import numpy as np
import pytest
import torch
from PIL import Image

from sarvit.dense.datasets import DenseSamples, dense_transform, open_detection, open_segmentation
from sarvit.data.sources import DatasetNotFound
from sarvit.errors import UserError
from tests.dense_fixtures import squares, write_coco, write_masks

VOC_XML = """<annotation><size><width>48</width><height>40</height></size>
<object><name>dog</name><difficult>0</difficult><bndbox><xmin>3</xmin><ymin>5</ymin><xmax>20</xmax><ymax>30</ymax></bndbox></object>
<object><name>cat</name><difficult>1</difficult><bndbox><xmin>30</xmin><ymin>1</ymin><xmax>40</xmax><ymax>9</ymax></bndbox></object>
</annotation>"""


def write_voc2007(root):
    base = root / "VOCdevkit" / "VOC2007"
    for name in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (base / name).mkdir(parents=True)
    for stem in ("000001", "000002"):
        Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(base / "JPEGImages" / f"{stem}.jpg")
        (base / "Annotations" / f"{stem}.xml").write_text(VOC_XML)
    (base / "ImageSets/Main/trainval.txt").write_text("000001\n")
    (base / "ImageSets/Main/test.txt").write_text("000002\n")
    return base


def test_voc2007_boxes_classes_and_difficult_objects(tmp_path):
    write_voc2007(tmp_path)
    train, val = open_detection("voc2007", str(tmp_path), "train"), open_detection("voc2007", str(tmp_path), "val")
    assert len(train.classes) == 20 and train.classes[11] == "dog" and not train.masks
    (_, objects), = train.items
    assert [(o.box, o.label) for o in objects] == [([2, 4, 20, 30], 12)]  # 1-based inclusive -> [x0-1, y0-1, x1, y1]
    (_, objects), = val.items  # validation keeps the difficult cat, as a crowd region
    assert [(o.label, o.crowd) for o in objects] == [(12, False), (8, True)]


def test_voc2007_missing_files_name_where_it_looked(tmp_path):
    with pytest.raises(DatasetNotFound, match="PASCAL VOC 2007 not found.*Annotations/ and JPEGImages/"):
        open_detection("voc2007", str(tmp_path), "train")
    base = write_voc2007(tmp_path)
    (base / "JPEGImages" / "000002.jpg").unlink()
    with pytest.raises(DatasetNotFound, match="000002.jpg"):
        open_detection("voc2007", str(tmp_path), "val")
    (base / "ImageSets/Main/trainval.txt").unlink()
    with pytest.raises(DatasetNotFound, match="trainval.txt is missing"):
        open_detection("voc2007", str(tmp_path), "train")


@pytest.mark.parametrize("shared", [True, False])
def test_coco_json_reader_decodes_rle_masks(tmp_path, shared):
    root = write_coco(tmp_path / "coco", train=3, val=2, shared=shared)
    train = open_detection(f"coco_json:{root}", None, "train")
    assert len(train) == 3 and train.classes == ["red", "green", "blue"] and train.masks
    samples = DenseSamples(train, lambda image, target: (image, target), seed=0, masks=True)
    image, target = samples[(0, 1)]
    _, objects = squares(1)  # what the writer drew for image 1
    assert target["labels"].tolist() == [label for label, _ in objects]
    for mask, (_, drawn) in zip(target["masks"], objects):
        assert torch.equal(mask.bool(), torch.from_numpy(drawn))
        ys, xs = np.nonzero(drawn)
    assert target["boxes"][-1].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_coco_json_missing_files(tmp_path):
    with pytest.raises(DatasetNotFound, match="no such folder"):
        open_detection(f"coco_json:{tmp_path / 'absent'}", None, "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFound, match="annotations_train.json.*annotations.json"):
        open_detection(f"coco_json:{tmp_path / 'empty'}", None, "train")
    root = write_coco(tmp_path / "coco", train=2, val=1)
    (root / "images" / "0.png").unlink()
    with pytest.raises(DatasetNotFound, match="0.png"):
        open_detection(f"coco_json:{root}", None, "train")
    with pytest.raises(DatasetNotFound, match="no detection dataset"):
        open_detection("voc2012", None, "train")


def test_masks_folder_reader_and_its_errors(tmp_path):
    root = write_masks(tmp_path / "m", train=3, val=2)
    train, classes = open_segmentation(f"masks:{root}", None, "train")
    val, _ = open_segmentation(f"masks:{root}", None, "val")
    assert classes == ["background", "red", "green", "blue"] and len(train) == 3 and len(val) == 2
    (root / "train_images" / "s0.png").unlink()
    with pytest.raises(DatasetNotFound, match="have no image.*s0"):
        open_segmentation(f"masks:{root}", None, "train")
    (root / "classes.txt").unlink()
    with pytest.raises(DatasetNotFound, match="classes.txt is missing"):
        open_segmentation(f"masks:{root}", None, "val")


def test_eval_transform_resizes_the_longer_side_and_pads_boxes_masks_and_void(tmp_path):
    """A 40x48 image to 24: scale 0.5, padded at the bottom to 24x24 (class masks with 255)."""
    root = write_coco(tmp_path / "coco", train=1, val=1)
    val = open_detection(f"coco_json:{root}", None, "val")
    image, target = DenseSamples(val, dense_transform(24, False, semantic=False), 0, masks=True)[(0, 0)]
    assert image.shape == (3, 24, 24) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    _, objects = squares(1)
    ys, xs = np.nonzero(objects[-1][1])
    expected = [xs.min() / 2, ys.min() / 2, (xs.max() + 1) / 2, (ys.max() + 1) / 2]
    assert target["boxes"][-1].tolist() == pytest.approx(expected)
    assert image[:, 20:].abs().sum() == 0 and target["masks"][:, 20:].sum() == 0  # 40 * 0.5 = 20 rows, then padding
    masks_root = write_masks(tmp_path / "m", train=1, val=1)
    images, _ = open_segmentation(f"masks:{masks_root}", None, "val")
    _, mask = DenseSamples(images, dense_transform(24, False, semantic=True), 0)[(0, 0)]
    assert mask.shape == (24, 24) and (mask[20:] == 255).all() and (mask[0] == 255).all()


def test_train_transform_keeps_boxes_on_their_masks_and_is_seeded(tmp_path):
    root = write_coco(tmp_path / "coco", train=4, val=1)
    samples = DenseSamples(open_detection(f"coco_json:{root}", None, "train"), dense_transform(32, True, False), 3, True)
    for i in range(4):
        image, target = samples[(1, i)]
        again, _ = samples[(1, i)]
        assert image.shape == (3, 32, 32) and torch.equal(image, again)
        for box, mask in zip(target["boxes"], target["masks"]):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            extent = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
            assert box.tolist() == pytest.approx(extent, abs=1.0)


def test_an_unreadable_annotation_is_a_user_error(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "annotations_train.json").write_text("{not json")
    with pytest.raises(UserError, match="not a COCO instances file"):
        open_detection(f"coco_json:{root}", None, "train")
