"""Corruption robustness: per-image corruptions against the library called directly, CE/mCE
against hand-computed tables, the ImageNet-C / ImageNet-A readers on fake trees, the CLI."""

import json
import random
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from imagecorruptions import corrupt
from PIL import Image

import sarvit
from sarvit.checkpoint import save_weights
from sarvit.cli import main
from sarvit.config import ConfigError
from sarvit.data import build_transform, open_dataset
from sarvit.data.imagenet_variants import model_wnids, open_imagenet_a, open_imagenet_c
from sarvit.robustness import (
    ALEXNET_ERRORS, CorruptedViews, Reference, evaluate_corruptions, evaluate_imagenet_a, evaluate_imagenet_c,
    load_reference, predict, resolve_corruptions, resolve_severities, summarise,
)
from sarvit.robustness.corruptions import corrupt_array, corruption_names
from tests.conftest import make_image_folder

KWARGS = {"patch_size": 4, "embed_dim": 24, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}
IMAGENET = (np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225]))
PAIRS = [("gaussian_noise", 1), ("gaussian_noise", 5), ("impulse_noise", 1), ("impulse_noise", 5)]


def tiny_model(num_classes: int, seed: int = 0):
    torch.manual_seed(seed)
    return sarvit.create_model("vit_tiny_patch16_224", num_classes, img_size=16, model_kwargs=KWARGS).eval()


def tiny_run(run: Path, data: str, classes: list[str] | None, num_classes: int, seed: int = 0) -> Path:
    """A run folder as `sarvit train` leaves it, with untrained tiny weights."""
    model = tiny_model(num_classes, seed)
    run.mkdir(parents=True, exist_ok=True)
    meta = {"model": "vit_tiny_patch16_224", "model_kwargs": KWARGS, "img_size": 16, "num_classes": num_classes,
            "layout": "sar", "query": model.blocks[-1].query, "data": data}
    if classes is not None:
        meta["classes"] = classes
    save_weights(model, run / "best.safetensors", meta)
    (run / "config.yaml").write_text(yaml.safe_dump({"data": data, "crop_pct": 1.0, "interpolation": "bicubic"}))
    return run


def folder_files(root: Path) -> list[tuple[Path, int]]:
    """ImageFolder's order, listed independently: sorted classes, sorted files."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    return [(f, c) for c, name in enumerate(classes) for f in sorted((root / name).iterdir())]


def seed_of(seed: int, corruption: str, severity: int, index: int) -> int:
    """The documented per-image seed."""
    return int(np.random.SeedSequence([seed, zlib.crc32(corruption.encode()), severity, index]).generate_state(1)[0])


def reference_corrupted(path: Path, corruption: str, severity: int, seed: int) -> np.ndarray:
    """A 16x16 image corrupted the plain way: upscale to 32, seed, `corrupt`, resize back."""
    image = Image.open(path).convert("RGB")
    up = np.asarray(image.resize((32, 32), Image.BICUBIC))
    np.random.seed(seed)
    random.seed(seed)
    kwargs = {"seed": seed} if corruption in ("impulse_noise", "glass_blur") else {}
    out = corrupt(up, severity=severity, corruption_name=corruption, **kwargs)
    return np.asarray(Image.fromarray(out).resize((16, 16), Image.BICUBIC))


def reference_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(3, H, W): to [0, 1], then ImageNet's mean and std."""
    mean, std = (torch.tensor(v, dtype=torch.float32)[:, None, None] for v in IMAGENET)
    return (torch.from_numpy(np.array(pixels)).permute(2, 0, 1).float() / 255 - mean) / std


def reference_prediction(model, pixels: np.ndarray, keep: list[int] | None = None) -> int:
    with torch.no_grad():
        logits = model(reference_tensor(pixels)[None])[0]
    if keep is None:
        return int(logits.argmax())
    return keep[int(logits[keep].argmax())]


@pytest.fixture(scope="module")
def data16(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("c") / "data", classes=3, train=1, val=3, size=16)


def val_views(data: Path, seed: int, pairs=PAIRS) -> CorruptedViews:
    raw = open_dataset(str(data), split="val")
    transform = build_transform(str(data), 16, False, crop_pct=1.0)
    names = list(dict.fromkeys(c for c, _ in pairs))
    return CorruptedViews(raw.dataset, transform, names, sorted({s for _, s in pairs}), seed)


# --- corrupted images -------------------------------------------------------------------------


