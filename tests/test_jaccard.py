"""The Jaccard protocol of Table 11: hand-computed cases, the mask readers, the command."""

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sarvit
from sarvit.analysis import jaccard, object_ious, summarise
from sarvit.analysis.scoring import ImageScore
from sarvit.checkpoint import save_weights
from sarvit.cli import main
from sarvit.data.masks import open_masked
from sarvit.errors import UserError

# 2 x 2 grid of 2-pixel patches. Head 0 keeps patch (0, 0); head 1 patches (1, 0) and (1, 1);
# head 2 the top row. (Ascending cumsums: 0.1, 0.2, 0.3, 1.0 / 0.1, 0.2, 0.6, 1.0 > 0.4.)
ATTN = np.array([
    [[0.7, 0.1], [0.1, 0.1]],
    [[0.1, 0.1], [0.4, 0.4]],
    [[0.4, 0.4], [0.1, 0.1]],
])
MASK = np.array([
    [3, 3, 0, 0],
    [3, 255, 0, 0],
    [5, 5, 5, 0],
    [0, 0, 0, 0],
])


def test_hand_computed_classes_void_and_best_head():
    # class 3 (3 pixels): head 0 covers them and the void pixel: 3 / 4 (void counted), 3 / 3 (void fix);
    # head 2 covers the top row: 3 / 8 -> head 0 wins. Class 5 (3 pixels): head 1, 3 / 8 in both modes.
    assert object_ious(ATTN, MASK, 2) == {3: 0.75, 5: 0.375}
    assert object_ious(ATTN, MASK, 2, void_fix=True) == {3: 1.0, 5: 0.375}
    assert jaccard(ATTN, MASK, 2) == pytest.approx((0.75 + 0.375) / 2)
    assert jaccard(torch.tensor(ATTN), MASK, 2, void_fix=True) == pytest.approx((1.0 + 0.375) / 2)
    # without head 0, class 3 falls to head 2 (3 / 8, or 3 / 7 with the void pixel left out)
    assert object_ious(ATTN[1:], MASK, 2) == {3: 0.375, 5: 0.375}
    assert object_ious(ATTN[1:], MASK, 2, void_fix=True) == {3: 3 / 7, 5: 0.375}


def test_image_without_objects_counts_nothing():
    empty = np.where(MASK == 255, 255, 0)
    assert object_ious(ATTN, empty, 2) == {} and math.isnan(jaccard(ATTN, empty, 2))
    summary = summarise([ImageScore("a", {3: 0.75, 5: 0.375}), ImageScore("b", {}), ImageScore("c", {1: 0.5})], False)
    assert (summary.images, summary.images_scored, summary.objects) == (3, 2, 3)
    assert summary.jaccard == pytest.approx((0.5625 + 0.5) / 2)
    assert "published" in summary.void_mode


def test_mask_must_cover_the_grid():
    with pytest.raises(ValueError, match="does not cover a 2x2 grid"):
        jaccard(ATTN, MASK[:3], 2)


def palette_png(path: Path, mask: np.ndarray) -> None:
    im = Image.fromarray(mask.astype(np.uint8), mode="P")
    im.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    im.save(path)


def test_voc_layout_reads_palette_indices(tmp_path):
    base = tmp_path / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / sub).mkdir(parents=True)
    mask = np.zeros((20, 30), dtype=np.uint8)
    mask[5:10, 5:15], mask[4, 5:15] = 15, 255
    for stem in ("2007_000001", "2007_000002"):
        Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(base / "JPEGImages" / f"{stem}.jpg")
        palette_png(base / "SegmentationClass" / f"{stem}.png", mask)
    (base / "ImageSets/Segmentation/val.txt").write_text("2007_000001\n2007_000002\n")
    for root in (tmp_path, tmp_path / "VOCdevkit", base):
        data = open_masked("voc2012", str(root))
        stem, image, read = data[1]
        assert stem == "2007_000002" and image.size == (30, 20) and data.class_names[15] == "person"
        np.testing.assert_array_equal(read, mask)
    (base / "ImageSets/Segmentation/val.txt").write_text("2007_000001\n2007_000003\n")
    with pytest.raises(UserError, match="2007_000003.jpg"):
        open_masked("voc2012", str(tmp_path))
    with pytest.raises(UserError, match=str(tmp_path / "elsewhere" / "VOC2012")):
        open_masked("voc2012", str(tmp_path / "elsewhere"))


