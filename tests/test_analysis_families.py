"""Attention maps, model loading and the analysis commands for every SAR family.

Every map is checked against the attention written out from the last block's own weights
(LayerNorm, linear layers, convolutions and BatchNorm as plain tensor algebra), on plain
models and on SAR-attached ones.
"""

import copy
import csv
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import sarvit
from sarvit.analysis import attention_maps, load_analysis_model
from sarvit.checkpoint import save_weights
from sarvit.cli import main
from sarvit.errors import ConfigError, UnsupportedModel, UserError
from tests.conftest import tiny_train_args
from tests.test_jaccard import masked_folder
from tests.test_models_cvt import make as make_cvt
from tests.test_models_pvt import TINY_CLI as PVT_CLI
from tests.test_models_pvt import make_v1, make_v2
from tests.test_models_t2t import tiny as make_t2t
from tests.test_surgery_families import TV_TINY, heads_split, layer_norm, make_swin, make_timm_vit, make_torchvision_vit


def input_of(block, model, x):
    """The tokens that enter ``block`` (its first argument) when ``model(x)`` runs."""
    captured = {}

    def grab(_module, args):
        captured["z"] = args[0].detach()  # returns None: the block's arguments stay as they are

    handle = block.register_forward_pre_hook(grab)
    model(x)
    handle.remove()
    return captured["z"]


