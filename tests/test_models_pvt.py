"""PVT v1 (sarvit.models.pvt) and the SAR surgery of PVT v1 and timm's PVT v2.

The references are the PVT paper's numbers (parameter counts, the 7x7 key grid at 224)
and plain tensor algebra written from the definitions: spatial-reduction attention (a
strided convolution + LayerNorm before the keys and values), PVT v2's depthwise
convolution in the MLP, and Eq. 4 / Eq. 10-11 of the SAR paper.
"""

import math

import pytest
import timm
import torch
import torch.nn.functional as F

import sarvit
import sarvit.models  # noqa: F401  registers pvt_tiny, pvt_small with timm
from sarvit.errors import ConfigError
from sarvit.models.pvt import checkpoint_filter_fn
from sarvit.runlog import read_metrics
from tests.conftest import tiny_train_args
from tests.family_contract import check_contract

# PVT v1's structure, small: 32 px, patch 4 -> tokens 8x8 (keys 4x4, sr 2), then 4x4 with the class token
TINY_V1 = dict(img_size=32, patch_size=4, embed_dims=(8, 16), num_heads=(1, 2), mlp_ratios=(2, 2), depths=(1, 2),
               sr_ratios=(2, 1), num_classes=5)
# PVT v2's structure, small: 32 px -> tokens 8x8 (keys 4x4), then 4x4 (keys 4x4, or 2x2 with sr_ratios (4, 2))
TINY_V2 = dict(embed_dims=(8, 16), num_heads=(1, 2), mlp_ratios=(2, 2), depths=(1, 2), sr_ratios=(2, 1), num_classes=5)
FROZEN = {"stages.1.blocks.1.norm2.weight", "stages.1.blocks.1.norm2.bias"}