def test_corrupted_images_match_the_library_called_directly(data16):
    views = val_views(data16, seed=7)
    for i, (path, _) in enumerate(folder_files(data16 / "val")):
        for c, s in PAIRS:
            expected = reference_corrupted(path, c, s, seed_of(7, c, s, i))
            np.testing.assert_array_equal(views.corrupted(i, c, s), expected)


def test_same_seed_same_bytes_other_seed_other_bytes():
    image = np.random.default_rng(0).integers(0, 256, (40, 36, 3), dtype=np.uint8)
    for c in ("impulse_noise", "glass_blur", "gaussian_noise", "frost"):
        a = corrupt_array(image, c, 2, seed=11)
        np.random.seed(123)  # the global state before the call must not matter
        b = corrupt_array(image, c, 2, seed=11)
        assert a.shape == image.shape and a.tobytes() == b.tobytes(), c
        assert corrupt_array(image, c, 2, seed=12).tobytes() != a.tobytes(), c
    state = np.random.get_state()[1].copy()
    corrupt_array(image, "shot_noise", 3, seed=5)
    np.testing.assert_array_equal(np.random.get_state()[1], state)  # the caller's RNG is left as it was


def test_small_images_are_upscaled_to_32_and_back():
    image = np.random.default_rng(1).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    out = corrupt_array(image, "pixelate", 5, seed=0)
    up = np.asarray(Image.fromarray(image).resize((32, 32), Image.BICUBIC))
    expected = np.asarray(Image.fromarray(corrupt(up, 5, "pixelate")).resize((28, 28), Image.BICUBIC))
    np.testing.assert_array_equal(out, expected)


def test_per_image_results_do_not_depend_on_order_batch_or_workers(data16):
    views = val_views(data16, seed=3)
    forward = [views[i][0] for i in range(len(views))]
    backward = [views[i][0] for i in reversed(range(len(views)))][::-1]
    for a, b in zip(forward, backward):
        assert torch.equal(a, b)
    model = tiny_model(3)
    p1, t1 = predict(model, views, batch_size=1)
    p2, t2 = predict(model, views, batch_size=64, workers=2)
    np.testing.assert_array_equal(p1, p2)
    np.testing.assert_array_equal(t1, t2)


def test_errors_match_an_independent_loop(data16):
    model = tiny_model(3, seed=2)
    raw = open_dataset(str(data16), split="val")
    transform = build_transform(str(data16), 16, False, crop_pct=1.0)
    out = evaluate_corruptions(model, raw.dataset, transform, corruptions=["gaussian_noise", "impulse_noise"],
                               severities=[1, 5], seed=9, batch_size=5)
    views = val_views(data16, seed=9)
    files = folder_files(data16 / "val")
    clean = [reference_prediction(model, np.asarray(Image.open(f).convert("RGB"))) != t for f, t in files]
    assert out["clean_error"] == pytest.approx(100 * np.mean(clean))
    table = {}
    for k, (c, s) in enumerate(PAIRS, start=1):
        corrupted = [reference_corrupted(f, c, s, seed_of(9, c, s, i)) for i, (f, _) in enumerate(files)]
        for i, pixels in enumerate(corrupted):  # the model's input, view by view
            torch.testing.assert_close(views[i][0][k], reference_tensor(pixels), rtol=0, atol=1e-6)
        wrong = [reference_prediction(model, pixels) != t for pixels, (_, t) in zip(corrupted, files)]
        table[c, s] = 100 * np.mean(wrong)
        assert out["errors"][c][str(s)] == pytest.approx(table[c, s]), (c, s)
    assert len(set(table.values()) | {100 * np.mean(clean)}) > 1  # the errors tell the columns apart
    assert out["upscaled"] and out["corruption_size"] == [32, 32] and out["images"] == 9
    assert any("upscaled" in n for n in out["notes"]) and not out["normalised"]
    means = {c: np.mean([out["errors"][c]["1"], out["errors"][c]["5"]]) for c in ("gaussian_noise", "impulse_noise")}
    assert out["mean_error_unnormalised"] == pytest.approx(np.mean(list(means.values())))


# --- CE and mCE -------------------------------------------------------------------------------