def perturbed(model, seed=0):
    """Every parameter (and BatchNorm statistic) moved off its initial value, in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in [*model.parameters(), *(b for n, b in model.named_buffers() if n.endswith("running_mean"))]:
            t.add_(0.1 * torch.randn(t.shape, generator=g))
    return model.eval()


def reference_maps(q, k, scale, prefix, query, grid):
    """softmax over all keys of the query's logits, prefix columns dropped; and the logits on the grid.

    q: (B, heads, Nq, d), k: (B, heads, Nk, d) -> attn, S: (B, heads, h, w)."""
    q0 = q[:, :, 0] if query == "cls" else q[:, :, prefix:].mean(dim=2)  # (B, heads, d)
    logits = (q0[:, :, None, :] * k).sum(-1) * scale  # (B, heads, Nk)
    e = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
    attn = e / e.sum(dim=-1, keepdim=True)
    return attn[..., prefix:].reshape(*attn.shape[:2], *grid), logits[..., prefix:].reshape(*attn.shape[:2], *grid)


def linear(x, layer):
    return x @ layer.weight.T + (layer.bias if layer.bias is not None else 0)


# --- each family's last block written out: (q, k, scale, prefix, query, grid) from the block input z --------------


def vit_like(model, z, query):  # timm's Block: ViT, T2T-ViT
    block, C = model.blocks[-1], z.shape[-1]
    heads = block.attn.num_heads
    q, k, _ = linear(layer_norm(block.norm1, z), block.attn.qkv).split(C, dim=-1)
    side = math.isqrt(z.shape[1] - model.num_prefix_tokens)
    return heads_split(q, heads), heads_split(k, heads), (C // heads) ** -0.5, model.num_prefix_tokens, query, \
        (side, side)


def pvt_like(model, z, query, prefix):  # PVT v1 (class token, no reduction) and PVT v2 (reduction)
    block, (B, N, C) = model.stages[-1].blocks[-1], z.shape
    attn, heads = block.attn, block.attn.num_heads
    x = layer_norm(block.norm1, z)
    side = math.isqrt(N - prefix)
    keys = x
    if attn.sr is not None:
        maps = x.transpose(1, 2).reshape(B, C, side, side)  # (B, C, H, W)
        r = attn.sr.stride[0]
        maps = F.conv2d(maps, attn.sr.weight, attn.sr.bias, stride=r)  # (B, C, H/r, W/r)
        keys = layer_norm(attn.norm, maps.flatten(2).transpose(1, 2))
        side //= r
    k = linear(keys, attn.kv)[..., :C]
    return heads_split(linear(x, attn.q), heads), heads_split(k, heads), (C // heads) ** -0.5, prefix, query, \
        (side, side)


def cvt_like(model, z, query):  # depthwise conv + BatchNorm, then a linear layer; the class token skips the conv
    block, (B, N, C) = model.stages[-1].blocks[-1], z.shape
    attn, heads = block.attn, block.attn.num_heads
    x = layer_norm(block.norm1, z)
    side = math.isqrt(N - 1)
    grid = x[:, 1:].transpose(1, 2).reshape(B, C, side, side)

    def project(proj, lin):
        conv, bn = proj.conv, proj.bn
        y = F.conv2d(grid, conv.weight, None, stride=conv.stride, padding=conv.padding, groups=C)
        y = (y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
        y = y * bn.weight[:, None, None] + bn.bias[:, None, None]
        return linear(torch.cat([x[:, :1], y.flatten(2).transpose(1, 2)], dim=1), lin), y.shape[-1]

    q, _ = project(attn.conv_proj_q, attn.proj_q)
    k, key_side = project(attn.conv_proj_k, attn.proj_k)
    return heads_split(q, heads), heads_split(k, heads), C ** -0.5, 1, query, (key_side, key_side)


def swin_like(model, z, query):  # one window; no relative position bias for the mean query
    block, (B, H, W, C) = model.layers[-1].blocks[-1], z.shape
    heads = block.attn.num_heads
    q, k, _ = linear(layer_norm(block.norm1, z).reshape(B, H * W, C), block.attn.qkv).split(C, dim=-1)
    return heads_split(q, heads), heads_split(k, heads), (C // heads) ** -0.5, 0, query, (H, W)


def torchvision_like(model, z, query):  # the packed in-projection of nn.MultiheadAttention
    block, C = model.encoder.layers[-1], z.shape[-1]
    mha = block.self_attention
    w_q, w_k, _ = mha.in_proj_weight.split(C)
    b_q, b_k, _ = mha.in_proj_bias.split(C)
    x = layer_norm(block.ln_1, z)
    side = math.isqrt(z.shape[1] - 1)
    return heads_split(x @ w_q.T + b_q, mha.num_heads), heads_split(x @ w_k.T + b_k, mha.num_heads), \
        (C // mha.num_heads) ** -0.5, 1, query, (side, side)


# family: (make a plain tiny model, input size, last block of the plain model, hand q/k, query, key grid, stride)
FAMILIES = {
    "vit_no_cls": (lambda: make_timm_vit(class_token=False, global_pool="avg"), 32, lambda m: m.blocks[-1],
                   lambda m, z: vit_like(m, z, "mean"), (4, 4), 8),
    "t2t": (make_t2t, 64, lambda m: m.blocks[-1], lambda m, z: vit_like(m, z, "cls"), (4, 4), 16),
    "pvt_v1": (make_v1, 32, lambda m: m.stages[-1].blocks[-1], lambda m, z: pvt_like(m, z, "cls", 1), (4, 4), 8),
    "pvt_v2_reduced_keys": (lambda: make_v2(sr_ratios=(4, 2)), 32, lambda m: m.stages[-1].blocks[-1],
                            lambda m, z: pvt_like(m, z, "mean", 0), (2, 2), 16),
    "cvt": (make_cvt, 32, lambda m: m.stages[-1].blocks[-1], lambda m, z: cvt_like(m, z, "cls"), (2, 2), 16),
    "swin": (make_swin, 32, lambda m: m.layers[-1].blocks[-1], lambda m, z: swin_like(m, z, "mean"), (4, 4), 8),
    "torchvision_vit": (make_torchvision_vit, 32, lambda m: m.encoder.layers[-1],
                        lambda m, z: torchvision_like(m, z, "cls"), (4, 4), 8),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_maps_equal_the_last_block_written_out(family):
    make, size, last, by_hand, grid, stride = FAMILIES[family]
    torch.manual_seed(0)
    plain = perturbed(make())
    x = torch.randn(2, 3, size, size)
    z = input_of(last(plain), plain, x)  # the tokens entering the last block
    with torch.no_grad():
        want_attn, want_S = reference_maps(*by_hand(plain, z))
    assert want_attn.shape[-2:] == grid
    attached = sarvit.attach(copy.deepcopy(plain)).eval()  # Eq. 10-11 last block: same q/k weights
    for model in (plain, attached):
        maps = attention_maps(model, x)
        torch.testing.assert_close(maps.attn, want_attn, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(maps.S, want_S, rtol=1e-5, atol=1e-5)
        assert maps.stride == stride == size // grid[0]
        assert not last(model)._forward_pre_hooks  # the model is left as it was
    _, S = attached.forward_with_similarity(x)  # the map the SE loss trains on is the same S
    torch.testing.assert_close(S, want_S, rtol=1e-5, atol=1e-5)


def test_swin_with_several_windows_is_refused_with_the_window_rule():
    model = make_swin(img_size=64).eval()  # last stage 8x8 in 4x4 windows: a mean query cannot see every key
    with pytest.raises(ConfigError, match="ONE attention window"):
        attention_maps(model, torch.randn(1, 3, 64, 64))


def test_models_of_no_family_are_refused_naming_the_families(tmp_path):
    with pytest.raises(UnsupportedModel, match="PVT v1.*CvT.*torchvision VisionTransformer"):
        attention_maps(torch.nn.Conv2d(3, 4, 3), torch.randn(1, 3, 8, 8))
    path = tmp_path / "resnet.safetensors"
    save_file({"fc.weight": torch.zeros(3, 512)}, str(path))
    with pytest.raises(UnsupportedModel, match="SAR supports these families"):
        load_analysis_model(path, model_name="resnet18")


# --- loading --------------------------------------------------------------------------------------------------------

SWIN_KWARGS = dict(patch_size=4, embed_dim=8, depths=[1, 2], num_heads=[1, 2], window_size=4, mlp_ratio=2.0)
PVT_KWARGS = dict(patch_size=4, embed_dims=[8, 16], num_heads=[1, 2], mlp_ratios=[2, 2], depths=[1, 2],
                  sr_ratios=[2, 1])


def save_run(folder, name, kwargs, img_size=32):
    torch.manual_seed(0)
    model = perturbed(sarvit.create_model(name, 4, img_size=img_size, model_kwargs=kwargs))
    folder.mkdir(parents=True)
    save_weights(model, folder / "best.safetensors", {
        "model": name, "model_kwargs": kwargs, "img_size": img_size, "num_classes": 4, "classes": list("abcd"),
        "layout": "sar", "query": "auto", "sar": True, "lambda": 0.01, "data": "somewhere"})
    return folder, model


@pytest.mark.parametrize("name, kwargs, size, grid", [
    ("swin_tiny_patch4_window7_224", SWIN_KWARGS, 64, (8, 8)),  # windows scaled with the grid: still one
    ("pvt_tiny", PVT_KWARGS, 64, (8, 8)),
])
def test_runs_of_other_families_load_at_another_size(tmp_path, name, kwargs, size, grid):
    run, model = save_run(tmp_path / "run", name, kwargs)
    loaded = load_analysis_model(run, img_size=size)
    assert loaded.img_size == size and loaded.stride == size // grid[0]
    assert attention_maps(loaded.model, torch.randn(1, 3, size, size)).attn.shape == (1, 2, *grid)
    back = load_analysis_model(run)  # the training size, 32: the maps of the saved model
    assert back.img_size == 32 and back.stride == 8
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(attention_maps(back.model, x).attn, attention_maps(model, x).attn)
    with pytest.raises(UserError, match="--img-size 36: .*multiple"):
        load_analysis_model(run, img_size=36)


def test_bare_weights_of_a_registered_model_load_by_name(tmp_path):
    torch.manual_seed(5)
    model = perturbed(sarvit.models.pvt.pvt_tiny(num_classes=3))  # sarvit's PVT v1, as published (13 M)
    path = tmp_path / "pvt.pth"
    torch.save(model.state_dict(), path)
    loaded = load_analysis_model(path, img_size=256, model_name="pvt_tiny")
    assert not sarvit.is_attached(loaded.model) and loaded.stride == 32
    model.set_input_size(256)
    x = torch.randn(1, 3, 256, 256)
    maps = attention_maps(loaded.model, x)
    assert maps.attn.shape == (1, 8, 8, 8)  # PVT-Tiny: 8 heads in the last stage, 256 / 32 = 8
    torch.testing.assert_close(maps.attn, attention_maps(model, x).attn)
    with pytest.raises(UserError, match="--img-size 240: .*multiple of the patch size 32x32"):
        load_analysis_model(path, img_size=240, model_name="pvt_tiny")


def test_bare_torchvision_weights_load_by_name_and_resample(tmp_path, monkeypatch):
    from torchvision.models import _api
    from torchvision.models.vision_transformer import VisionTransformer

    def tiny_vit_b_16(weights=None, **kwargs):  # vit_b_16's builder, at a size the CPU runs at once
        return VisionTransformer(**{**TV_TINY, **kwargs})

    monkeypatch.setitem(_api.BUILTIN_MODELS, "vit_b_16", tiny_vit_b_16)
    model = perturbed(make_torchvision_vit())  # 32 px, patch 8, 5 classes
    path = tmp_path / "tv.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    native = load_analysis_model(path, model_name="torchvision:vit_b_16")
    assert native.img_size == 32 and native.stride == 8 and native.model.heads.head.out_features == 5
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(attention_maps(native.model, x).attn, attention_maps(model, x).attn)
    larger = load_analysis_model(path, img_size=48, model_name="torchvision:vit_b_16")
    assert larger.model.image_size == 48 and larger.stride == 8
    assert attention_maps(larger.model, torch.randn(1, 3, 48, 48)).attn.shape == (1, 2, 6, 6)
    with pytest.raises(UserError, match="--model"):
        load_analysis_model(path)


# --- the commands on a trained PVT ----------------------------------------------------------------------------------


def reference_jaccard(model, data, size):
    """Per image: resize, the attention written out (PVT v1's last block), DINO's rule, IoU loops."""
    from torchvision.transforms import functional as TF

    out = {}
    for image_path in sorted((data / "images").iterdir()):
        img = Image.open(image_path).convert("RGB")
        x = TF.to_tensor(TF.resize(img, [size, size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True))
        x = TF.normalize(x, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))[None]
        with torch.no_grad():
            attn, _ = reference_maps(*pvt_like(model, input_of(model.stages[-1].blocks[-1], model, x), "cls", 1))
        attn = attn[0].numpy()  # (heads, h, w)
        cell = size // attn.shape[-1]
        mask = np.array(Image.open(data / "masks" / image_path.name).resize((size, size), Image.NEAREST)).astype(int)
        ious = []
        for c in sorted(set(np.unique(mask)) - {0, 255}):
            best = 0.0
            for a in attn.reshape(attn.shape[0], -1):
                order = np.argsort(a, kind="stable")
                keep = np.zeros(a.size, bool)
                keep[order] = np.cumsum(a[order] / a.sum()) > 0.4
                pred = np.kron(keep.reshape(attn.shape[1:]), np.ones((cell, cell), int)).astype(bool)
                best = max(best, (pred & (mask == c)).sum() / (pred | (mask == c)).sum())
            ious.append(best)
        out[image_path.stem] = float(np.mean(ious)) if ious else math.nan
    return out


def test_attention_and_jaccard_commands_on_a_trained_pvt(image_folder, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(tiny_train_args(image_folder, run, *PVT_CLI["pvt_tiny"], "--epochs", "1")) == 0  # 16 px, patch 2
    figure = tmp_path / "fig.png"
    assert main(["attention", "--checkpoint", str(run), "--which", "last", "--image-dir",
                 str(image_folder / "val" / "class0"), "--images", "2", "--img-size", "32", "--output", str(figure),
                 "--device", "cpu"]) == 0
    with Image.open(figure) as im:
        assert im.format == "PNG"
    data = masked_folder(tmp_path / "masked")
    scores = tmp_path / "scores.csv"
    assert main(["jaccard", "--checkpoint", str(run), "--which", "last", "--data", str(data), "--img-size", "32",
                 "--output", str(scores), "--workers", "0", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    with scores.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["objects"] for r in rows] == ["2", "2", "2", "0"]
    model, _ = sarvit.load_model(run, which="last")
    model.set_input_size(32)  # last stage 32 / 4 = 8x8 keys: stride 4, not the patch size 2
    expected = reference_jaccard(model.eval(), data, 32)
    for r in rows[:3]:
        assert float(r["mean"]) == pytest.approx(expected[r["stem"]], abs=2e-6)
    assert f"Jaccard {np.mean([expected[s] for s in ('s0', 's1', 's2')]):.4f} over 3 images" in printed
    assert main(["jaccard", "--checkpoint", str(run), "--which", "last", "--data", str(data), "--img-size", "30",
                 "--output", str(tmp_path / "x.csv"), "--device", "cpu"]) == 2
    assert "--img-size 30" in capsys.readouterr().err and not (tmp_path / "x.csv").exists()


@pytest.mark.parametrize("device,message", [("foo", "is not a device"), ("cuda:7", "cuda")])
def test_analysis_commands_refuse_a_bad_device_in_one_line(tmp_path, capsys, device, message):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    data = masked_folder(tmp_path / "masked")
    for args in (["jaccard", "--checkpoint", str(tmp_path), "--data", str(data)],
                 ["attention", "--checkpoint", str(tmp_path), "--image-dir", str(data / "images"),
                  "--output", str(tmp_path / "a.png")]):
        capsys.readouterr()
        assert main([*args, "--device", device]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and not (tmp_path / "a.png").exists()
