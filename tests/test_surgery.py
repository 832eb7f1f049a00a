import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block, ResPostBlock, VisionTransformer

import sarvit
from sarvit.errors import ConfigError, UnsupportedModel

TINY = dict(img_size=32, patch_size=4, depth=3, embed_dim=48, num_heads=3, num_classes=5)
FAMILY = {
    "vit": ("vit_tiny_patch16_224", {}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}),
    "deit3_layerscale": ("deit3_small_patch16_224", {}),
    "registers_no_cls": ("vit_base_patch16_reg4_gap_256", {}),
    "qk_norm": ("vit_tiny_patch16_224", {"qk_norm": True}),
    "dynamic": ("vit_tiny_patch16_224", {"dynamic_img_size": True}),
}


def make(kind="vit", seed=0, **overrides):
    name, extra = FAMILY[kind]
    torch.manual_seed(seed)
    return timm.create_model(name, **{**TINY, **extra, **overrides})


def tokens_into_last_block(model, x):
    captured = {}
    handle = model.blocks[-2].register_forward_hook(lambda m, i, o: captured.setdefault("z", o))
    model(x)
    handle.remove()
    return captured["z"]


def by_hand(block, z, prefix, query):
    """Eq. 4 and the block's attention written out with plain tensor algebra."""
    B, N, C = z.shape
    heads = block.attn.num_heads
    d = C // heads
    x = F.layer_norm(z, (C,), block.norm1.weight, block.norm1.bias, block.norm1.eps)
    qkv = x @ block.attn.qkv.weight.T + block.attn.qkv.bias  # (B, N, 3C)
    q, k, v = (t.reshape(B, N, heads, d).transpose(1, 2) for t in qkv.split(C, dim=-1))  # (B, heads, N, d)
    q, k = block.attn.q_norm(q), block.attn.k_norm(k)
    attn = torch.softmax(q @ k.transpose(-2, -1) / d**0.5, dim=-1)
    msa = (attn @ v).transpose(1, 2).reshape(B, N, C) @ block.attn.proj.weight.T + block.attn.proj.bias
    q0 = q[:, :, 0] if query == "cls" else q[:, :, prefix:].mean(dim=2)  # (B, heads, d)
    S = torch.einsum("bhd,bhnd->bhn", q0, k[:, :, prefix:]) / d**0.5
    return msa, S


def mlp(block, x):
    return block.mlp.fc2(F.gelu(block.mlp.fc1(x)))