def test_mce_and_relative_mce_by_hand():
    errors = {"fog": {1: 20.0, 2: 40.0}, "snow": {1: 50.0, 2: 70.0}, "spatter": {1: 10.0, 2: 10.0}}
    ref = Reference("made up", {"fog": {1: 40.0, 2: 60.0}, "snow": {1: 50.0, 2: 50.0}, "spatter": {1: 5, 2: 5}},
                    clean_error=30.0)
    out = summarise(errors, [1, 2], clean_error=10.0, reference=ref)
    # CE_fog = 100 * 60 / 100, CE_snow = 100 * 120 / 100; spatter (a validation type) is in no mean
    assert out["corruption_errors"] == pytest.approx({"fog": 60.0, "snow": 120.0, "spatter": 200.0})
    assert out["mCE"] == pytest.approx(90.0) and out["mean_over"] == ["fog", "snow"]
    # rCE_fog = 100 * (10 + 30) / (10 + 30), rCE_snow = 100 * (40 + 60) / (20 + 20)
    assert out["relative_corruption_errors"]["fog"] == pytest.approx(100.0)
    assert out["relative_corruption_errors"]["snow"] == pytest.approx(250.0)
    assert out["relative_mCE"] == pytest.approx(175.0)
    plain = summarise(errors, [1, 2])
    assert plain["mean_error_unnormalised"] == pytest.approx((30.0 + 60.0) / 2) and "mCE" not in plain


def test_alexnet_reference_averages_five_severities():
    errors = {"gaussian_noise": {1: 80.0, 2: 85.0, 3: 90.0, 4: 95.0, 5: 100.0}, "fog": {s: 41.0 for s in range(1, 6)}}
    out = summarise(errors, [1, 2, 3, 4, 5], reference=load_reference("alexnet"))
    assert out["corruption_errors"]["gaussian_noise"] == pytest.approx(100 * 90.0 / 88.6428)
    assert out["mCE"] == pytest.approx((100 * 90.0 / 88.6428 + 100 * 41.0 / 81.9324) / 2)
    assert len(ALEXNET_ERRORS) == 15
    with pytest.raises(ConfigError, match="severities 1-5"):
        load_reference("alexnet").total("fog", [1, 2])


def test_reference_files(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "corruptions.json").write_text(json.dumps({"clean_error": 5.0, "errors": {"fog": {"1": 20, "2": 30}}}))
    ref = load_reference(run)
    assert ref.total("fog", [1, 2]) == 50.0 and ref.clean_error == 5.0
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps({"fog": [10, 20, 30, 40, 50], "snow": 60}))
    ref = load_reference(listed)
    assert ref.total("fog", [2, 4]) == 60.0 and ref.total("snow", [1, 2, 3, 4, 5]) == 300.0
    fractions = tmp_path / "fractions.json"
    fractions.write_text(json.dumps({"fog": [0.1, 0.2, 0.3, 0.4, 0.5]}))
    with pytest.raises(ConfigError, match="percentages"):
        load_reference(fractions)
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({"fogg": 50}))
    with pytest.raises(ConfigError, match="fogg"):
        load_reference(typo)
    with pytest.raises(ConfigError, match="no errors for snow"):
        load_reference(run).check(["fog", "snow"], [1, 2])
    with pytest.raises(ConfigError, match="no such JSON"):
        load_reference(tmp_path / "nowhere")
    # a reference evaluated on other images does not normalise these: refused, naming both datasets
    (run / "corruptions.json").write_text(json.dumps({"data": "cifar10", "errors": {"fog": {"1": 20}}}))
    load_reference(run).check_data("cifar10")
    with pytest.raises(ConfigError, match="evaluated on cifar10, this evaluation is on fashion_mnist"):
        load_reference(run).check_data("fashion_mnist")
    folder = tmp_path / "images"
    folder.mkdir()
    (run / "corruptions.json").write_text(json.dumps({"data": str(folder), "errors": {"fog": {"1": 20}}}))
    load_reference(run).check_data(str(tmp_path / "." / "images"))  # the same folder, spelt otherwise
    load_reference(listed).check_data("anything")  # a plain table of errors says nothing about its data


def test_option_ranges():
    assert resolve_severities("3,1,3") == [1, 3] and resolve_corruptions("validation,fog")[-1] == "fog"
    assert len(resolve_corruptions("common")) == 15 and len(resolve_corruptions("all")) == 19
    for bad in ("0,1", "6", "a", ""):
        with pytest.raises(ConfigError, match="severities"):
            resolve_severities(bad)
    with pytest.raises(ConfigError, match="Did you mean gaussian_noise"):
        resolve_corruptions("gausian_noise")


