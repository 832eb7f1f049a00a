"""SAR surgery for timm's Swin and torchvision's ViT, and the family contract on every family here.

``S`` and the rewired last block are written out from each block's own weights with plain
tensor algebra (Swin's relative position bias from its table with a loop over positions).
"""

import re

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT

import sarvit
from sarvit.cli import main
from sarvit.errors import ConfigError, UnsupportedModel
from sarvit.factory import create_model, load_model
from tests.conftest import tiny_train_args
from tests.family_contract import check_compile, check_contract

VIT_TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=5)
SWIN_TINY = dict(img_size=32, patch_size=4, embed_dim=8, depths=(1, 2), num_heads=(1, 2), window_size=4,
                 mlp_ratio=2.0, num_classes=5)  # last stage: 4 x 4 grid, one 4 x 4 window, 16 channels, 2 heads
TV_TINY = dict(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5)


def make_timm_vit(**overrides):
    return timm.create_model("vit_tiny_patch16_224", **{**VIT_TINY, **overrides})


def make_swin(**overrides):
    return timm.create_model("swin_tiny_patch4_window7_224", **{**SWIN_TINY, **overrides})


def make_torchvision_vit(**overrides):
    return TorchvisionViT(**{**TV_TINY, **overrides})


def input_of(block, model, x):
    """The tokens that enter ``block`` when ``model(x)`` runs."""
    captured = {}
    handle = block.register_forward_pre_hook(lambda m, args: captured.setdefault("z", args[0]))
    model(x)
    handle.remove()
    return captured["z"]


