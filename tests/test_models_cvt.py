"""CvT-13 (sarvit.models.cvt) and its SAR surgery (sarvit.surgery.cvt).

The references are written out with plain tensor operations from the paper's definitions:
depthwise convolution + BatchNorm + linear projections, the class token concatenated after
the convolutions, logits scaled by the stage width, and Eq. 4 / Eq. 10-11 of the SAR paper.
"""

import inspect
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import sarvit
import sarvit.models  # noqa: F401  registers cvt_13 with timm
from sarvit.errors import ConfigError
from sarvit.runlog import read_metrics
from tests.conftest import tiny_train_args
from tests.family_contract import check_contract

# a CvT with CvT-13's structure, small enough for the CPU: 32x48 px -> tokens 16x24, 8x12, 4x6; keys 2x3
TINY = dict(dims=(8, 16, 24), depths=(1, 1, 2), num_heads=(1, 2, 3), kernels=(3, 3, 3), strides=(2, 2, 2),
            paddings=(1, 1, 1), img_size=32, num_classes=5)


def make(seed=0, **overrides):
    torch.manual_seed(seed)
    return timm.create_model("cvt_13", **{**TINY, **overrides})


def randomise(model, seed=1):
    """Move every parameter and BatchNorm statistic off its initial value (identity norms, zero
    biases and running means would hide a wrong wiring)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return model.eval()


def conv_out(n, kernel, stride, padding):
    return (n + 2 * padding - kernel) // stride + 1


# --- the block written out -------------------------------------------------------------------

def layer_norm(x, norm):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def conv_projection(proj, grid, stride):
    """Depthwise 3x3 convolution and BatchNorm (eval statistics): (B, C, h, w) -> (B, h'*w', C)."""
    C = grid.shape[1]
    y = F.conv2d(grid, proj.conv.weight, stride=stride, padding=1, groups=C)
    bn = proj.bn
    y = (y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    y = y * bn.weight[:, None, None] + bn.bias[:, None, None]
    return y.flatten(2).transpose(1, 2)


def by_hand(block, z, size, prefix):
    """The CvT block's q, k, v and attention output from its weights, by plain tensor algebra."""
    B, N, C = z.shape
    a = block.attn
    heads = a.num_heads
    x = layer_norm(z, block.norm1)
    cls, patches = x[:, :prefix], x[:, prefix:]
    grid = patches.transpose(1, 2).reshape(B, C, *size)  # row-major token grid
    q = torch.cat([cls, conv_projection(a.conv_proj_q, grid, 1)], 1) @ a.proj_q.weight.T + a.proj_q.bias
    k = torch.cat([cls, conv_projection(a.conv_proj_k, grid, 2)], 1) @ a.proj_k.weight.T + a.proj_k.bias
    v = torch.cat([cls, conv_projection(a.conv_proj_v, grid, 2)], 1) @ a.proj_v.weight.T + a.proj_v.bias
    q, k, v = (t.reshape(B, t.shape[1], heads, C // heads).transpose(1, 2) for t in (q, k, v))  # (B, heads, n, d)
    attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(C), dim=-1)  # CvT: scaled by the stage width C
    msa = (attn @ v).transpose(1, 2).reshape(B, N, C) @ a.proj.weight.T + a.proj.bias
    return q, k, msa


def mlp(block, x):
    h = x @ block.mlp.fc1.weight.T + block.mlp.fc1.bias
    h = h * torch.sigmoid(1.702 * h)  # QuickGELU, the published CvT activation
    return h @ block.mlp.fc2.weight.T + block.mlp.fc2.bias


def tokens_into_last_block(model, x):
    captured = {}
    last = model.stages[-1].blocks[-1]
    handle = last.register_forward_pre_hook(lambda m, args: captured.setdefault("in", args))
    model(x)
    handle.remove()
    z, size = captured["in"]
    return z, tuple(size)


# --- the model ---------------------------------------------------------------------------------

def test_cvt_13_is_a_timm_model_with_a_pretrained_cfg():
    assert "cvt_13" in timm.list_models("cvt*")
    model = timm.create_model("cvt_13", num_classes=100, drop_path_rate=0.1, img_size=160, in_chans=1)
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["interpolation"] == "bicubic" and cfg["num_classes"] == 1000
    modules = dict(model.named_modules())
    assert cfg["classifier"] in modules and modules[cfg["first_conv"]].in_channels == 1
    assert model.head.out_features == 100
    # stochastic depth only in the last stage, linear from 0 to 0.1 over its 10 blocks
    rates = [[getattr(b.drop_path1, "drop_prob", 0.0) for b in s.blocks] for s in model.stages]
    assert rates[:2] == [[0.0], [0.0, 0.0]]
    assert rates[2] == pytest.approx([0.1 * i / 9 for i in range(10)])
    assert model.no_weight_decay() == {"stages.2.cls_token"}


def cvt_parameters_by_formula(dims=(64, 192, 384), depths=(1, 2, 10), kernels=(7, 3, 3), in_chans=3, classes=1000):
    """CvT's parameter count from its definition: embedding, blocks, class token, norm, head."""
    total, c_in = 0, in_chans
    for C, depth, k in zip(dims, depths, kernels):
        total += c_in * C * k * k + C + 2 * C  # convolutional token embedding + LayerNorm
        block = 2 * C  # LN1
        block += 3 * (9 * C + 2 * C)  # depthwise 3x3 (no bias) + BatchNorm, for q, k, v
        block += 3 * (C * C + C) + C * C + C  # linear q, k, v and the output projection
        block += 2 * C + (C * 4 * C + 4 * C) + (4 * C * C + C)  # LN2 + MLP (ratio 4)
        total += depth * block
        c_in = C
    return total + dims[-1] + 2 * dims[-1] + dims[-1] * classes + classes  # class token, final LN, head


def test_cvt_13_has_20_million_parameters():
    with torch.device("meta"):
        model = timm.create_model("cvt_13")
    count = sum(p.numel() for p in model.parameters())
    assert count == cvt_parameters_by_formula()
    assert abs(count - 20.0e6) / 20.0e6 < 0.01  # CvT paper Table 2 / SAR paper Table 10: 20 M


@pytest.mark.parametrize("side,grids", [(224, (56, 28, 14)), (160, (40, 20, 10))])
def test_cvt_13_outputs_and_token_grids(side, grids):
    model = timm.create_model("cvt_13", num_classes=7).eval()
    maps = []
    hooks = [s.register_forward_hook(lambda m, i, o: maps.append(tuple(o.shape))) for s in model.stages[:2]]
    with torch.no_grad():
        out = model(torch.randn(1, 3, side, side))
    assert out.shape == (1, 7) and torch.isfinite(out).all()
    assert maps == [(1, 64, grids[0], grids[0]), (1, 192, grids[1], grids[1])]
    assert grids[0] == conv_out(side, 7, 4, 2) and grids[1] == conv_out(grids[0], 3, 2, 1)
    assert grids[2] == conv_out(grids[1], 3, 2, 1)
    for h in hooks:
        h.remove()


def test_cvt_block_equals_the_paper_written_out():
    model = randomise(make())
    x = torch.randn(2, 3, 32, 48)
    z, size = tokens_into_last_block(model, x)
    assert size == (4, 6) and z.shape == (2, 1 + 24, 24)
    block = model.stages[-1].blocks[-1]
    _, _, msa = by_hand(block, z, size, prefix=1)
    z1 = z + msa  # Eq. 1
    expected = z1 + mlp(block, layer_norm(z1, block.norm2))  # Eq. 2
    torch.testing.assert_close(block(z, size), expected, rtol=1e-5, atol=1e-5)
    # the head reads the final LayerNorm of the class token
    torch.testing.assert_close(model(x), layer_norm(expected, model.norm)[:, 0] @ model.head.weight.T + model.head.bias,
                               rtol=1e-5, atol=1e-5)


def test_class_token_skips_the_convolutions():
    """Changing the class token's input changes only the prefix rows of q/k/v: the patch tokens
    never see it through a convolution (it is concatenated after the projection)."""
    block = randomise(make()).stages[-1].blocks[-1]
    z = torch.randn(1, 1 + 24, 24)
    z2 = z.clone()
    z2[:, 0] += 1.0
    q1, k1, v1 = block.attn.qkv(z, (4, 6))
    q2, k2, v2 = block.attn.qkv(z2, (4, 6))
    for a, b in ((q1, q2), (k1, k2), (v1, v2)):
        torch.testing.assert_close(a[:, :, 1:], b[:, :, 1:])
        assert not torch.allclose(a[:, :, :1], b[:, :, :1])


@pytest.mark.parametrize("bad", [dict(dims=(8, 16, 25)), dict(depths=(1, 1)), dict(drop_path_rate=1.0),
                                 dict(img_size=0), dict(img_size=2, kernels=(7, 3, 3), paddings=(2, 1, 1)),
                                 dict(cls_token=False), dict(qkv_kernel=2), dict(stride_kv=0)])
def test_bad_arguments_say_what_is_wrong(bad):
    with pytest.raises(ConfigError, match="CvT"):
        make(**bad)  # cls_token=False keeps global_pool='token': refused


# --- SAR ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [True, False], ids=["cls", "mean"])
def test_similarity_and_sar_block_equal_the_equations_written_out(cls):
    extra = {} if cls else dict(cls_token=False, global_pool="avg")
    model = randomise(make(**extra))
    x = torch.randn(2, 3, 32, 48)
    z, size = tokens_into_last_block(model, x)
    prefix = int(cls)
    plain_out = model.stages[-1].blocks[-1](z, size)
    sarvit.attach(model)
    block = model.stages[-1].blocks[-1]
    assert block.query == ("cls" if cls else "mean")
    q, k, msa = by_hand(block, z, size, prefix)
    C = z.shape[-1]
    q0 = q[:, :, 0] if cls else q[:, :, prefix:].mean(2)  # (B, heads, d)
    S_hand = torch.einsum("bhd,bhnd->bhn", q0, k[:, :, prefix:]) / math.sqrt(C)  # Eq. 4, the block's own scale
    expected = mlp(block, msa) + msa  # Eq. 10-11: no MSA skip, no LN2, MLP skip kept
    out, S = block.forward_with_similarity(z, size)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(block(z, size), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain_out, expected, atol=1e-3)
    assert S.dtype == torch.float32
    torch.testing.assert_close(S, S_hand, rtol=1e-5, atol=1e-5)
    # model level: S on the stride-2 key grid (2x3) in row-major order; tokens on the token grid
    logits, S_grid, tokens = model.forward_with_similarity(x, tokens=True)
    key_grid = (conv_out(4, 3, 2, 1), conv_out(6, 3, 2, 1))
    assert S_grid.shape == (2, 3, *key_grid) == (2, 3, 2, 3)
    torch.testing.assert_close(S_grid, S_hand.reshape(2, 3, *key_grid), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tokens, expected[:, prefix:].reshape(2, *size, C), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, model(x), rtol=1e-5, atol=1e-5)


def test_cvt_13_similarity_lies_on_a_7x7_key_grid_at_224():
    model = sarvit.attach(timm.create_model("cvt_13", num_classes=3)).eval()
    with torch.no_grad():
        _, S, tokens = model.forward_with_similarity(torch.randn(1, 3, 224, 224), tokens=True)
    assert S.shape == (1, 6, 7, 7) and tokens.shape == (1, 14, 14, 384)


def test_query_cls_without_a_class_token_is_refused():
    with pytest.raises(ConfigError, match="class token"):
        sarvit.attach(make(cls_token=False, global_pool="avg"), query="cls")


LAST_QUERY_PROJECTION = {f"stages.2.blocks.1.attn.conv_proj_q.{n}" for n in ("conv.weight", "bn.weight", "bn.bias")}


@pytest.mark.parametrize("cls,stride_kv", [(False, 1), (False, 2), (True, 1), (True, 2)],
                         ids=["mean-kv1", "mean-kv2", "cls-kv1", "cls-kv2"])
def test_cvt_keeps_the_family_contract(cls, stride_kv):
    extra = dict(stride_kv=stride_kv, **({} if cls else dict(cls_token=False, global_pool="avg")))
    kwargs = {}
    if stride_kv != 1:  # S on the key grid (2x3), the tokens on the token grid (4x6)
        kwargs["token_grid"] = (4, 6)
    if cls:  # see test_only_the_patch_query_projection_of_the_last_block_gets_no_gradient
        kwargs["no_gradient"] = LAST_QUERY_PROJECTION
    missing = set(kwargs) - set(inspect.signature(check_contract).parameters)
    if missing:
        pytest.skip(f"family_contract.check_contract cannot express {sorted(missing)} yet")
    key_grid = (2, 3) if stride_kv == 2 else (4, 6)
    check_contract(lambda: make(**extra), torch.randn(2, 3, 32, 48), 5, grid=key_grid, heads=3,
                   frozen={"stages.2.blocks.1.norm2.weight", "stages.2.blocks.1.norm2.bias"}, **kwargs)


def zero_gradient(model, loss_of):
    x, y = torch.randn(2, 3, 32, 48), torch.tensor([0, 3])
    loss_of(model, x, y).backward()
    return {n for n, p in model.named_parameters() if p.requires_grad and not p.grad.abs().sum() > 0}


def test_only_the_patch_query_projection_of_the_last_block_gets_no_gradient():
    """With a class-token head, the last block's patch queries reach neither the logits nor S
    (the class query skips the convolutions): its query convolution and BatchNorm get a zero
    gradient in the plain CvT as well. SAR adds no other dead parameter, and the mean query
    (no class token) brings the projection back through S."""
    plain = zero_gradient(randomise(make()).train(), lambda m, x, y: F.cross_entropy(m(x), y))
    assert plain == LAST_QUERY_PROJECTION

    def ce_se(m, x, y):
        logits, S = m.forward_with_similarity(x)
        return F.cross_entropy(logits, y) + 0.1 * sarvit.SpatialEntropyLoss()(S)

    assert zero_gradient(sarvit.attach(randomise(make())).train(), ce_se) == LAST_QUERY_PROJECTION
    no_cls = sarvit.attach(randomise(make(cls_token=False, global_pool="avg"))).train()
    assert zero_gradient(no_cls, ce_se) == set()


# --- training ---------------------------------------------------------------------------------

def test_recipe_is_cvts_published_protocol():
    """microsoft/CvT cvt-13-224x224.yaml: 256 images per GPU on 8 GPUs, lr 2.5e-4 per GPU scaled by
    the number of GPUs, AdamW, weight decay 0.05, cosine, 5 warm-up epochs; Table 9: 100 epochs."""
    from sarvit.config import load_config

    cfg = load_config("cvt_13_in100_100ep")
    assert (cfg.model, cfg.img_size, cfg.data, cfg.epochs) == ("cvt_13", 224, "imagenet100", 100)
    assert cfg.batch_size * 8 == 2048
    assert cfg.base_lr * 2048 / 512 == pytest.approx(2.5e-4 * 8)
    assert (cfg.opt, cfg.weight_decay, cfg.sched, cfg.warmup_epochs) == ("adamw", 0.05, "cosine", 5)
    assert (cfg.warmup_lr, cfg.min_lr, cfg.drop_path, cfg.clip_grad) == (1e-6, 1e-5, 0.1, None)
    assert (cfg.mixup, cfg.cutmix, cfg.smoothing, cfg.reprob) == (0.8, 1.0, 0.1, 0.25)
    assert cfg.auto_augment == "rand-m9-mstd0.5-inc1" and cfg.sar and cfg.lambda_ == 0.01


TINY_CLI = ["--model", "cvt_13", "--img-size", "32", "--model-kwargs",
            "{dims: [8, 16, 24], depths: [1, 1, 2], num_heads: [1, 2, 3], kernels: [3, 3, 3], strides: [2, 2, 2], "
            "paddings: [1, 1, 1]}"]


@pytest.mark.parametrize("sar", ["true", "false"])
def test_tiny_cvt_trains_from_the_command_line(image_folder, tmp_path, sar):
    from sarvit.cli import main

    out = tmp_path / "run"
    args = tiny_train_args(image_folder, out, *TINY_CLI, "--sar", sar, "--epochs", "1")
    assert main(args) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1]
    assert math.isfinite(rows[0]["train_loss"]) and ("train_se" in rows[0]) == (sar == "true")
    model, meta = sarvit.load_model(out, which="last")
    assert meta["model"] == "cvt_13" and type(model.stages[-1].blocks[-1]).__name__ == "CvTSARBlock"
