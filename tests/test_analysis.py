"""Attention maps of the last block, the 60%-mass rule, model loading at any size, the figure."""

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from scipy import ndimage

import sarvit
from sarvit.analysis import attention_maps, load_analysis_model, mass_mask, plot_attention_figure
from sarvit.analysis.figures import ModelMaps
from sarvit.checkpoint import save_weights
from sarvit.cli import main
from sarvit.errors import UserError

KWARGS = dict(patch_size=8, embed_dim=24, depth=2, num_heads=3)


def tiny(layout="sar", seed=0, **extra):
    torch.manual_seed(seed)
    return sarvit.create_model("vit_tiny_patch16_224", num_classes=4, img_size=32,
                               model_kwargs={**KWARGS, **extra}, layout=layout)


def save_run(folder: Path, model, layout="sar", extra=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"model": "vit_tiny_patch16_224", "model_kwargs": {**KWARGS, **(extra or {})}, "img_size": 32,
            "num_classes": 4, "classes": list("abcd"), "layout": layout, "query": "cls", "sar": layout == "sar",
            "lambda": 0.01, "data": "somewhere"}
    save_weights(model, folder / "best.safetensors", meta)
    return folder


def reference_cls_attention(model, x):
    """timm's own (non-fused) attention matrix of the last block, row 0, patch columns."""
    block = model.blocks[-1]
    seen = {}
    hook = block.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0]))
    model.eval()
    with torch.no_grad():
        model.forward_features(x)
    hook.remove()
    attn = block.attn
    attn.fused_attn = False
    grab = attn.attn_drop.register_forward_hook(lambda _m, _i, out: seen.setdefault("A", out))
    with torch.no_grad():
        attn(block.norm1(seen["x"]))  # (B, N, N) attention through timm's softmax
    grab.remove()
    attn.fused_attn = True
    return seen["A"][:, :, 0, model.num_prefix_tokens:]  # (B, heads, n)


def reference_mass(a: np.ndarray, fraction: float) -> np.ndarray:
    """DINO's rule, one map at a time, written as a plain loop."""
    flat = a.ravel().astype(np.float64)
    order = np.argsort(flat, kind="stable")
    total, running = flat.sum(), 0.0
    keep = np.zeros(flat.size, dtype=bool)
    for i in order:
        running += flat[i] / total
        keep[i] = running > 1 - fraction
    return keep.reshape(a.shape)


@pytest.mark.parametrize("layout, extra", [("sar", {}), ("A", {}), ("sar", {"reg_tokens": 2})])
def test_attention_is_dino_cls_row_over_all_keys(layout, extra):
    model = tiny(layout, **extra)
    x = torch.randn(2, 3, 32, 32)
    maps = attention_maps(model, x)
    ref = reference_cls_attention(model, x).reshape(2, 3, 4, 4)
    torch.testing.assert_close(maps.attn, ref, rtol=1e-5, atol=1e-6)
    # the prefix keys' share is dropped: each head's patch attention sums to less than 1
    assert (maps.attn.sum(dim=(-2, -1)) < 1 - 1e-4).all()
    _, S = model.forward_with_similarity(x)  # the surgery's own pre-softmax maps (Eq. 4)
    torch.testing.assert_close(maps.S, S, rtol=1e-5, atol=1e-5)
    assert not model.blocks[-1]._forward_pre_hooks  # the model is left as it was


def test_plain_timm_model_gets_maps_without_surgery():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=4, img_size=32, **KWARGS)
    x = torch.randn(1, 3, 32, 32)
    maps = attention_maps(model, x)
    torch.testing.assert_close(maps.attn, reference_cls_attention(model, x).reshape(1, 3, 4, 4), rtol=1e-5, atol=1e-6)
    assert not sarvit.is_attached(model)
    # components of ReLU(S - mean): scipy on the same maps, 8-connectivity
    for h in range(3):
        S = maps.S[0, h].numpy()
        expected, _ = ndimage.label(S > S.mean(), structure=np.ones((3, 3)))
        np.testing.assert_array_equal(maps.components[0, h].numpy(), expected)


def test_mass_mask_hand_case_and_plain_loop():
    attn = torch.tensor([[0.5, 0.3], [0.15, 0.05]])
    # ascending 0.05, 0.15, 0.3, 0.5 -> cumsum 0.05, 0.2, 0.5, 1.0 -> > 0.4 keeps 0.3 and 0.5
    assert mass_mask(attn, 0.6).tolist() == [[True, True], [False, False]]
    a = torch.rand(3, 5, 7, 6)
    got = mass_mask(a, 0.6).numpy()
    for idx in np.ndindex(3, 5):
        np.testing.assert_array_equal(got[idx], reference_mass(a[idx].numpy(), 0.6))
    ties = torch.full((2, 2), 0.25)  # stable order: the last-listed entries are kept first
    np.testing.assert_array_equal(mass_mask(ties, 0.6).numpy(), reference_mass(ties.numpy(), 0.6))
    with pytest.raises(ValueError, match="fraction"):
        mass_mask(a, 0.0)


def test_checkpoint_loads_resampled_to_another_size(tmp_path):
    model = tiny()
    run = save_run(tmp_path / "my-run", model)
    loaded = load_analysis_model(run, img_size=64)
    assert loaded.name == "my-run" and loaded.img_size == 64 and loaded.stride == 8
    maps = attention_maps(loaded.model, torch.randn(1, 3, 64, 64))
    assert maps.attn.shape == (1, 3, 8, 8)
    # resampling keeps the weights: back at 32 the maps equal the original model's
    back = load_analysis_model(run, img_size=32).model
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(attention_maps(back, x).attn, attention_maps(model, x).attn)
    with pytest.raises(UserError, match="--img-size 36: .*multiple of the patch size 8x8.*use 32 or 40"):
        load_analysis_model(run, img_size=36)