@pytest.mark.parametrize("kind", sorted(FAMILY))
def test_similarity_and_block_equal_the_equations_written_out(kind):
    model = make(kind).eval()
    x = torch.randn(2, 3, 32, 48 if kind == "dynamic" else 32)
    z = tokens_into_last_block(model, x)
    prefix = model.num_prefix_tokens
    plain_out = model.blocks[-1](z)
    sarvit.attach(model)
    block = model.blocks[-1]
    query = "mean" if kind == "registers_no_cls" else "cls"
    assert block.query == query
    msa, S_hand = by_hand(block, z, prefix, query)
    ls2 = block.ls2 if kind == "deit3_layerscale" else (lambda t: t)
    z1 = msa  # Eq. 10: no MSA skip
    expected = ls2(mlp(block, z1)) + z1  # Eq. 11: no LN2, MLP skip kept
    out, S = block.forward_with_similarity(z)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(block(z), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain_out, expected, atol=1e-3)  # the surgery changed the block
    assert S.dtype == torch.float32
    torch.testing.assert_close(S, S_hand, rtol=1e-5, atol=1e-5)
    # model level: S on the patch grid in row-major order, logits equal model(x)
    logits, S_grid = model.forward_with_similarity(x)
    grid = (8, 12) if kind == "dynamic" else (8, 8)
    assert S_grid.shape == (2, 3, *grid)
    torch.testing.assert_close(S_grid, S_hand.reshape(2, 3, *grid), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, model(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", ["A", "B", "C", "D"])
def test_table_1b_layouts(layout):
    model = make().eval()
    x = torch.randn(2, 3, 32, 32)
    z = tokens_into_last_block(model, x)
    block = sarvit.attach(model, layout=layout).blocks[-1]
    msa, _ = by_hand(block, z, 1, "cls")
    ln2 = lambda t: F.layer_norm(t, (48,), block.norm2.weight, block.norm2.bias, block.norm2.eps)  # noqa: E731
    expected = {
        "A": (z + msa) + mlp(block, ln2(z + msa)),  # Eq. 1-2
        "B": msa + mlp(block, ln2(msa)),
        "C": msa + mlp(block, msa),  # Eq. 10-11
        "D": mlp(block, msa),
    }[layout]
    torch.testing.assert_close(block(z), expected, rtol=1e-5, atol=1e-5)


def test_standard_layout_keeps_the_model_function():
    model = make()
    reference = make()
    x = torch.randn(3, 3, 32, 32)
    sarvit.attach(model, layout="standard")
    model.eval(), reference.eval()
    torch.testing.assert_close(model(x), reference(x))
    torch.testing.assert_close(model.forward_with_similarity(x)[0], reference(x))


@pytest.mark.parametrize("kind", ["vit", "deit3_layerscale"])
def test_every_trainable_parameter_gets_a_gradient(kind):
    model = sarvit.attach(make(kind, drop_path_rate=0.1)).train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    logits, S = model.forward_with_similarity(x)
    loss = F.cross_entropy(logits, y) + 0.01 * sarvit.SpatialEntropyLoss()(S)
    loss.backward()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    expected_frozen = {"blocks.2.norm2.weight", "blocks.2.norm2.bias"}
    if kind == "deit3_layerscale":
        expected_frozen.add("blocks.2.ls1.gamma")
    assert frozen == expected_frozen
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_spatial_entropy_gradient_reaches_the_query_and_key_weights():
    model = sarvit.attach(make()).train()
    _, S = model.forward_with_similarity(torch.randn(4, 3, 32, 32))
    sarvit.SpatialEntropyLoss()(S).backward()
    qkv = model.blocks[-1].attn.qkv.weight.grad
    assert qkv[:96].abs().sum() > 0  # queries and keys
    assert qkv[96:].abs().sum() == 0  # values do not enter Eq. 4
    assert model.head.weight.grad is None or model.head.weight.grad.abs().sum() == 0


def test_state_dict_round_trips_both_ways():
    x = torch.randn(2, 3, 32, 32)
    sar = sarvit.attach(make(seed=1)).eval()
    with torch.no_grad():
        sar.blocks[-1].mlp.fc1.weight.mul_(1.5)  # make the weights differ from a fresh init
    sd = sar.state_dict()
    plain = make(seed=2)
    assert list(sd) == list(plain.state_dict())  # timm's parameter names, timm's order
    fresh = sarvit.attach(make(seed=2)).eval()
    fresh.load_state_dict(sd, strict=True)
    torch.testing.assert_close(fresh(x), sar(x))
    plain.load_state_dict(sd, strict=True)  # backbone weights into the plain timm model
    torch.testing.assert_close(plain.blocks[0](torch.ones(1, 65, 48)), sar.blocks[0](torch.ones(1, 65, 48)))
    torch.testing.assert_close(plain.blocks[-1].mlp.fc1.weight, sar.blocks[-1].mlp.fc1.weight)


def test_detach_restores_the_standard_block_with_trained_weights():
    model = sarvit.attach(make()).eval()
    with torch.no_grad():
        model.blocks[-1].attn.proj.weight.add_(0.1)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sarvit.detach(model)
    assert type(model.blocks[-1]) is Block and not sarvit.is_attached(model)
    assert not hasattr(model, "forward_with_similarity")
    assert all(p.requires_grad for p in model.parameters())
    reference = make().eval()
    reference.load_state_dict(sd)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), reference(x))
    with pytest.raises(ValueError, match="no SAR attached"):
        sarvit.detach(model)


def test_unsupported_models_raise_type_error_naming_the_supported():
    supported = "SAR supports these families: timm VisionTransformer"
    with pytest.raises(UnsupportedModel, match=f"timm.models.resnet.ResNet. {supported}"):
        sarvit.attach(timm.create_model("resnet18", num_classes=3))
    with pytest.raises(TypeError, match=supported):
        sarvit.attach(torch.nn.Linear(3, 3))
    post_norm = VisionTransformer(**{**TINY, "block_fn": ResPostBlock})
    with pytest.raises(TypeError, match="ResPostBlock"):
        sarvit.attach(post_norm)


def test_a_torchvision_model_of_no_family_is_named_by_its_module_path():
    from torchvision.models import resnet18

    with pytest.raises(UnsupportedModel) as caught:
        sarvit.attach(resnet18(num_classes=3))
    message = str(caught.value)
    assert "torchvision.models.resnet.ResNet" in message
    assert "not timm's" in message and "SAR supports these families: timm VisionTransformer" in message
    assert "torchvision VisionTransformer" in message or "torchvision" in message.split("families:")[1]


def test_the_supported_families_message_lists_the_registry(monkeypatch):
    from types import SimpleNamespace

    from sarvit import surgery

    later = SimpleNamespace(NAME="T2T-ViT", DESCRIPTION="t2t_vit_*", matches=lambda m: False)
    monkeypatch.setattr(surgery, "FAMILIES", [*surgery.FAMILIES, later])
    with pytest.raises(UnsupportedModel, match=r"timm VisionTransformer \(.*\); T2T-ViT \(t2t_vit_\*\)$"):
        sarvit.attach(torch.nn.Linear(3, 3))


