"""T2T-ViT (sarvit.models.t2t_vit) and its SAR family (sarvit.surgery.t2t)."""

import math

import pytest
import timm
import torch
import torch.nn.functional as F

import sarvit
import sarvit.models  # noqa: F401  registers the models with timm
from sarvit.config import load_config
from sarvit.errors import ConfigError, UnsupportedModel
from sarvit.factory import load_model
from sarvit.models.t2t_vit import T2TViT, TokensToToken, t2t_grid
from sarvit.runlog import read_metrics
from tests.conftest import make_image_folder
from tests.family_contract import check_contract

TOKEN_BLOCKS = ["performer", "transformer"]
NAMES = {"performer": "t2t_vit_14", "transformer": "t2t_vit_t_14"}
TINY = dict(img_size=64, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0, token_dim=4, num_classes=5)


def tiny(token_block="performer", seed=0, **overrides):
    torch.manual_seed(seed)
    return T2TViT(token_block=token_block, **{**TINY, **overrides})


# --- registration and size ---------------------------------------------------------------------


def test_registered_with_timm_like_its_own_models():
    assert timm.list_models("t2t*") == ["t2t_vit_14", "t2t_vit_t_14"]
    for name, first in (("t2t_vit_14", "tokens_to_token.attention1.kqv"),
                        ("t2t_vit_t_14", "tokens_to_token.attention1.attn.qkv")):
        cfg = timm.get_pretrained_cfg(name).to_dict()
        assert cfg["input_size"] == (3, 224, 224) and cfg["num_classes"] == 1000 and cfg["crop_pct"] == 0.9
        assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
        assert cfg["classifier"] == "head" and cfg["first_conv"] == first
        with torch.device("meta"):
            model = timm.create_model(name)
        assert dict(model.named_modules())[first].in_features == 3 * 7 * 7  # it reads the pixels
        assert model.pretrained_cfg["architecture"] == name


def _hand_count(token_block: str) -> int:
    """T2T-ViT-14's parameters, layer by layer (widths of the paper: 384, 6 heads, MLP 3, tokens 64)."""
    d, hidden, e, classes = 384, 1152, 64, 1000
    block = 2 * d + 3 * d * d + (d * d + d) + 2 * d + (d * hidden + hidden) + (hidden * d + d)  # no qkv bias
    tokens = 0
    for dim in (3 * 7 * 7, e * 3 * 3):  # the two token blocks
        qkv = dim * 3 * e + (3 * e if token_block == "performer" else 0)  # the Performer's kqv has a bias
        tokens += 2 * dim + qkv + (e * e + e) + 2 * e + 2 * (e * e + e)  # LN1, qkv, proj, LN2, MLP (ratio 1)
    project = 9 * e * d + d
    return 14 * block + tokens + project + d + 2 * d + (d * classes + classes)  # + cls, norm, head


@pytest.mark.parametrize("token_block", TOKEN_BLOCKS)
def test_parameter_count_is_the_papers(token_block):
    with torch.device("meta"):
        model = timm.create_model(NAMES[token_block])
    count = sum(p.numel() for p in model.parameters())
    assert count == _hand_count(token_block)
    assert abs(count - 21.5e6) / 21.5e6 < 0.01  # Table 10 of the SAR paper, Table 2 of T2T-ViT's
    assert "pos_embed" not in dict(model.named_parameters()) and "pos_embed" in model.state_dict()
    if token_block == "performer":  # the random features are a buffer, saved with the weights
        assert "tokens_to_token.attention1.w" in model.state_dict()


@pytest.mark.parametrize("token_block", TOKEN_BLOCKS)
@pytest.mark.parametrize("size, grid", [(224, 14), (160, 10), (288, 18)])
def test_full_size_model_through_timm_at_several_resolutions(token_block, size, grid):
    with torch.device("meta"):  # shapes only: no memory, no arithmetic
        model = timm.create_model(NAMES[token_block], num_classes=100, drop_path_rate=0.1, img_size=size,
                                  in_chans=1)
        logits = model(torch.empty(2, 1, size, size))
        features = model.forward_features(torch.empty(2, 1, size, size))
    assert logits.shape == (2, 100) and features.shape == (2, 1 + grid * grid, 384)
    assert model.patch_embed.grid_size == (grid, grid) and model.pos_embed.shape == (1, 1 + grid * grid, 384)
    assert len(model.blocks) == 14 and model.blocks[0].attn.num_heads == 6 and model.blocks[0].attn.qkv.bias is None
    assert model.blocks[0].mlp.fc1.out_features == 3 * 384 and model.num_prefix_tokens == 1
    rates = [b.drop_path1.drop_prob if hasattr(b.drop_path1, "drop_prob") else 0.0 for b in model.blocks]
    assert rates == pytest.approx([0.1 * i / 13 for i in range(14)])  # linear in depth, up to 0.1