def test_plain_timm_weights_need_and_use_model_name(tmp_path):
    torch.manual_seed(3)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=4, img_size=32, **KWARGS)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with pytest.raises(UserError, match="--model"):
        load_analysis_model(path, img_size=32)
    with pytest.raises(UserError, match="unknown timm model"):
        load_analysis_model(path, img_size=32, model_name="vit_nonexistent")
    # another architecture: the message names the first tensor that does not fit, not torch's header line
    with pytest.raises(UserError, match=r"small_patch16_224 weights: Missing key\(s\) in state_dict: \"blocks\.2\."):
        load_analysis_model(path, img_size=32, model_name="vit_small_patch16_224")


def test_figure_draws_the_arrays_it_is_given():
    rng = np.random.default_rng(0)
    attn = rng.random((1, 2, 4, 4))
    labels = np.zeros((1, 2, 4, 4), dtype=int)
    labels[0, 0, :2, :2], labels[0, 0, 3, 3] = 1, 2
    maps = ModelMaps("run", attn, attn > 0.5, labels, np.array([[0.69, 0.0]]))
    fig = plot_attention_figure(rng.random((1, 32, 32, 3)), [maps], captions=["cat"])
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:1] == ["cat"] and "SE 0.69, 2 comp." in titles and "SE 0.00, 0 comp." in titles
    heat = [ax for ax in fig.axes if ax.get_title() == "head 2"][0].images[1].get_array()
    np.testing.assert_array_equal(np.asarray(heat), attn[0, 1])
    assert [t.get_text() for t in fig.texts][1] == "run"


def test_figure_mass_row_colour_scale_and_titles_inside_the_figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    rng = np.random.default_rng(2)
    attn = 0.01 + 0.001 * rng.random((1, 1, 4, 4))  # nearly flat, as an untrained model's
    mass = attn > np.median(attn)
    maps = ModelMaps("a-run-folder-with-a-rather-long-name-seed-3", attn, mass, np.zeros((1, 1, 4, 4), int),
                     np.zeros((1, 1)))
    fig = plot_attention_figure(rng.random((1, 32, 32, 3)), [maps], captions=["x" * 60],
                                title="Last block at 480x480, per head: a title far longer than one narrow group")
    FigureCanvasAgg(fig).draw()
    renderer = fig.canvas.get_renderer()
    shown = [t for t in fig.texts] + [ax.title for ax in fig.axes if ax.get_title()]
    for text in shown:
        box = text.get_window_extent(renderer)
        assert box.x0 >= 0 and box.x1 <= fig.bbox.width and box.y0 >= 0 and box.y1 <= fig.bbox.height, text.get_text()
    heat = [ax for ax in fig.axes if ax.get_title() == "head 1"][0].images[1]
    assert heat.get_clim() == (attn.min(), attn.max())  # the scale spans the maps, not [0, max]
    panel = [ax for ax in fig.axes if ax.get_title() == f"60% mass: {mass.sum()}/16 patches"][0]
    veil = panel.images[1].get_array()
    np.testing.assert_array_equal(np.ma.getmaskarray(veil), mass[0, 0])  # darkened exactly where dropped


def write_images(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


def test_attention_command_two_checkpoints(tmp_path):
    a = save_run(tmp_path / "baseline", tiny("A", seed=0), layout="A")
    b = save_run(tmp_path / "sar", tiny("sar", seed=1))
    images = write_images(tmp_path / "images", 3)
    out = tmp_path / "fig.png"
    code = main(["attention", "--checkpoint", str(a), "--checkpoint", str(b), "--image-dir", str(images),
                 "--images", "2", "--img-size", "48", "--output", str(out), "--device", "cpu"])
    assert code == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > im.height  # two groups of three heads, two images


def test_unreadable_image_is_named(tmp_path):
    run = save_run(tmp_path / "run", tiny())
    images = write_images(tmp_path / "images", 1)
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    from sarvit.analysis.gallery import attention_figure

    with pytest.raises(UserError, match="broken.jpg") as caught:
        attention_figure([str(run)], tmp_path / "f.png", image_dir=str(images), count=5, device="cpu")
    assert "a run continues" not in str(caught.value)  # the resume hint is about training runs only
    assert "interrupted `sarvit train`" in str(caught.value)
    with pytest.raises(UserError, match=".png"):
        attention_figure([str(run)], tmp_path / "f.pdf", image_dir=str(images), device="cpu")


def test_plain_timm_weights_load_at_another_size(tmp_path):
    torch.manual_seed(4)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=64)  # weights saved at 64
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = load_analysis_model(path, img_size=64, model_name="vit_tiny_patch16_224")
    assert loaded.name == "vit" and loaded.stride == 16
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(attention_maps(loaded.model, x).attn,
                               reference_cls_attention(model, x).reshape(1, 3, 4, 4), rtol=1e-5, atol=1e-6)
    assert not sarvit.is_attached(loaded.model)


def test_demo_names_still_draw(tmp_path):
    from sarvit.analysis import cls_attention_maps, plot_attention_grid

    model = tiny()
    x = torch.randn(2, 3, 32, 32)
    A, S = cls_attention_maps(model, x)
    torch.testing.assert_close(A, reference_cls_attention(model, x).reshape(2, 3, 4, 4), rtol=1e-5, atol=1e-6)
    path = plot_attention_grid(torch.rand(2, 3, 32, 32), {"baseline": (A, S), "sar": (A, S)}, tmp_path / "a.png",
                               ["x", "y"])
    with Image.open(path) as im:
        assert im.format == "PNG"