def randomise(model, seed=1):
    """Move every parameter off its initial value (unit LayerNorms and zero biases hide wiring errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def make_v1(seed=0, **overrides):
    torch.manual_seed(seed)
    return timm.create_model("pvt_tiny", **{**TINY_V1, **overrides})


def make_v2(seed=0, **overrides):
    torch.manual_seed(seed)
    return timm.create_model("pvt_v2_b0", **{**TINY_V2, **overrides})


# --- the architecture ---------------------------------------------------------------------------


def test_pvt_v1_is_registered_with_timm_beside_pvt_v2():
    assert timm.list_models("pvt_s*") == ["pvt_small"]
    assert timm.list_models("pvt_t*") == ["pvt_tiny"]
    assert {"pvt_v2_b0", "pvt_v2_b5"} <= set(timm.list_models("pvt_v2*"))  # timm's own, untouched
    with torch.device("meta"):
        model = timm.create_model("pvt_small", num_classes=100, drop_path_rate=0.1, img_size=256, in_chans=1)
    assert model.head.out_features == 100 and model.patch_embed.proj.in_channels == 1
    assert model.stages[0].pos_embed.shape == (1, 64 * 64, 64)  # 256 / 4
    assert model.stages[-1].pos_embed.shape == (1, 1 + 8 * 8, 512)  # the class token, then 256 / 32
    assert model.stages[-1].blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)  # linear over the 16 blocks
    cfg = model.pretrained_cfg
    assert cfg["architecture"] == "pvt_small" and cfg["input_size"] == (3, 224, 224)
    assert cfg["classifier"] == "head" and cfg["first_conv"] == "patch_embed.proj"


@pytest.mark.parametrize("name, millions", [("pvt_tiny", 13.2), ("pvt_small", 24.5)])
def test_parameter_counts_match_the_paper(name, millions):
    with torch.device("meta"):
        model = timm.create_model(name)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - millions * 1e6) < 0.01 * millions * 1e6, count


def test_pvt_small_has_the_published_stages_and_keys_on_7x7_at_224():
    with torch.device("meta"):
        model = timm.create_model("pvt_small").eval()
        key_tokens = []
        for stage in model.stages:
            stage.blocks[0].attn.kv.register_forward_hook(lambda m, i, o: key_tokens.append(tuple(i[0].shape)))
        logits = model(torch.empty(2, 3, 224, 224))
    assert logits.shape == (2, 1000)
    assert [len(s.blocks) for s in model.stages] == [3, 4, 6, 3]
    assert [s.blocks[0].attn.num_heads for s in model.stages] == [1, 2, 5, 8]
    assert [s.blocks[0].mlp.fc1.out_features for s in model.stages] == [64 * 8, 128 * 8, 320 * 4, 512 * 4]
    # every stage attends to 7x7 keys (8x8 -> 56/8, 28/4, 14/2, 7); the last one also to the class token
    assert key_tokens == [(2, 49, 64), (2, 49, 128), (2, 49, 320), (2, 1 + 49, 512)]


@pytest.mark.parametrize("size", [224, 320])
def test_output_shape_at_224_and_another_resolution(size):
    with torch.device("meta"):
        model = timm.create_model("pvt_small", num_classes=10)
        assert model(torch.empty(2, 3, size, size)).shape == (2, 10)
    tiny = make_v1().eval()
    assert tiny(torch.randn(2, 3, 64, 96)).shape == (2, 5)  # built for 32x32, runs at 64x96


def sra_by_hand(attn, x, grid, ratio, prefix=0, query="cls", linear=False):
    """Spatial-reduction attention (and Eq. 4) with plain tensor algebra; x is LN1's output."""
    B, N, C = x.shape
    heads = attn.num_heads
    d = C // heads
    q = x @ attn.q.weight.T + attn.q.bias  # (B, N, C)
    keys_from, key_grid = x, grid
    if ratio > 1 or linear:
        maps = x.transpose(1, 2).reshape(B, C, *grid)
        if linear:
            maps = F.adaptive_avg_pool2d(maps, 7)
        maps = F.conv2d(maps, attn.sr.weight, attn.sr.bias, stride=ratio)
        key_grid = tuple(maps.shape[-2:])
        keys_from = F.layer_norm(maps.flatten(2).transpose(1, 2), (C,), attn.norm.weight, attn.norm.bias,
                                 attn.norm.eps)
        keys_from = F.gelu(keys_from) if linear else keys_from
    kv = keys_from @ attn.kv.weight.T + attn.kv.bias  # (B, n, 2C): keys, then values
    q, k, v = (t.reshape(B, -1, heads, d).transpose(1, 2) for t in (q, kv[..., :C], kv[..., C:]))
    A = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d), dim=-1)
    msa = (A @ v).transpose(1, 2).reshape(B, N, C) @ attn.proj.weight.T + attn.proj.bias
    q0 = q[:, :, 0] if query == "cls" else q[:, :, prefix:].mean(dim=2)  # (B, heads, d)
    S = torch.einsum("bhd,bhnd->bhn", q0, k[:, :, prefix:]) / math.sqrt(d)
    return msa, S.reshape(B, heads, *key_grid)


def ln(norm, x):
    return F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps)


def mlp_v1(mlp, x):
    return F.gelu(x @ mlp.fc1.weight.T + mlp.fc1.bias) @ mlp.fc2.weight.T + mlp.fc2.bias


def mlp_v2(mlp, x, grid, linear=False):
    """fc1, depthwise 3x3 convolution over the token grid, GELU, fc2 (PVT v2's convolutional MLP)."""
    h = x @ mlp.fc1.weight.T + mlp.fc1.bias  # (B, N, hidden)
    maps = h.transpose(1, 2).reshape(h.shape[0], h.shape[2], *grid)
    maps = F.relu(maps) if linear else maps
    maps = F.conv2d(maps, mlp.dwconv.weight, mlp.dwconv.bias, padding=1, groups=h.shape[2])
    return F.gelu(maps.flatten(2).transpose(1, 2)) @ mlp.fc2.weight.T + mlp.fc2.bias