def test_token_grid_by_hand():
    # floor((s + 2p - k) / stride) + 1 per soft split, written out: 224 -> 56 -> 28 -> 14
    assert t2t_grid((224, 224)) == (14, 14)
    assert t2t_grid((288, 160)) == (18, 10)
    assert t2t_grid((100, 100)) == (7, 7)  # 100 -> 25 -> 13 -> 7: no pixel is left out
    model = tiny(embed_dim=8, depth=1, img_size=224).eval()
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 224, 224)).shape == (1, 1 + 14 * 14, 8)


# --- the T2T module, written out -------------------------------------------------------------------


def soft_split_by_hand(image, kernel, stride, padding):
    """(B, C, H, W) -> (B, h*w, C*k*k): every window, channel-major, windows in row-major order."""
    padded = F.pad(image, (padding,) * 4)
    B, C, H, W = padded.shape
    rows = range(0, H - kernel + 1, stride)
    cols = range(0, W - kernel + 1, stride)
    windows = [padded[:, :, r:r + kernel, c:c + kernel].reshape(B, C * kernel * kernel) for r in rows for c in cols]
    return torch.stack(windows, dim=1), (len(rows), len(cols))


def layer_norm(x, norm):
    return F.layer_norm(x, norm.weight.shape, norm.weight, norm.bias, norm.eps)


def linear(x, layer):
    return x @ layer.weight.T + (layer.bias if layer.bias is not None else 0)


def performer_by_hand(block, x):
    """Published FAVOR+ token block with the full T x T kernel matrix phi(q) phi(k)^T."""
    e = block.emb
    k, q, v = linear(layer_norm(x, block.norm1), block.kqv).split(e, dim=-1)
    w = block.w

    def phi(t):  # exp(w t - |t|^2 / 2) / sqrt(m)
        return torch.exp(t @ w.T - (t * t).sum(-1, keepdim=True) / 2) / math.sqrt(w.shape[0])

    kernel = phi(q) @ phi(k).transpose(1, 2)  # (B, T, T)
    y = (kernel @ v) / (kernel.sum(-1, keepdim=True) + 1e-8)
    z = v + linear(y, block.proj)
    return z + linear(F.gelu(linear(layer_norm(z, block.norm2), block.mlp[0])), block.mlp[2])


def transformer_by_hand(block, x):
    """One-head softmax attention scaled by the input width, v as the skip, MLP ratio 1."""
    e = block.attn.token_dim
    q, k, v = linear(layer_norm(x, block.norm1), block.attn.qkv).split(e, dim=-1)
    attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(x.shape[-1]), dim=-1)
    z = v + linear(attn @ v, block.attn.proj)
    return z + linear(F.gelu(linear(layer_norm(z, block.norm2), block.mlp.fc1)), block.mlp.fc2)


@pytest.mark.parametrize("token_block", TOKEN_BLOCKS)
def test_tokens_to_token_equals_the_paper_written_out(token_block):
    torch.manual_seed(0)
    t2t = TokensToToken((32, 40), in_chans=3, embed_dim=8, token_dim=4, token_block=token_block).eval()
    with torch.no_grad():
        for p in t2t.parameters():  # off the identity-like initialisation
            p.add_(0.3 * torch.randn_like(p))
    by_hand = performer_by_hand if token_block == "performer" else transformer_by_hand
    images = torch.randn(2, 3, 32, 40)
    x, (h, w) = soft_split_by_hand(images, 7, 4, 2)  # (B, 8*10, 3*7*7)
    for attention in (t2t.attention1, t2t.attention2):
        x = by_hand(attention, x)  # (B, h*w, 4)
        grid = x.reshape(2, h, w, 4).permute(0, 3, 1, 2)  # re-structurization: (B, 4, h, w)
        x, (h, w) = soft_split_by_hand(grid, 3, 2, 1)
    expected = linear(x, t2t.project)  # (B, 2*3, 8)
    assert (h, w) == (2, 3) == t2t.grid_size
    with torch.no_grad():
        torch.testing.assert_close(t2t(images), expected, rtol=1e-5, atol=1e-5)