def masked_folder(root: Path, count: int = 4, size: int = 40) -> Path:
    """images/ + masks/: a square object of class 3 (and one of class 7) on a random image;
    the last image has no object."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(count):
        mask = np.zeros((size, size + 8), np.uint8)
        if i < count - 1:
            mask[8:24, 10:26], mask[7, 10:26], mask[30:36, 2 + i:12 + i] = 3, 255, 7
        Image.fromarray(rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)).save(root / "images" / f"s{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"s{i}.png")
    return root


def test_folder_layout_errors_name_the_files(tmp_path):
    root = masked_folder(tmp_path / "d")
    assert len(open_masked(str(root))) == 4
    (root / "masks" / "s1.png").unlink()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "masks" / "extra.png")
    with pytest.raises(UserError, match=r"images without a mask.*s1.*masks without an image.*extra"):
        open_masked(str(root))
    root = masked_folder(tmp_path / "e")
    Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(root / "masks" / "s0.png")
    with pytest.raises(UserError, match="s0.png is a RGB image"):
        open_masked(str(root))[0]
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "masks" / "s0.png")
    with pytest.raises(UserError, match="a mask must have its image's size"):
        open_masked(str(root))[0]


def reference_scores(model, data: Path, size: int, void_fix: bool) -> dict[str, float]:
    """Every step written out again: resize, timm's own attention, DINO's rule, IoU loops."""
    from torchvision.transforms import functional as TF

    patch, out = 8, {}
    block = model.blocks[-1]
    for image_path in sorted((data / "images").iterdir()):
        img = Image.open(image_path).convert("RGB").resize((size, size), Image.BILINEAR)
        x = TF.normalize(TF.to_tensor(img), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))[None]
        seen = {}
        h1 = block.register_forward_pre_hook(lambda _m, a: seen.setdefault("x", a[0]))
        with torch.no_grad():
            model.eval()
            model.forward_features(x)
            h1.remove()
            block.attn.fused_attn = False
            h2 = block.attn.attn_drop.register_forward_hook(lambda _m, _i, o: seen.setdefault("A", o))
            block.attn(block.norm1(seen["x"]))
            h2.remove()
        attn = seen["A"][0, :, 0, 1:].numpy()  # (heads, n)
        grid = size // patch
        mask = np.array(Image.open(data / "masks" / image_path.name).resize((size, size), Image.NEAREST)).astype(int)
        ious = []
        for c in sorted(set(np.unique(mask)) - {0, 255}):
            best = 0.0
            for a in attn:
                order = np.argsort(a, kind="stable")
                keep = np.zeros(a.size, bool)
                keep[order] = np.cumsum(a[order] / a.sum()) > 0.4
                pred = np.kron(keep.reshape(grid, grid), np.ones((patch, patch), int)).astype(bool)
                valid = mask != 255 if void_fix else np.ones_like(pred)
                best = max(best, (pred & (mask == c)).sum() / ((pred | (mask == c)) & valid).sum())
            ious.append(best)
        out[image_path.stem] = float(np.mean(ious)) if ious else math.nan
    return out


@pytest.mark.parametrize("void_fix", [False, True])
def test_jaccard_command_against_a_written_out_reference(tmp_path, capsys, void_fix):
    torch.manual_seed(0)
    kwargs = dict(patch_size=8, embed_dim=24, depth=2, num_heads=3)
    model = sarvit.create_model("vit_tiny_patch16_224", num_classes=4, img_size=32, model_kwargs=kwargs)
    run = tmp_path / "run"
    run.mkdir()
    save_weights(model, run / "best.safetensors", {
        "model": "vit_tiny_patch16_224", "model_kwargs": kwargs, "img_size": 32, "num_classes": 4,
        "classes": list("abcd"), "layout": "sar", "query": "cls", "sar": True, "lambda": 0.01, "data": "somewhere"})
    data = masked_folder(tmp_path / "masked")
    out = tmp_path / "scores.csv"
    args = ["jaccard", "--checkpoint", str(run), "--data", str(data), "--img-size", "48", "--output", str(out),
            "--batch-size", "3", "--workers", "0", "--device", "cpu"]
    assert main(args + (["--void-fix"] if void_fix else [])) == 0
    printed = capsys.readouterr().out
    rows = list(csv.DictReader(out.open()))
    assert [r["stem"] for r in rows] == ["s0", "s1", "s2", "s3"]
    assert [r["objects"] for r in rows] == ["2", "2", "2", "0"] and rows[3]["mean"] == ""
    model.set_input_size(img_size=48)
    expected = reference_scores(model, data, 48, void_fix)
    for r in rows[:3]:
        assert float(r["mean"]) == pytest.approx(expected[r["stem"]], abs=2e-6)
    mean = np.mean([expected[s] for s in ("s0", "s1", "s2")])
    assert f"Jaccard {mean:.4f} over 3 images and 6 objects (1 of 4 images" in printed
    assert ("void excluded" if void_fix else "void counted in the union") in printed


def test_bad_options_are_one_line_errors(tmp_path, capsys):
    data = masked_folder(tmp_path / "masked", count=2)
    code = main(["jaccard", "--checkpoint", str(tmp_path), "--data", str(data), "--mass", "1.5", "--batch-size", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "--mass must be in (0, 1]" in err and "--batch-size must be at least 1" in err
    assert "Traceback" not in err