def layer_norm(norm, x):
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def heads_split(t, heads):
    B, N, C = t.shape
    return t.reshape(B, N, heads, C // heads).transpose(1, 2)  # (B, heads, N, d)


def heads_merge(t):
    B, heads, N, d = t.shape
    return t.transpose(1, 2).reshape(B, N, heads * d)  # (B, N, C)


# --- the family contract ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [{}, {"class_token": False, "global_pool": "avg"}], ids=["cls", "no_cls"])
def test_timm_vit_keeps_the_family_contract(overrides):
    check_contract(lambda: make_timm_vit(**overrides), torch.randn(2, 3, 32, 32), 5, grid=(4, 4), heads=2,
                   frozen={"blocks.1.norm2.weight", "blocks.1.norm2.bias"})


def test_swin_keeps_the_family_contract():
    check_contract(make_swin, torch.randn(2, 3, 32, 32), 5, grid=(4, 4), heads=2,
                   frozen={"layers.1.blocks.1.norm2.weight", "layers.1.blocks.1.norm2.bias"})


def test_torchvision_vit_keeps_the_family_contract():
    check_contract(make_torchvision_vit, torch.randn(2, 3, 32, 32), 5, grid=(4, 4), heads=2,
                   frozen={"encoder.layers.encoder_layer_1.ln_2.weight", "encoder.layers.encoder_layer_1.ln_2.bias"})


def _compile_cases():
    """Family -> (tiny plain model, input), as small as the family allows: compiling is slow
    (its time grows with the number of operations, not with the tensors)."""
    from tests.test_models_cvt import make as make_cvt
    from tests.test_models_pvt import make_v1, make_v2
    from tests.test_models_t2t import tiny as make_t2t

    return {
        "timm_vit": (lambda: make_timm_vit(depth=1), 32),
        "t2t": (lambda: make_t2t(depth=1, img_size=32), 32),
        "pvt_v1": (lambda: make_v1(depths=(1, 1)), 32),
        "pvt_v2": (lambda: make_v2(depths=(1, 1)), 32),
        "cvt": (lambda: make_cvt(depths=(1, 1, 1)), 32),
        "swin": (lambda: make_swin(depths=(1, 1)), 32),
        "torchvision_vit": (lambda: make_torchvision_vit(num_layers=1), 32),
    }


@pytest.mark.slow
@pytest.mark.parametrize("family", ["timm_vit", "t2t", "pvt_v1", "pvt_v2", "cvt", "swin", "torchvision_vit"])
def test_family_compiles(family):
    make, size = _compile_cases()[family]
    check_compile(make, torch.randn(2, 3, size, size))


# --- Swin -----------------------------------------------------------------------------------------------------------


def relative_position_bias(table, H, W):
    """Swin's bias B[h, i, j] for a window of H x W positions, from its ((2H-1)(2W-1), heads) table."""
    N = H * W
    bias = torch.empty(table.shape[1], N, N)
    for i in range(N):
        for j in range(N):
            (yi, xi), (yj, xj) = divmod(i, W), divmod(j, W)
            bias[:, i, j] = table[(yi - yj + H - 1) * (2 * W - 1) + (xi - xj + W - 1)]
    return bias


def swin_by_hand(block, z):
    """Eq. 4 (mean query, no bias) and Eq. 10-11 for a Swin block over one window; z: (B, H, W, C)."""
    B, H, W, C = z.shape
    heads = block.attn.num_heads
    d = C // heads
    x = layer_norm(block.norm1, z).reshape(B, H * W, C)
    q, k, v = (heads_split(t, heads) for t in (x @ block.attn.qkv.weight.T + block.attn.qkv.bias).split(C, dim=-1))
    logits = q @ k.transpose(-2, -1) / d**0.5 + relative_position_bias(block.attn.relative_position_bias_table, H, W)
    msa = heads_merge(torch.softmax(logits, dim=-1) @ v) @ block.attn.proj.weight.T + block.attn.proj.bias
    msa = msa.reshape(B, H, W, C)
    S = torch.einsum("bhd,bhnd->bhn", q.mean(dim=2), k) / d**0.5  # (B, heads, H*W)
    mlp = block.mlp.fc2(F.gelu(block.mlp.fc1(msa)))
    return msa + mlp, S.reshape(B, heads, H, W)  # Eq. 11 with z' = MSA(LN1(z)) (Eq. 10)


def test_swin_similarity_and_block_equal_the_equations_written_out():
    torch.manual_seed(0)
    model = make_swin().eval()
    with torch.no_grad():
        model.layers[-1].blocks[-1].attn.relative_position_bias_table.normal_(0, 1)  # a bias that matters
    x = torch.randn(2, 3, 32, 32)
    z = input_of(model.layers[-1].blocks[-1], model, x)  # (2, 4, 4, 16)
    plain_out = model.layers[-1].blocks[-1](z)
    sarvit.attach(model)
    block = model.layers[-1].blocks[-1]
    assert block.query == "mean"
    want, S_hand = swin_by_hand(block, z)
    out, S = block.forward_with_similarity(z)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(block(z), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain_out, want, atol=1e-3)
    torch.testing.assert_close(S.reshape(S_hand.shape), S_hand, rtol=1e-5, atol=1e-5)
    logits, S_grid = model.forward_with_similarity(x)
    torch.testing.assert_close(S_grid, S_hand, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, model(x), rtol=1e-6, atol=1e-6)


def test_swin_relative_position_bias_shapes_the_attention_but_not_S():
    model = sarvit.attach(make_swin()).eval()
    x = torch.randn(2, 3, 32, 32)
    attn = model.layers[-1].blocks[-1].attn
    logits, S = model.forward_with_similarity(x)
    with torch.no_grad():
        attn.relative_position_bias_table.normal_(0, 1)
    logits_b, S_b = model.forward_with_similarity(x)
    torch.testing.assert_close(S_b, S)  # Eq. 4 is q.k * scale: the bias is not in S
    assert not torch.allclose(logits_b, logits, atol=1e-4)  # the block's attention keeps its bias
    model.train()
    _, S = model.forward_with_similarity(x)
    (S * torch.randn_like(S)).sum().backward()  # any loss on S, the SE term included
    assert attn.relative_position_bias_table.grad is None or attn.relative_position_bias_table.grad.abs().sum() == 0
    assert attn.qkv.weight.grad[:32].abs().sum() > 0  # it reaches the queries and keys
    assert attn.qkv.weight.grad[32:].abs().sum() == 0  # not the values


@pytest.mark.parametrize("name, img_size, grid", [
    ("swin_tiny_patch4_window7_224", 224, (7, 7)),
    ("swin_base_patch4_window12_384", 384, (12, 12)),
])
def test_swin_last_stage_is_one_window_at_its_resolution(name, img_size, grid):
    with torch.device("meta"):  # the published configuration, shapes only
        last = timm.create_model(name).layers[-1].blocks[-1]
    assert tuple(last.input_resolution) == grid and tuple(last.window_size) == grid  # one window
    assert tuple(last.shift_size) == (0, 0)  # timm drops the shift when the window covers the grid
    narrow = timm.create_model(name, embed_dim=8, num_heads=(1, 1, 2, 2), num_classes=10)  # same geometry
    logits, S = sarvit.attach(narrow).eval().forward_with_similarity(torch.randn(1, 3, img_size, img_size))
    assert S.shape == (1, 2, *grid) and logits.shape == (1, 10)


def test_swin_with_several_last_stage_windows_is_refused_with_a_way_out():
    with pytest.raises(ConfigError, match="grid is 8x8 and its window 4x4 \\(4 window\\(s\\), shifted\\)") as caught:
        sarvit.attach(make_swin(img_size=64))
    kwargs = yaml.safe_load(re.search(r"--model-kwargs '(.*)'", str(caught.value)).group(1))
    assert kwargs == {"window_size": [[4, 4], [8, 8]]}
    model = sarvit.attach(make_swin(img_size=64, **kwargs))  # the advice works
    _, S = model.forward_with_similarity(torch.randn(1, 3, 64, 64))
    assert S.shape == (1, 2, 8, 8)
    dynamic = sarvit.attach(make_swin(dynamic_img_size=True))
    with pytest.raises(ConfigError, match="grid is 8x8 and its window 4x4"):
        dynamic.forward_with_similarity(torch.randn(1, 3, 64, 64))
    with pytest.raises(ConfigError, match="Swin has no class token"):
        sarvit.attach(make_swin(), query="cls")


# --- torchvision's ViT ----------------------------------------------------------------------------------------------


def torchvision_by_hand(block, z, query):
    """Eq. 4 and Eq. 10-11 for torchvision's EncoderBlock, from its packed in-projection; z: (B, N, C)."""
    B, N, C = z.shape
    mha = block.self_attention
    heads, d = mha.num_heads, C // mha.num_heads
    x = layer_norm(block.ln_1, z)
    w_q, w_k, w_v = mha.in_proj_weight.split(C)
    b_q, b_k, b_v = mha.in_proj_bias.split(C)
    q, k, v = (heads_split(x @ w.T + b, heads) for w, b in ((w_q, b_q), (w_k, b_k), (w_v, b_v)))
    attn = torch.softmax(q @ k.transpose(-2, -1) / d**0.5, dim=-1)
    msa = heads_merge(attn @ v) @ mha.out_proj.weight.T + mha.out_proj.bias  # Eq. 10: no skip
    q0 = q[:, :, 0] if query == "cls" else q[:, :, 1:].mean(dim=2)  # (B, heads, d)
    S = torch.einsum("bhd,bhnd->bhn", q0, k[:, :, 1:]) / d**0.5
    mlp = block.mlp[3](F.gelu(block.mlp[0](msa)))
    return msa + mlp, S  # Eq. 11: no LN2


@pytest.mark.parametrize("query", ["cls", "mean"])
def test_torchvision_similarity_and_block_equal_the_equations_written_out(query):
    torch.manual_seed(0)
    model = make_torchvision_vit().eval()
    x = torch.randn(2, 3, 32, 32)
    z = input_of(model.encoder.layers[-1], model, x)  # (2, 17, 32)
    plain_out = model.encoder.layers[-1](z)
    sarvit.attach(model, query=query)
    block = model.encoder.layers[-1]
    want, S_hand = torchvision_by_hand(block, z, query)
    out, S = block.forward_with_similarity(z)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(block(z), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain_out, want, atol=1e-3)
    torch.testing.assert_close(S, S_hand, rtol=1e-5, atol=1e-5)
    logits, S_grid = model.forward_with_similarity(x)
    torch.testing.assert_close(S_grid, S_hand.reshape(2, 2, 4, 4), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, model(x), rtol=1e-6, atol=1e-6)


def test_torchvision_vit_b_16_attaches_as_built():
    import torchvision

    model = sarvit.attach(torchvision.models.vit_b_16(num_classes=10)).eval()
    assert sarvit.surgery.sar_block(model).query == "cls"
    with torch.device("meta"):
        assert list(model.state_dict()) == list(torchvision.models.vit_b_16(num_classes=10).state_dict())
    with torch.no_grad():
        logits, S = model.forward_with_similarity(torch.randn(1, 3, 224, 224))
    assert S.shape == (1, 12, 14, 14) and logits.shape == (1, 10)


def test_torchvision_models_by_name_in_the_factory():
    with torch.device("meta"):  # shapes only
        model = create_model("torchvision:vit_b_32", 7, img_size=96)
        assert model.image_size == 96 and model.heads.head.out_features == 7
        assert sarvit.surgery.sar_block(model) is model.encoder.layers[-1]
        with pytest.raises(ConfigError, match="Did you mean torchvision:vit_b_16"):
            create_model("torchvision:vit_b_61", 7)
        with pytest.raises(ConfigError, match="no stochastic depth"):
            create_model("torchvision:vit_b_16", 7, drop_path=0.1)
        with pytest.raises(ConfigError, match="not a multiple of the patch size 16x16"):
            create_model("torchvision:vit_b_16", 7, img_size=100)
        with pytest.raises(ConfigError, match="does not accept these arguments"):
            create_model("torchvision:vit_b_16", 7, model_kwargs={"hidden_dim": 64})
        with pytest.raises(UnsupportedModel, match="torchvision VisionTransformer"):
            create_model("torchvision:resnet18", 7)


# --- training from the command line ---------------------------------------------------------------------------------


def train(capsys, data, out, *extra):
    assert main([str(a) for a in tiny_train_args(data, out, "--epochs", "1", *extra)]) == 0
    return capsys.readouterr().out


def test_swin_trains_from_the_command_line(image_folder, tmp_path, capsys):
    kwargs = "{patch_size: 4, embed_dim: 8, depths: [1, 2], num_heads: [1, 2], window_size: 4, mlp_ratio: 2.0}"
    printed = train(capsys, image_folder, tmp_path / "run", "--model", "swin_tiny_patch4_window7_224",
                    "--img-size", "32", "--model-kwargs", kwargs)
    assert "query: mean of the patch queries (no class token)" in printed
    model, meta = load_model(tmp_path / "run", which="last")
    assert meta["query"] == "mean" and meta["model"] == "swin_tiny_patch4_window7_224"
    assert model.forward_with_similarity(torch.randn(2, 3, 32, 32))[1].shape == (2, 2, 4, 4)


def test_torchvision_vit_trains_from_the_command_line(image_folder, tmp_path, capsys, monkeypatch):
    from torchvision.models import _api

    def tiny_vit_b_16(weights=None, **kwargs):  # vit_b_16's builder, at a size the CPU trains in seconds
        assert weights is None
        return TorchvisionViT(**{**TV_TINY, "patch_size": 4, "hidden_dim": 16, "mlp_dim": 32, **kwargs})

    monkeypatch.setitem(_api.BUILTIN_MODELS, "vit_b_16", tiny_vit_b_16)
    printed = train(capsys, image_folder, tmp_path / "run", "--model", "torchvision:vit_b_16", "--model-kwargs", "{}")
    assert "query: the class token" in printed
    model, meta = load_model(tmp_path / "run", which="last")
    assert meta["query"] == "cls" and meta["model"] == "torchvision:vit_b_16"
    assert isinstance(model, TorchvisionViT)
    assert model.forward_with_similarity(torch.randn(2, 3, 16, 16))[1].shape == (2, 2, 4, 4)


def test_swin_recipe_follows_the_swin_paper():
    from sarvit.config import load_config, validate_with_libraries

    cfg = validate_with_libraries(load_config("swin_tiny_in100_100ep"))
    assert cfg.model == "swin_tiny_patch4_window7_224" and cfg.img_size == 224
    global_batch = 8 * cfg.batch_size  # the launch line: 8 processes
    assert global_batch == 1024 and cfg.base_lr * global_batch / 512 == pytest.approx(1e-3)  # AdamW lr 1e-3 at 1024
    assert (cfg.opt, cfg.weight_decay, cfg.sched, cfg.warmup_epochs) == ("adamw", 0.05, "cosine", 20)
    assert (cfg.drop_path, cfg.clip_grad) == (0.2, 5.0)
    assert (cfg.mixup, cfg.cutmix, cfg.smoothing, cfg.reprob) == (0.8, 1.0, 0.1, 0.25)  # DeiT's augmentations


def test_every_family_has_a_compile_case():
    families = [sarvit.surgery.family_of(make()) for make, _ in _compile_cases().values()]
    assert sorted(f.NAME for f in families) == sorted(f.NAME for f in sarvit.surgery.FAMILIES)
