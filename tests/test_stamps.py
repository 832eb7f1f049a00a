"""The stamps benchmark: photograph rule, composition, masks, COCO records, determinism, folder safety."""

import errno
import hashlib
import inspect
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sarvit import cli
from sarvit.config import ConfigError
from sarvit.data import open_dataset
from sarvit.data.stamps import (
    CLASSES, DEFAULT_STAMPS_DIR, StampsNotFound, StampsWriteError, build_stamps, find_stamps, is_photograph,
    split_by_object,
)
from sarvit.data.stamps import build as build_module
from sarvit.data.stamps.coco import bbox, rle_encode
from sarvit.data.stamps.compose import compose, instance_mask, jitter_colours, semantic_mask

needs_stamps = pytest.mark.skipif(
    not DEFAULT_STAMPS_DIR.is_dir(),
    reason="Debian package tuxpaint-stamps-default not installed (scripts/install-system-deps.sh, run by make setup)",
)
SMALL = {"size": 64, "train_per_class": 2, "val_per_class": 2}


def _hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _rle_decode(rle: dict) -> np.ndarray:
    """COCO uncompressed RLE -> (H, W) bool, written out independently of the encoder."""
    h, w = rle["size"]
    flat = np.zeros(h * w, bool)
    position, value = 0, False
    for count in rle["counts"]:
        flat[position:position + count] = value
        position += count
        value = not value
    assert position == h * w
    return flat.reshape(w, h).T  # column-major


def _extent(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) inclusive, from the coordinates of the true pixels."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Two builds with seed 0 (the first into an existing empty folder) and one with seed 1."""
    root = tmp_path_factory.mktemp("stamps")
    (root / "a" / "stamps").mkdir(parents=True)
    summaries = {
        "a": build_stamps(root / "a" / "stamps", seed=0, **SMALL),
        "b": build_stamps(root / "b" / "stamps", seed=0, **SMALL),
        "c": build_stamps(root / "c" / "stamps", seed=1, **SMALL),
    }
    return root, summaries


# --- pure parts, no Debian package needed ------------------------------------------------


def test_rle_hand_computed():
    mask = np.array([[0, 1, 1], [1, 1, 0]], bool)  # column-major: 0 1 | 1 1 | 1 0
    assert rle_encode(mask) == {"size": [2, 3], "counts": [1, 4, 1]}
    starts_with_one = np.array([[1, 0], [1, 1]], bool)  # column-major: 1 1 | 0 1
    assert rle_encode(starts_with_one)["counts"] == [0, 2, 1, 1]  # an empty run of 0s first
    assert rle_encode(np.zeros((2, 2), bool))["counts"] == [4]
    rng = np.random.default_rng(0)
    for _ in range(5):
        m = rng.random((7, 5)) < 0.4
        assert np.array_equal(_rle_decode(rle_encode(m)), m)


def test_bbox_hand_computed():
    mask = np.zeros((6, 8), bool)
    mask[2, 3] = mask[4, 6] = True
    assert bbox(mask) == [3, 2, 4, 3]  # x, y, width, height
    with pytest.raises(ValueError):
        bbox(np.zeros((3, 3), bool))


def test_mask_thresholds():
    alpha = np.array([[0, 1, 127, 128, 254, 255]], np.uint8)
    assert semantic_mask(alpha, 4).tolist() == [[0, 255, 255, 255, 255, 4]]
    assert instance_mask(alpha).tolist() == [[False, False, False, True, True, True]]


def test_jitter_matches_torchvision():
    import torchvision.transforms.functional as F

    rng = np.random.default_rng(1)
    rgb = rng.random((9, 7, 3))
    factors = (1.2, 0.8, 1.1)
    ours = jitter_colours(rgb, np.ones((9, 7)), *factors)
    img = torch.from_numpy(rgb).permute(2, 0, 1)  # (3, H, W)
    ref = F.adjust_saturation(F.adjust_contrast(F.adjust_brightness(img, factors[0]), factors[1]), factors[2])
    np.testing.assert_allclose(ours, ref.permute(1, 2, 0).numpy(), atol=1e-6)