def test_a_pvt_v1_block_is_spatial_reduction_attention_written_out():
    model = randomise(make_v1()).eval()
    block = model.stages[0].blocks[0]  # 8x8 tokens, sr_ratio 2
    z = torch.randn(2, 64, 8)
    msa, _ = sra_by_hand(block.attn, ln(block.norm1, z), (8, 8), ratio=2)
    z1 = z + msa
    torch.testing.assert_close(block(z, (8, 8)), z1 + mlp_v1(block.mlp, ln(block.norm2, z1)), rtol=1e-5, atol=1e-5)


def test_position_embeddings_are_resampled_bilinearly_like_pvt():
    model = randomise(make_v1())
    stage = model.stages[-1]  # the class token's embedding, then a 4x4 grid
    pos = stage.pos_embed
    grid = pos[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 2), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(stage.position_embedding((6, 2)), torch.cat([pos[:, :1], expected], dim=1))
    model.set_input_size(img_size=48)
    torch.testing.assert_close(model.stages[-1].pos_embed[:, 1:], F.interpolate(
        grid, size=(6, 6), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2))


@pytest.mark.parametrize("bad, message", [
    (dict(img_size=36), "multiples of 8"),
    (dict(sr_ratios=(2, 2)), "sr_ratios[-1] must be 1"),
    (dict(depths=(1, 2, 3)), "one value per stage"),
    (dict(num_heads=(3, 2)), "multiple of its stage's num_heads"),
    (dict(global_pool="avg"), "class token"),
])
def test_bad_configurations_are_refused_with_what_to_do(bad, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        make_v1(**bad)


def test_an_input_that_does_not_tile_is_refused():
    with pytest.raises(ConfigError, match="36x32.*multiples of 8"):
        make_v1()(torch.randn(1, 3, 36, 32))


def test_published_checkpoint_names_load():
    """The key names of the published PVT v1 code (github.com/whai362/PVT, branch v1), by hand."""
    block = ["norm1.weight", "norm1.bias", "attn.q.weight", "attn.q.bias", "attn.kv.weight", "attn.kv.bias",
             "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
             "mlp.fc2.weight", "mlp.fc2.bias"]
    embed = ["proj.weight", "proj.bias", "norm.weight", "norm.bias"]
    published = ([f"patch_embed1.{k}" for k in embed] + [f"patch_embed2.{k}" for k in embed]
                 + ["pos_embed1", "pos_embed2", "cls_token", "norm.weight", "norm.bias", "head.weight", "head.bias"]
                 + [f"block1.0.{k}" for k in block + ["attn.sr.weight", "attn.sr.bias", "attn.norm.weight",
                                                    "attn.norm.bias"]]
                 + [f"block2.{j}.{k}" for j in (0, 1) for k in block])
    model = randomise(make_v1())
    ours = model.state_dict()
    assert len(published) == len(ours)
    values = dict(zip(sorted(published), range(len(published))))
    filtered = checkpoint_filter_fn({"model": values}, model)
    assert set(filtered) == set(ours)
    assert filtered["stages.1.blocks.1.mlp.fc2.bias"] == values["block2.1.mlp.fc2.bias"]
    assert filtered["stages.1.downsample.proj.weight"] == values["patch_embed2.proj.weight"]
    assert checkpoint_filter_fn(ours, model) is ours  # already in these names


# --- SAR: the numbers ---------------------------------------------------------------------------


def into_last_block(model, x):
    """The tokens and the grid entering the last block of the last stage."""
    seen = {}
    handle = model.stages[-1].blocks[-1].register_forward_pre_hook(lambda m, args: seen.setdefault("in", args))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen["in"]


@pytest.mark.parametrize("query", ["cls", "mean"])
def test_pvt_v1_similarity_and_block_equal_eq_4_and_eq_10_11_written_out(query):
    model = randomise(make_v1()).eval()
    x = torch.randn(2, 3, 32, 32)
    z, grid = into_last_block(model, x)
    assert grid == (4, 4)
    sarvit.attach(model, query=query if query == "mean" else "auto")
    block = model.stages[-1].blocks[-1]
    assert block.query == query
    msa, S_hand = sra_by_hand(block.attn, ln(block.norm1, z), grid, ratio=1, prefix=1, query=query)
    expected = msa + mlp_v1(block.mlp, msa)  # Eq. 10-11: no MSA skip, no LN2, MLP skip
    with torch.no_grad():
        out, S = block.forward_with_similarity(z, grid)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(S, S_hand, rtol=1e-5, atol=1e-5)
        logits, S_model, tokens = model.forward_with_similarity(x, tokens=True)
    torch.testing.assert_close(S_model, S_hand, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tokens, expected[:, 1:].reshape(2, 4, 4, 16), rtol=1e-5, atol=1e-5)
    head = model.head
    torch.testing.assert_close(logits, ln(model.norm, expected)[:, 0] @ head.weight.T + head.bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant, size, grid, key_grid", [
    ({}, 32, (4, 4), (4, 4)),  # sr_ratio 1 in the last stage, as published
    ({"sr_ratios": (4, 2)}, 32, (4, 4), (2, 2)),  # keys on the reduced grid
    ({"linear": True}, 64, (8, 8), (7, 7)),  # linear SRA: keys pooled to 7x7
], ids=["sr1", "sr2", "linear"])
@pytest.mark.parametrize("layout", ["A", "B", "C", "D"])
def test_pvt_v2_similarity_and_block_equal_the_equations_written_out(variant, size, grid, key_grid, layout):
    linear = variant.get("linear", False)
    model = randomise(make_v2(**variant)).eval()
    x = torch.randn(2, 3, size, size)
    z, got_grid = into_last_block(model, x)
    assert tuple(got_grid) == grid
    sarvit.attach(model, layout=layout)
    block = model.stages[-1].blocks[-1]
    assert block.query == "mean"
    ratio = 1 if linear else variant.get("sr_ratios", (2, 1))[-1]
    msa, S_hand = sra_by_hand(block.attn, ln(block.norm1, z), grid, ratio, query="mean", linear=linear)
    mlp = lambda t: mlp_v2(block.mlp, t, grid, linear)  # noqa: E731
    expected = {
        "A": (z + msa) + mlp(ln(block.norm2, z + msa)),  # Eq. 1-2
        "B": msa + mlp(ln(block.norm2, msa)),
        "C": msa + mlp(msa),  # Eq. 10-11
        "D": mlp(msa),
    }[layout]
    with torch.no_grad():
        out, S = block.forward_with_similarity(z, grid)
        logits, S_model, tokens = model.forward_with_similarity(x, tokens=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert S.shape == (2, 2, *key_grid)
    torch.testing.assert_close(S, S_hand, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(S_model, S_hand, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tokens, expected.reshape(2, *grid, 16), rtol=1e-5, atol=1e-5)
    pooled = ln(model.stages[-1].norm, expected).mean(dim=1)  # average pooling of the final tokens
    torch.testing.assert_close(logits, pooled @ model.head.weight.T + model.head.bias, rtol=1e-5, atol=1e-5)


def test_pvt_v2_has_no_class_token_to_query():
    with pytest.raises(ConfigError, match="no class token.*query='mean'"):
        sarvit.attach(make_v2(), query="cls")


@pytest.mark.parametrize("name", ["pvt_v2_b0", "pvt_v2_b2_li"])
def test_pvt_v2_keys_lie_on_7x7_at_224(name):
    model = sarvit.attach(timm.create_model(name, num_classes=10, depths=(1, 1, 1, 2))).eval()
    with torch.no_grad():
        logits, S = model.forward_with_similarity(torch.randn(1, 3, 224, 224))
    assert logits.shape == (1, 10) and S.shape == (1, 8, 7, 7)


# --- SAR: the family contract -------------------------------------------------------------------


def test_pvt_v1_keeps_the_family_contract():
    check_contract(make_v1, torch.randn(2, 3, 32, 32), 5, grid=(4, 4), heads=2, frozen=FROZEN)


@pytest.mark.parametrize("variant, size", [({}, 32), ({"linear": True}, 56)], ids=["sr", "linear"])
def test_pvt_v2_keeps_the_family_contract(variant, size):
    check_contract(lambda: make_v2(**variant), torch.randn(2, 3, size, size), 5, grid=(7, 7) if variant else (4, 4),
                   heads=2, frozen=FROZEN)


# --- training -----------------------------------------------------------------------------------

TINY_CLI = {
    "pvt_tiny": ["--model", "pvt_tiny", "--img-size", "16", "--model-kwargs",
                 "{patch_size: 2, embed_dims: [8, 16], num_heads: [1, 2], mlp_ratios: [2, 2], depths: [1, 2], "
                 "sr_ratios: [2, 1]}"],
    "pvt_v2_b0": ["--model", "pvt_v2_b0", "--img-size", "32", "--model-kwargs",
                  "{embed_dims: [8, 16], num_heads: [1, 2], mlp_ratios: [2, 2], depths: [1, 2], sr_ratios: [2, 1]}"],
}


@pytest.mark.parametrize("sar", ["true", "false"])
@pytest.mark.parametrize("name", sorted(TINY_CLI))
def test_tiny_pvt_trains_from_the_command_line(image_folder, tmp_path, name, sar):
    from sarvit.cli import main

    out = tmp_path / "run"
    assert main(tiny_train_args(image_folder, out, *TINY_CLI[name], "--sar", sar, "--epochs", "1")) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1]
    assert math.isfinite(rows[0]["train_loss"]) and ("train_se" in rows[0]) == (sar == "true")
    model, meta = sarvit.load_model(out, which="last")
    assert meta["model"] == name and meta["query"] == ("cls" if name == "pvt_tiny" else "mean")
    assert isinstance(model.stages[-1].blocks[-1], sarvit.surgery.SARBlock)


@pytest.mark.parametrize("recipe, model", [("pvt_small_in100_100ep", "pvt_small"),
                                           ("pvt_v2_b2_in100_100ep", "pvt_v2_b2")])
def test_recipes_are_pvts_own_protocol(recipe, model):
    """github.com/whai362/PVT (main.py, dist_train.sh): 8 GPUs x 128, lr 5e-4 scaled by batch / 512, AdamW,
    weight decay 0.05, cosine, 5 warm-up epochs from 1e-6 to a floor of 1e-5, drop path 0.1, DeiT's augmentation."""
    from sarvit.config import load_config

    cfg = load_config(recipe)
    assert (cfg.model, cfg.data, cfg.img_size, cfg.epochs) == (model, "imagenet100", 224, 100)
    assert cfg.batch_size * 8 == 1024 and cfg.lr is None and cfg.base_lr * 1024 / 512 == pytest.approx(1e-3)
    assert (cfg.opt, cfg.weight_decay, cfg.sched, cfg.warmup_epochs) == ("adamw", 0.05, "cosine", 5)
    assert (cfg.warmup_lr, cfg.min_lr, cfg.drop_path, cfg.clip_grad, cfg.model_ema) == (1e-6, 1e-5, 0.1, None, False)
    assert (cfg.mixup, cfg.cutmix, cfg.smoothing, cfg.reprob, cfg.crop_pct) == (0.8, 1.0, 0.1, 0.25, 0.875)
    assert cfg.auto_augment == "rand-m9-mstd0.5-inc1" and cfg.sar and cfg.lambda_ == 0.01