# --- ImageNet-C and ImageNet-A ----------------------------------------------------------------


def write_images(folder: Path, count: int, seed: int, suffix: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"img{i}{suffix}")


def test_imagenet_c_folder(tmp_path):
    wnids = ["n00000001", "n00000002", "n00000003"]
    root = tmp_path / "imagenet-c"
    for c in ("fog", "contrast"):
        for s in (1, 2):
            for k, w in enumerate(["n00000002", "n00000003", "n09999999"]):  # the last: not a class of the model
                write_images(root / c / str(s) / w, 2, seed=hash((c, s, k)) % 1000, suffix=".JPEG")
    model = tiny_model(3, seed=2)
    transform = build_transform("imagenet", 16, False, crop_pct=1.0)
    out = evaluate_imagenet_c(model, root, wnids, transform, severities=[1, 2], batch_size=3)
    assert out["corruptions"] == ["fog", "contrast"] and out["images"] == 4 and out["clean_error"] is None
    for c in ("fog", "contrast"):
        for s in (1, 2):
            wrong = [reference_prediction(model, np.asarray(Image.open(f).convert("RGB"))) != wnids.index(w)
                     for w in ("n00000002", "n00000003") for f in sorted((root / c / str(s) / w).iterdir())]
            assert out["errors"][c][str(s)] == pytest.approx(100 * np.mean(wrong))
    raw, left_out = open_imagenet_c(root, "fog", 1, wnids)
    assert left_out == 1 and sorted(set(raw.targets.tolist())) == [1, 2]
    with pytest.raises(ConfigError, match="lacks fog/3"):
        evaluate_imagenet_c(model, root, wnids, transform, corruptions="fog", severities=[3])


def test_imagenet_a_masks_the_logits_to_its_classes(tmp_path):
    wnids = model_wnids(None, 1000)  # timm's ImageNet-1k list, for a model that records none
    assert len(wnids) == 1000 and wnids == sorted(wnids) and wnids[0] == "n01440764"
    root = tmp_path / "imagenet-a"
    chosen = [wnids[3], wnids[500], wnids[999]]
    for k, w in enumerate(chosen):
        write_images(root / w, 3, seed=k, suffix=".jpg")
    (root / "README.txt").write_text("not an image folder")
    model = tiny_model(1000, seed=3)
    raw, class_indices, left_out = open_imagenet_a(root, wnids)
    assert class_indices.tolist() == [3, 500, 999] and left_out == 0
    transform = build_transform("imagenet", 16, False, crop_pct=1.0)
    out = evaluate_imagenet_a(model, raw.dataset, class_indices, transform, batch_size=4)
    wrong = [reference_prediction(model, np.asarray(Image.open(f).convert("RGB")), [3, 500, 999]) != wnids.index(w)
             for w in chosen for f in sorted((root / w).iterdir())]
    assert out["top1_error"] == pytest.approx(100 * np.mean(wrong)) and out["images"] == 9 and out["classes"] == 3


def test_model_wnids_refuses_non_imagenet_classes():
    with pytest.raises(sarvit.errors.UserError, match="not ImageNet wnids"):
        model_wnids(["cat", "dog"], 2)


# --- command line -----------------------------------------------------------------------------


def test_cli_writes_results_and_guards_earlier_ones(data16, tmp_path, capsys):
    run = tiny_run(tmp_path / "run", str(data16), ["class0", "class1", "class2"], 3)
    base = ["eval", "--checkpoint", str(run), "--device", "cpu", "--workers", "0", "--batch-size", "10"]
    assert main([*base, "--corruptions", "contrast,fog", "--severities", "1,2", "--seed", "4"]) == 0
    printed = capsys.readouterr().out
    saved = json.loads((run / "corruptions.json").read_text())
    assert saved["seed"] == 4 and saved["severities"] == [1, 2] and saved["corruptions"] == ["contrast", "fog"]
    assert set(saved["errors"]["fog"]) == {"1", "2"} and saved["images"] == 9 and saved["upscaled"]
    assert "UNNORMALISED" in printed and "contrast" in printed and "upscaled" in printed
    assert main([*base, "--corruptions", "contrast,fog", "--severities", "1,2", "--seed", "4"]) == 0  # same settings
    assert json.loads((run / "corruptions.json").read_text())["errors"] == saved["errors"]  # deterministic

    # normalised by itself: every CE is 100 (where its errors are not all zero)
    own = tmp_path / "self.json"
    assert main([*base, "--corruptions", "contrast,fog", "--severities", "1,2", "--seed", "4",
                 "--corruption-reference", str(run), "--output", str(own)]) == 0
    result = json.loads(own.read_text())
    assert result["normalised"] and result["errors"] == saved["errors"]
    for c, ce in result["corruption_errors"].items():
        assert ce == pytest.approx(100.0), c

    # other settings do not overwrite the results already in the run folder
    before = (run / "corruptions.json").read_bytes()
    assert main([*base, "--corruptions", "fog", "--severities", "5"]) == 2
    assert "already holds results" in capsys.readouterr().err
    assert (run / "corruptions.json").read_bytes() == before