def test_compose_keeps_the_background_outside_the_object():
    rng = np.random.default_rng(0)
    background = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    stamp = np.zeros((20, 30, 4), np.uint8)
    stamp[..., :3] = 200
    stamp[4:16, 5:25, 3] = 255  # an opaque rectangle inside a transparent margin
    stamp[3, 5:25, 3] = 100  # a soft edge
    out = compose(background, stamp, np.random.default_rng(3))
    outside = out.alpha == 0
    assert out.image.shape == (48, 48, 3) and out.alpha.dtype == np.uint8
    assert np.array_equal(out.image[outside], background[outside])
    assert (out.alpha == 255).any() and ((out.alpha > 0) & (out.alpha < 255)).any()
    assert not np.array_equal(out.image[~outside], background[~outside])


def _png(path: Path, rgba: np.ndarray, mode: str | None = None) -> Path:
    image = Image.fromarray(rgba, "RGBA")
    (image.convert(mode) if mode else image).save(path)
    return path


def test_photograph_rule_on_synthetic_images(tmp_path):
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (60, 60, 4), dtype=np.uint8)
    photo[..., 3] = 255
    photo[:5, :, 3] = 120  # a few soft pixels
    assert is_photograph(_png(tmp_path / "photo.png", photo))
    drawing = np.zeros((60, 60, 4), np.uint8)
    drawing[:30] = (255, 0, 0, 255)
    drawing[30:] = (0, 0, 255, 255)
    assert not is_photograph(_png(tmp_path / "drawing.png", drawing))  # two colours
    assert not is_photograph(_png(tmp_path / "quantised.png", photo, "P"))  # a palette image
    assert not is_photograph(_png(tmp_path / "small.png", photo[:20]))  # shorter side 20 < 32
    soft = photo.copy()
    soft[..., 3] = 128
    assert not is_photograph(_png(tmp_path / "soft.png", soft))  # all edge, no exact mask
    _png(tmp_path / "vector.png", photo)
    (tmp_path / "vector.svg").write_text("<svg/>")
    assert not is_photograph(tmp_path / "vector.png")  # a rendering of a drawing


def test_options_are_range_checked(tmp_path):
    for bad in ({"size": 16}, {"size": 4096}, {"seed": -1}, {"train_per_class": 0}, {"val_per_class": 2.5},
                {"train_per_class": True}):
        with pytest.raises(ConfigError, match="must be an integer in"):
            build_stamps(tmp_path / "out", **bad)
    assert not (tmp_path / "out").exists()


def test_missing_package_names_it(tmp_path):
    with pytest.raises(StampsNotFound, match=r"tuxpaint-stamps-default.*install-system-deps\.sh"):
        build_stamps(tmp_path / "out", stamps_dir=tmp_path / "nowhere", **SMALL)