def test_bad_options_raise_clear_errors():
    with pytest.raises(ValueError, match="layout"):
        sarvit.attach(make(), layout="E")
    with pytest.raises(ConfigError, match="query"):
        sarvit.attach(make(), query="max")
    with pytest.raises(ConfigError, match="no class token"):
        sarvit.attach(make("registers_no_cls"), query="cls")
    with pytest.raises(ConfigError, match="patch dropout"):
        sarvit.attach(make(patch_drop_rate=0.25))
    model = sarvit.attach(make())
    with pytest.raises(ValueError, match="already has SAR"):
        sarvit.attach(model)


def test_similarity_is_float32_under_bf16_autocast():
    model = sarvit.attach(make()).eval()
    x = torch.randn(2, 3, 32, 32)
    _, S32 = model.forward_with_similarity(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, S = model.forward_with_similarity(x)
    assert logits.dtype == torch.bfloat16 and S.dtype == torch.float32
    torch.testing.assert_close(S, S32, rtol=0.1, atol=0.1)  # bf16 upstream, fp32 product


def test_grad_checkpointing_gives_the_same_result():
    model = sarvit.attach(make()).eval()
    x = torch.randn(2, 3, 32, 32)
    logits, S = model.forward_with_similarity(x)
    model.set_grad_checkpointing(True)
    logits_ckpt, S_ckpt = model.forward_with_similarity(x)
    torch.testing.assert_close(logits_ckpt, logits)
    torch.testing.assert_close(S_ckpt, S)


@pytest.mark.parametrize("kind", ["vit", "registers_no_cls"])
def test_softmax_and_cosine_maps_equal_the_equations_written_out(kind):
    model = make(kind).eval()
    x = torch.randn(2, 3, 32, 32)
    z = tokens_into_last_block(model, x)
    sarvit.attach(model)
    block, prefix = model.blocks[-1], model.num_prefix_tokens
    query = "mean" if kind == "registers_no_cls" else "cls"
    C, heads = 48, 3
    d = C // heads
    h = F.layer_norm(z, (C,), block.norm1.weight, block.norm1.bias, block.norm1.eps)
    q, k, _ = ((h @ block.attn.qkv.weight.T + block.attn.qkv.bias).reshape(2, -1, 3, heads, d)
               .permute(2, 0, 3, 1, 4))  # (B, heads, N, d) each
    q0 = q[:, :, 0] if query == "cls" else q[:, :, prefix:].mean(dim=2)  # (B, heads, d)
    keys = k[:, :, prefix:]  # (B, heads, n, d)
    dots = torch.einsum("bhd,bhnd->bhn", q0, keys)
    softmax = torch.exp(dots / d**0.5) / torch.exp(dots / d**0.5).sum(dim=-1, keepdim=True)  # over the patch keys
    cosine = dots / (q0.norm(dim=-1, keepdim=True) * keys.norm(dim=-1))  # Eq. 15
    for similarity, want in (("softmax", softmax), ("cosine", cosine)):
        out, S = block.forward_with_similarity(z, similarity)
        torch.testing.assert_close(S, want, rtol=1e-5, atol=1e-6, msg=similarity)
        torch.testing.assert_close(out, block(z), rtol=1e-6, atol=1e-6)  # the block's output does not change
        logits, S_grid = model.forward_with_similarity(x, similarity)
        torch.testing.assert_close(S_grid, want.reshape(2, heads, 8, 8), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(logits, model(x), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(softmax, cosine, atol=1e-2)  # two different maps
    if query == "cls":  # the block's own attention row, restricted to the patches and renormalised
        row = torch.softmax(torch.einsum("bhd,bhnd->bhn", q0, k) / d**0.5, dim=-1)[:, :, prefix:]
        torch.testing.assert_close(row / row.sum(dim=-1, keepdim=True), softmax, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="similarity must be one of dot, softmax, cosine"):
        block.forward_with_similarity(z, "dots")


def test_final_patch_tokens_are_taken_before_the_final_norm():
    model = sarvit.attach(make(dynamic_img_size=True)).eval()
    x = torch.randn(2, 3, 32, 48)  # an 8 x 12 grid
    captured = {}
    handle = model.blocks[-1].register_forward_hook(lambda m, i, o: captured.setdefault("z", o))
    want_logits = model(x)
    handle.remove()
    want = captured["z"][:, 1:].reshape(2, 8, 12, 48)  # raster order, the class token dropped
    logits, S, tokens = model.forward_with_similarity(x, tokens=True)
    torch.testing.assert_close(tokens, want)
    torch.testing.assert_close(logits, want_logits)
    assert S.shape == (2, 3, 8, 12)
    logits, S, tokens = model.forward_with_similarity(x, similarity=None, tokens=True)  # no map asked for
    assert S is None
    torch.testing.assert_close(tokens, want)
    assert not torch.allclose(model.norm(tokens), tokens, atol=1e-2)  # the final norm does change them
    tokens.sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # the tokens carry the backbone's gradient