@pytest.mark.parametrize("args, message", [
    (["--corruptions", "--severities", "0,3"], "severities"),
    (["--corruptions", "fogg"], "Did you mean fog"),
    (["--severities", "1"], "need --corruptions"),
    (["--corruptions", "--seed", "-1"], "--seed"),
    (["--corruptions", "--corruption-reference", "nowhere.json"], "no such JSON"),
    (["--corruptions", "--corruption-reference", "OTHER_DATA"], "was evaluated on cifar10"),
    (["--data", "imagenet_c"], "--data-root"),
    (["--data", "imagenet_a", "--data-root", ".", "--corruptions"], "takes no --corruptions"),
])
def test_cli_bad_options(tmp_path, capsys, args, message):
    run = tiny_run(tmp_path / "run", "fashion_mnist", None, 10)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"data": "cifar10", "errors": {c: [50] * 5 for c in corruption_names("common")}}))
    args = [str(other) if a == "OTHER_DATA" else a for a in args]
    assert main(["eval", "--checkpoint", str(run), "--device", "cpu", *args]) == 2
    assert message in capsys.readouterr().err
    assert not (run / "corruptions.json").exists()


def test_cli_reads_imagenet_c_and_imagenet_a_folders(tmp_path, capsys):
    wnids = model_wnids(None, 1000)
    run = tiny_run(tmp_path / "run", "imagenet", None, 1000, seed=4)
    model = sarvit.load_model(run)[0].eval()
    root_c, root_a = tmp_path / "imagenet-c", tmp_path / "imagenet-a"
    for k, w in enumerate(wnids[:2]):
        write_images(root_c / "fog" / "2" / w, 2, seed=k, suffix=".JPEG")
        write_images(root_a / w, 2, seed=10 + k, suffix=".jpg")
    base = ["eval", "--checkpoint", str(run), "--device", "cpu", "--workers", "0"]
    assert main([*base, "--data", "imagenet_c", "--data-root", str(root_c), "--severities", "2"]) == 0
    out_c = json.loads((run / "imagenet_c.json").read_text())
    wrong = [reference_prediction(model, np.asarray(Image.open(f).convert("RGB"))) != k
             for k, w in enumerate(wnids[:2]) for f in sorted((root_c / "fog" / "2" / w).iterdir())]
    assert out_c["corruptions"] == ["fog"] and out_c["errors"]["fog"]["2"] == pytest.approx(100 * np.mean(wrong))
    assert any("not evaluated: gaussian_noise" in n for n in out_c["notes"])
    assert main([*base, "--data", "imagenet_a", "--data-root", str(root_a)]) == 0
    out_a = json.loads((run / "imagenet_a.json").read_text())
    wrong = [reference_prediction(model, np.asarray(Image.open(f).convert("RGB")), [0, 1]) != k
             for k, w in enumerate(wnids[:2]) for f in sorted((root_a / w).iterdir())]
    assert out_a["classes"] == 2 and out_a["top1_error"] == pytest.approx(100 * np.mean(wrong))
    assert "ImageNet-A: top-1 error" in capsys.readouterr().out


def test_an_unreadable_image_is_named(tmp_path):
    from sarvit.data.sources import UnreadableImage

    root = tmp_path / "imagenet-a"
    write_images(root / "n00000001", 2, seed=0, suffix=".jpg")
    (root / "n00000001" / "broken.jpg").write_bytes(b"not a jpeg")
    raw, class_indices, _ = open_imagenet_a(root, ["n00000001", "n00000002"])
    with pytest.raises(UnreadableImage, match="broken.jpg"):
        evaluate_imagenet_a(tiny_model(2), raw.dataset, class_indices, build_transform("imagenet", 16, False))