# --- position embedding and input size -------------------------------------------------------------


def sinusoid_by_loop(positions, dim):
    """Vaswani et al.'s table: sin at even channels, cos at odd ones, wavelength 10000^(2i/dim)."""
    table = torch.zeros(positions, dim, dtype=torch.float64)
    for p in range(positions):
        for c in range(dim):
            angle = p / 10000 ** (2 * (c // 2) / dim)
            table[p, c] = math.sin(angle) if c % 2 == 0 else math.cos(angle)
    return table.float()


def test_position_embedding_is_the_fixed_sinusoid_for_the_models_grid():
    for size, grid in ((64, 4), (96, 6)):
        model = tiny(img_size=size)
        assert model.pos_embed.shape == (1, 1 + grid * grid, 16)
        torch.testing.assert_close(model.pos_embed[0], sinusoid_by_loop(1 + grid * grid, 16))
    assert "pos_embed" not in dict(model.named_parameters())  # not trained
    with torch.no_grad():
        model.pos_embed.zero_()
    fresh = tiny(img_size=96, seed=3)
    fresh.load_state_dict(model.state_dict())  # a buffer that the weights files carry
    assert fresh.pos_embed.abs().sum() == 0


def test_set_input_size_resamples_the_trained_grid_and_wrong_inputs_are_named():
    model = tiny(img_size=64).eval()  # a 4x4 grid
    before = model.pos_embed.clone()
    with pytest.raises(ValueError, match=r"96x96 input gives a 6x6 token grid.*set_input_size"):
        model(torch.randn(1, 3, 96, 96))
    model.set_input_size(96)
    assert model.patch_embed.grid_size == (6, 6) and model.patch_embed.img_size == (96, 96)
    patches = before[:, 1:].reshape(1, 4, 4, 16).permute(0, 3, 1, 2)  # (1, C, 4, 4)
    # bicubic with PIL's kernel (antialias=True), as timm resamples the position embeddings of its ViTs
    expected = F.interpolate(patches, size=(6, 6), mode="bicubic", align_corners=False, antialias=True)  # (1, C, 6, 6)
    torch.testing.assert_close(model.pos_embed[:, 0], before[:, 0])  # the [CLS] position is kept
    torch.testing.assert_close(model.pos_embed[:, 1:], expected.flatten(2).transpose(1, 2))
    with torch.no_grad():
        assert model(torch.randn(2, 3, 96, 96)).shape == (2, 5)


@pytest.mark.parametrize("kwargs, message", [
    ({"token_block": "convolution"}, "token_block must be one of performer, transformer"),
    ({"embed_dim": 15}, "embed_dim 15 must be a multiple of num_heads"),
    ({"drop_path_rate": 1.0}, r"drop_path_rate must be in \[0, 1\)"),
    ({"token_dim": 0}, "token_dim must be a positive integer"),
    ({"img_size": 8}, "img_size must be at least 16"),
])
def test_bad_arguments_are_refused_with_the_reason(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        tiny(**kwargs)
    with pytest.raises(ConfigError, match=message):  # through the factory, as --model-kwargs
        extra = {k: v for k, v in kwargs.items() if k not in ("img_size", "drop_path_rate")}
        sarvit.create_model("t2t_vit_14", 4, img_size=kwargs.get("img_size", 64),
                            drop_path=kwargs.get("drop_path_rate", 0.0), model_kwargs=extra)


def test_performer_stays_finite_under_fp16_autocast():
    # phi(x) = exp(w x - |x|^2 / 2) / sqrt(m) reaches exp(m / 2) / sqrt(m) (~1.6e6 for m = 32) when x is
    # a row of w: beyond fp16 (65504); the published code then divides inf by inf.
    model = tiny(token_dim=64, depth=1, embed_dim=8).eval()
    block = model.tokens_to_token.attention1
    with torch.no_grad():
        block.kqv.weight.zero_()
        block.kqv.bias.copy_(torch.cat([block.w[0], block.w[0], torch.linspace(-1, 1, 64)]))  # k = q = w_0
    x = torch.randn(2, 16, 147)
    with torch.no_grad():
        reference = block(x)
        with torch.autocast("cpu", dtype=torch.float16):
            low = block(x)
    assert block.features(block.w[:1]).max() > 65504
    assert torch.isfinite(low).all()
    torch.testing.assert_close(low.float(), reference, rtol=2e-2, atol=2e-2)



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amp", [torch.float16, torch.bfloat16])
def test_full_size_sar_step_on_cuda_under_autocast(amp):
    torch.manual_seed(0)
    model = sarvit.create_model("t2t_vit_14", 10).cuda()
    x, y = torch.randn(4, 3, 224, 224, device="cuda"), torch.arange(4, device="cuda")
    with torch.no_grad():
        reference, S_reference = model.eval().forward_with_similarity(x)  # float32
    with torch.autocast("cuda", dtype=amp):
        logits, S = model.train().forward_with_similarity(x)
        loss = F.cross_entropy(logits.float(), y) + 0.01 * sarvit.SpatialEntropyLoss()(S)
    loss.backward()
    assert S.shape == (4, 6, 14, 14) and S.dtype == torch.float32 and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad(), torch.autocast("cuda", dtype=amp):
        logits_eval, S_eval = model.eval().forward_with_similarity(x)
    torch.testing.assert_close(logits_eval.float(), reference, rtol=0.05, atol=0.05)
    torch.testing.assert_close(S_eval, S_reference, rtol=0.05, atol=0.05)

# --- SAR ----------------------------------------------------------------------------------------


def tokens_into_last_block(model, x):
    captured = {}
    handle = model.blocks[-2].register_forward_hook(lambda m, i, o: captured.setdefault("z", o))
    model(x)
    handle.remove()
    return captured["z"]


@pytest.mark.parametrize("token_block", TOKEN_BLOCKS)
@pytest.mark.parametrize("query", ["cls", "mean"])
def test_similarity_and_rewired_block_equal_eq_4_and_10_11_by_hand(token_block, query):
    model = tiny(token_block).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 3, 64, 64)
    z = tokens_into_last_block(model, x)  # (B, 1 + 16, 16)
    sarvit.attach(model, query=query)
    block = model.blocks[-1]
    B, N, C = z.shape
    heads, d = 2, 8
    qkv = layer_norm(z, block.norm1) @ block.attn.qkv.weight.T  # no qkv bias: (B, N, 3C)
    q, k, v = (t.reshape(B, N, heads, d).transpose(1, 2) for t in qkv.split(C, dim=-1))  # (B, heads, N, d)
    q0 = q[:, :, 0] if query == "cls" else q[:, :, 1:].mean(dim=2)  # (B, heads, d)
    S_hand = torch.einsum("bhd,bhnd->bhn", q0, k[:, :, 1:]) / math.sqrt(d)  # Eq. 4, patch keys only
    attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d), dim=-1)
    msa = linear((attn @ v).transpose(1, 2).reshape(B, N, C), block.attn.proj)
    expected = msa + linear(F.gelu(linear(msa, block.mlp.fc1)), block.mlp.fc2)  # Eq. 10-11: no MSA skip, no LN2
    with torch.no_grad():
        out, S = block.forward_with_similarity(z)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(S, S_hand, rtol=1e-5, atol=1e-5)
        logits, S_grid, tokens = model.forward_with_similarity(x, tokens=True)
        torch.testing.assert_close(S_grid, S_hand.reshape(B, heads, 4, 4), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tokens, expected[:, 1:].reshape(B, 4, 4, C), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits, linear(layer_norm(expected, model.norm)[:, 0], model.head), rtol=1e-5,
                                   atol=1e-5)
        torch.testing.assert_close(logits, model(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("token_block", TOKEN_BLOCKS)
def test_family_contract(token_block):
    check_contract(lambda: tiny(token_block), torch.randn(2, 3, 64, 64), 5, grid=(4, 4), heads=2,
                   frozen={"blocks.1.norm2.weight", "blocks.1.norm2.bias"})


def test_similarity_lies_on_the_14x14_grid_at_224():
    model = sarvit.attach(tiny(img_size=224, depth=1)).eval()  # narrow, but the T2T module of the paper
    with torch.no_grad():
        logits, S = model.forward_with_similarity(torch.randn(1, 3, 224, 224))
    assert S.shape == (1, 2, 14, 14) and logits.shape == (1, 5)
    with torch.device("meta"):  # the full model: 6 heads in the rewired last block
        full = sarvit.create_model("t2t_vit_14", 100)
    assert type(full.blocks[-1]).__name__ == "SARBlock" and full.blocks[-1].attn.num_heads == 6
    assert full.blocks[-1].query == "cls" and full.blocks[-1].layout.msa_skip is False


def test_the_family_is_named_where_a_model_is_refused():
    with pytest.raises(UnsupportedModel, match=r"T2T-ViT \(sarvit\.models\.t2t_vit\.T2TViT"):
        sarvit.attach(torch.nn.Linear(2, 2))
    model = sarvit.attach(tiny())
    with pytest.raises(ValueError, match="already has SAR attached"):
        sarvit.attach(model)


def test_performer_random_features_travel_with_the_weights():
    a, b = tiny(seed=0, token_dim=8).eval(), tiny(seed=1, token_dim=8).eval()
    with torch.no_grad():
        for p in a.parameters():  # queries and keys large enough for w to matter
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = a(x)
        b.load_state_dict({k: v for k, v in a.state_dict().items() if not k.endswith(".w")}, strict=False)
        assert not torch.allclose(b(x), want, atol=1e-3)  # other random features: another function
        b.load_state_dict(a.state_dict(), strict=True)
        torch.testing.assert_close(b(x), want)


# --- training ------------------------------------------------------------------------------------


def test_tiny_sar_training_run_and_its_weights_reload(tmp_path):
    from sarvit.cli import main
    from sarvit.data import build_transform, open_dataset

    data = make_image_folder(tmp_path / "data", train=6, val=3, size=64)
    out = tmp_path / "run"
    kwargs = "{embed_dim: 16, depth: 2, num_heads: 2, mlp_ratio: 2.0, token_dim: 4}"
    assert main([
        "train", "--data", str(data), "--output", str(out), "--model", "t2t_vit_14", "--img-size", "64",
        "--model-kwargs", kwargs, "--epochs", "1", "--batch-size", "8", "--lr", "1e-3", "--warmup-epochs", "0",
        "--workers", "0", "--auto-augment", "none", "--mixup", "0", "--cutmix", "0", "--reprob", "0",
        "--drop-path", "0.1", "--scale", "0.5,1", "--crop-pct", "1.0", "--device", "cpu",
    ]) == 0
    row = read_metrics(out / "metrics.jsonl")[-1]
    assert row["epoch"] == 1 and math.isfinite(row["train_se"]) and math.isfinite(row["train_ce"])
    model, meta = load_model(out, which="last")
    assert meta["model"] == "t2t_vit_14" and meta["layout"] == "C" and isinstance(model, T2TViT)
    model.eval()
    raw = open_dataset(str(data), split="val")
    transform = build_transform("imagefolder", 64, False, crop_pct=1.0)
    correct = 0
    for image, target in (raw.dataset[i] for i in range(len(raw.dataset))):  # one image at a time
        with torch.no_grad():
            logits, S = model.forward_with_similarity(transform(image)[None])
        assert S.shape == (1, 2, 4, 4)
        correct += int(logits.argmax(1).item() == target)
    assert row["val_top1"] == pytest.approx(100 * correct / len(raw.dataset))


def test_recipe_is_t2t_vits_own():
    cfg = load_config("t2t_vit_14_in100_100ep")
    assert (cfg.model, cfg.data, cfg.img_size, cfg.epochs) == ("t2t_vit_14", "imagenet100", 224, 100)
    # appendix E.2: batch 1024 (8 x 128), AdamW, lr 0.001, weight decay 0.05; DeiT augmentation
    assert (cfg.batch_size * 8, cfg.opt, cfg.lr, cfg.weight_decay) == (1024, "adamw", 1e-3, 0.05)
    assert (cfg.mixup, cfg.cutmix, cfg.smoothing, cfg.reprob, cfg.drop_path) == (0.8, 1.0, 0.1, 0.25, 0.1)
    assert (cfg.sar, cfg.lambda_, cfg.warmup_epochs, cfg.crop_pct) == (True, 0.01, 10, 0.9)
