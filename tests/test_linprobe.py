"""Linear-probe parts: features against a plain loop over the blocks, a frozen backbone, DINO's init."""

import pytest
import timm
import torch
from scipy import stats
from torch import nn

from sarvit.errors import ConfigError, UserError
from sarvit.factory import create_model
from sarvit.linprobe import LinearClassifier, ProbeFeatures

KWARGS = dict(patch_size=4, embed_dim=24, depth=3, num_heads=2, mlp_ratio=2.0)


def tiny_vit(sar=True, drop_path=0.0, **changes):
    torch.manual_seed(0)
    kwargs = {**KWARGS, **changes}
    if sar:
        return create_model("vit_tiny_patch16_224", 5, img_size=16, drop_path=drop_path, model_kwargs=kwargs).eval()
    return timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=16, drop_path_rate=drop_path,
                             **kwargs).eval()


def block_outputs(model, images):
    """Every block's output, by hand: patches, class token and position embedding, then the blocks."""
    x = model.patch_embed(images)  # (B, h*w, C)
    prefix = [t.expand(len(x), -1, -1) for t in (model.cls_token, model.reg_token) if t is not None]
    if model.no_embed_class:
        x = torch.cat([*prefix, x + model.pos_embed], dim=1)
    else:
        x = torch.cat([*prefix, x], dim=1) + model.pos_embed  # (B, prefix + h*w, C)
    outputs = []
    for block in model.blocks:
        x = block(x)
        outputs.append(x)
    return outputs


@pytest.mark.parametrize("sar", [True, False])
@pytest.mark.parametrize("n, avgpool", [(1, False), (2, False), (3, False), (1, True), (2, True)])
def test_features_are_the_normed_class_tokens_of_the_last_blocks(sar, n, avgpool):
    model = tiny_vit(sar)
    images = torch.randn(3, 3, 16, 16)
    probe = ProbeFeatures(model, n_last_blocks=n, avgpool=avgpool)
    with torch.no_grad():
        outputs = block_outputs(model, images)
        expected = [model.norm(o)[:, 0] for o in outputs[-n:]]
        if avgpool:
            expected.append(model.norm(outputs[-1])[:, 1:].mean(dim=1))
        expected = torch.cat(expected, dim=-1)
    got = probe(images)
    assert probe.feature_dim == 24 * (n + avgpool) and got.shape == (3, probe.feature_dim)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_the_last_block_class_token_is_what_the_model_head_sees():
    model = tiny_vit()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        logits = model(images)
    torch.testing.assert_close(model.head(ProbeFeatures(model)(images)), logits, rtol=1e-5, atol=1e-6)


def test_register_tokens_are_not_patch_tokens():
    model = tiny_vit(reg_tokens=2)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        last = model.norm(block_outputs(model, images)[-1])  # (B, 1 + 2 + 16, C)
        expected = torch.cat([last[:, 0], last[:, 3:].mean(dim=1)], dim=-1)
    torch.testing.assert_close(ProbeFeatures(model, avgpool=True)(images), expected, rtol=1e-5, atol=1e-6)


def test_a_model_without_class_token_gives_its_mean_patch_tokens():
    model = tiny_vit(class_token=False, global_pool="avg")  # its final norm is fc_norm, after pooling
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        outputs = block_outputs(model, images)
        expected = torch.cat([model.fc_norm(o.mean(dim=1)) for o in outputs[-2:]], dim=-1)
    torch.testing.assert_close(ProbeFeatures(model, n_last_blocks=2)(images), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="no class token"):
        ProbeFeatures(model, avgpool=True)


def test_no_gradient_reaches_the_backbone_and_it_stays_in_eval_mode():
    model = tiny_vit(drop_path=0.5, drop_rate=0.5).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = ProbeFeatures(model, n_last_blocks=2)
    classifier = LinearClassifier(probe.feature_dim, 5)
    optimizer = torch.optim.SGD([*probe.parameters(), *classifier.parameters()], lr=1.0, momentum=0.9,
                                weight_decay=0.1)
    probe.train(), classifier.train()
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    first = probe(images)
    for _ in range(2):
        optimizer.zero_grad()
        nn.functional.cross_entropy(classifier(probe(images)), labels).backward()
        optimizer.step()
    assert not model.training and all(not m.training for m in model.modules())
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert classifier.linear.weight.grad is not None and classifier.linear.weight.grad.abs().sum() > 0
    assert torch.equal(probe(images), first)  # no dropout: the same features every call
    assert not first.requires_grad


def test_options_are_checked():
    model = tiny_vit()
    for n in (0, 4, 1.5, True):
        with pytest.raises(ConfigError, match="n_last_blocks"):
            ProbeFeatures(model, n_last_blocks=n)
    for dim, classes in ((0, 3), (3, 0), (2.5, 3)):
        with pytest.raises(ConfigError):
            LinearClassifier(dim, classes)


def test_other_families_are_refused_naming_what_is_supported():
    with pytest.raises(UserError, match="supports timm.models.vision_transformer.VisionTransformer"):
        ProbeFeatures(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten()))
    pvt = create_model("pvt_v2_b0", 5, img_size=32, model_kwargs=dict(depths=(1, 1, 1, 1)))
    with pytest.raises(UserError, match="linear probing does not support .*PyramidVisionTransformerV2"):
        ProbeFeatures(pvt)


def test_linear_classifier_init_is_dino_s():
    torch.manual_seed(0)
    classifier = LinearClassifier(384, 1000)
    weight = classifier.linear.weight.detach().double().flatten().numpy()
    assert classifier.linear.weight.shape == (1000, 384)
    assert stats.kstest(weight, stats.norm(loc=0.0, scale=0.01).cdf).pvalue > 1e-3
    assert abs(weight.std() - 0.01) < 0.01 * 5 / (2 * weight.size) ** 0.5  # five standard errors of the std
    assert abs(weight.mean()) < 5 * 0.01 / weight.size ** 0.5
    assert torch.equal(classifier.linear.bias, torch.zeros(1000))
    x = torch.randn(2, 384)
    torch.testing.assert_close(classifier(x), x @ classifier.linear.weight.T)  # bias 0
    assert classifier(x.view(2, 384, 1, 1)).shape == (2, 1000)  # flattens what it is given