def test_cli_refuses_a_non_empty_output(tmp_path, capsys):
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert cli.main(["data", "stamps", "--output", str(out), "--size", "64"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    assert cli.main(["data", "stamps", "--output", str(tmp_path / "new"), "--size", "8"]) == 2
    assert "--size must be an integer in [32, 1024]" in capsys.readouterr().err


def test_cli_help_states_the_library_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["data", "stamps", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, p in inspect.signature(build_stamps).parameters.items():
        if name != "output":
            found = re.search(rf"--{name.replace('_', '-')} \S+ [^(]*\(default: ([^)]*)\)", text)
            assert found and found.group(1) == str(p.default), name


# --- builds from the Debian package ------------------------------------------------------


@needs_stamps
def test_known_stamps():
    photos = ("animals/mammals/elephant.png", "animals/birds/owl.png", "food/fruit/kiwi.png", "plants/flowers/iris.png")
    drawings = ("food/pizza.png", "animals/mammals/hedgehog.png", "animals/mammals/echidna.png",
                "plants/flowers/flower1.png", "animals/insects/bee.png")
    assert all(is_photograph(DEFAULT_STAMPS_DIR / p) for p in photos)
    assert not any(is_photograph(DEFAULT_STAMPS_DIR / p) for p in drawings)


@pytest.fixture(scope="module")
def catalogue():
    return find_stamps(DEFAULT_STAMPS_DIR)


@needs_stamps
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_by_object_over_the_whole_catalogue(catalogue, seed):
    stamps = catalogue
    assert not any("/cartoon/" in s.name for s in stamps)
    split = split_by_object(stamps, seed, len(CLASSES))
    first_word = lambda name: re.match(r"[a-z]*", Path(name).stem.lower()).group(0)  # noqa: E731
    for label in range(len(CLASSES)):
        train, val = ({s.name for s in split[k][label]} for k in ("train", "val"))
        assert len(train) >= 2 and len(val) >= 1
        assert not train & val
        assert not {first_word(n) for n in train} & {first_word(n) for n in val}
        assert train | val == {s.name for s in stamps if s.label == label}


@needs_stamps
def test_same_seed_same_bytes(built):
    root, _ = built
    a, b, c = (_hashes(root / k / "stamps") for k in "abc")
    assert a == b
    assert len(a) == 7 * (2 + 2 + 2 + 2 + 2) + 3  # train, val, images/ and masks/ of val, train_masks/; 3 other files
    assert set(a) == set(c)
    assert all(a[k] != c[k] for k in a if k != "classes.txt")  # every image, mask and record depends on the seed


@needs_stamps
def test_interrupted_or_failing_builds_leave_nothing(tmp_path, monkeypatch):
    calls = []

    def interrupt(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    real = build_module.compose
    monkeypatch.setattr(build_module, "compose", interrupt)
    with pytest.raises(KeyboardInterrupt):
        build_stamps(tmp_path / "out", **SMALL)
    assert list(tmp_path.iterdir()) == []

    def full_disk(array):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(build_module, "compose", real)
    monkeypatch.setattr(build_module, "_png", full_disk)
    with pytest.raises(StampsWriteError, match="No space left"):
        build_stamps(tmp_path / "out", **SMALL)
    assert list(tmp_path.iterdir()) == []


@needs_stamps
def test_image_folder_and_split_by_object(built):
    root, summaries = built
    folder = root / "a" / "stamps"
    train, val = open_dataset(str(folder), split="train"), open_dataset(str(folder), split="val")
    names = [c.name for c in CLASSES]
    assert train.classes == names and val.classes == names
    assert np.bincount(train.targets).tolist() == [2] * 7 and np.bincount(val.targets).tolist() == [2] * 7
    image, _ = val.dataset[0]
    assert image.size == (64, 64) and image.mode == "RGB"
    coco = json.loads((folder / "annotations.json").read_text())
    split_of = {im["id"]: im["split"] for im in coco["images"]}
    used = {"train": set(), "val": set()}
    for ann in coco["annotations"]:
        used[split_of[ann["image_id"]]].add(ann["stamp"])
    assert used["train"] and used["val"] and not used["train"] & used["val"]
    assert summaries["a"].objects == summaries["b"].objects


@needs_stamps
def test_masks_hold_the_class_of_their_folder(built):
    root, _ = built
    folder = root / "a" / "stamps"
    classes = sorted(p.name for p in (folder / "val").iterdir())  # ImageFolder's order
    assert (folder / "classes.txt").read_text().split() == ["background", *classes]
    stems = sorted(p.stem for p in (folder / "masks").iterdir())
    assert stems == sorted(p.stem for p in (folder / "images").iterdir()) and len(stems) == 14
    for path in sorted((folder / "val").glob("*/*.png")):
        class_id = classes.index(path.parent.name) + 1
        assert (folder / "images" / path.name).read_bytes() == path.read_bytes()
        mask_image = Image.open(folder / "masks" / path.name)
        assert mask_image.mode == "L" and mask_image.size == (64, 64)
        values = set(np.unique(np.asarray(mask_image)).tolist())
        assert values <= {0, class_id, 255} and {0, class_id, 255} <= values


@needs_stamps
def test_train_masks_hold_the_class_of_their_folder_and_match_the_coco_instances(built):
    """train_masks/ (for `sarvit segment --data masks:DIR`): one class mask per training image, whose
    object pixels (class id) lie inside the COCO instance and whose instance lies inside class + void."""
    root, _ = built
    folder = root / "a" / "stamps"
    classes = sorted(p.name for p in (folder / "train").iterdir())
    train = sorted((folder / "train").glob("*/*.png"))
    assert sorted(p.name for p in (folder / "train_masks").iterdir()) == sorted(p.name for p in train)
    coco = json.loads((folder / "annotations.json").read_text())
    instance_of = {im["file_name"]: a for im in coco["images"] for a in coco["annotations"] if a["image_id"] == im["id"]}
    for path in train:
        class_id = classes.index(path.parent.name) + 1
        mask = np.asarray(Image.open(folder / "train_masks" / path.name))
        assert mask.shape == (64, 64) and set(np.unique(mask).tolist()) == {0, class_id, 255}
        instance = _rle_decode(instance_of[path.relative_to(folder).as_posix()]["segmentation"])
        assert not ((mask == class_id) & ~instance).any() and not (instance & (mask == 0)).any()


@needs_stamps
def test_coco_boxes_and_masks_match_the_class_masks(built):
    root, _ = built
    folder = root / "a" / "stamps"
    coco = json.loads((folder / "annotations.json").read_text())
    assert [c["name"] for c in coco["categories"]] == [c.name for c in CLASSES]
    assert [c["id"] for c in coco["categories"]] == list(range(1, 8))
    images = {im["id"]: im for im in coco["images"]}
    assert len(images) == 28 and len(coco["annotations"]) == 28
    for ann in coco["annotations"]:
        image = images[ann["image_id"]]
        assert (folder / image["file_name"]).is_file() and ann["iscrowd"] == 0
        assert image["file_name"].split("/")[1] == coco["categories"][ann["category_id"] - 1]["name"]
        instance = _rle_decode(ann["segmentation"])
        assert instance.shape == (image["height"], image["width"]) == (64, 64)
        x0, y0, x1, y1 = _extent(instance)
        assert ann["bbox"] == [x0, y0, x1 - x0 + 1, y1 - y0 + 1] and ann["area"] == int(instance.sum())
        if image["split"] != "val":
            continue
        mask = np.asarray(Image.open(folder / "masks" / Path(image["file_name"]).name))
        exact, visible = mask == ann["category_id"], mask > 0  # visible: the class and the void edge
        assert not (instance & ~visible).any() and not (exact & ~instance).any()
        ex0, ey0, ex1, ey1 = _extent(exact)
        vx0, vy0, vx1, vy1 = _extent(visible)
        assert vx0 <= x0 <= ex0 and vy0 <= y0 <= ey0 and ex1 <= x1 <= vx1 and ey1 <= y1 <= vy1


@needs_stamps
def test_readme_states_source_licence_classes_counts_and_seed(built):
    root, summaries = built
    text = (root / "c" / "stamps" / "README.md").read_text()
    assert "tuxpaint-stamps-default" in text and "GPL" in text and "scikit-image" in text
    assert "sarvit data stamps --output stamps --seed 1 --size 64 --train-per-class 2 --val-per-class 2" in text
    for i, name in enumerate(summaries["c"].classes):
        objects = summaries["c"].objects
        row = f"| {i + 1} | {name} |"
        assert row in text
        line = next(ln for ln in text.splitlines() if ln.startswith(row))
        assert line.endswith(f"| {len(objects['train'][i])} | {len(objects['val'][i])} | 2 | 2 |")
