"""MoCo v3 (+ SAR): the contrastive loss against a plain loop, the model's parts, its momentum."""

import math

import numpy as np
import pytest
import timm
import torch
import torch.distributed as dist
from scipy.special import logsumexp

from sarvit.errors import ConfigError
from sarvit.factory import create_model
from sarvit.losses import MoCoV3Loss, mocov3_contrastive_loss, mocov3_loss
from sarvit.ssl import MoCoV3, momentum_at

TINY = dict(patch_size=4, embed_dim=24, depth=2, num_heads=2, mlp_ratio=2.0)


def tiny_backbone(sar: bool = True) -> torch.nn.Module:
    if sar:
        return create_model("vit_tiny_patch16_224", num_classes=0, img_size=16, model_kwargs=TINY)
    return timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=16, **TINY)


def tiny_moco(**kwargs) -> MoCoV3:
    torch.manual_seed(0)
    return MoCoV3(tiny_backbone(kwargs.pop("sar", True)), dim=8, mlp_dim=16, **kwargs)


def views(batch: int = 4, size: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(batch, 3, size, size, generator=g) for _ in range(2)]


# --- the loss -----------------------------------------------------------------------------------------------


def reference_ctr(q: np.ndarray, keys: np.ndarray, tau: float, offset: int = 0) -> float:
    """2 tau * mean_i -log softmax_j(q_i . k_j / tau)[offset + i], row by row, in float64."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    keys = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    total = 0.0
    for i in range(q.shape[0]):
        logits = np.array([q[i] @ keys[j] for j in range(keys.shape[0])]) / tau
        total += -(logits[offset + i] - logsumexp(logits))
    return 2 * tau * total / q.shape[0]


def test_contrastive_loss_matches_a_plain_loop_with_the_2_tau_factor():
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
    for tau in (0.2, 1.0):
        got = mocov3_contrastive_loss(torch.tensor(q), torch.tensor(k), tau)
        assert got.dtype == torch.float32
        assert got.item() == pytest.approx(reference_ctr(q, k, tau), rel=1e-5)
    # the scaling is 2 tau, not 1: at tau = 0.2 the plain cross-entropy is 2.5 times larger
    plain = reference_ctr(q, k, 0.2) / 0.4
    assert mocov3_contrastive_loss(torch.tensor(q), torch.tensor(k), 0.2).item() == pytest.approx(0.4 * plain, rel=1e-5)


def test_symmetric_loss_pairs_each_query_with_the_other_views_keys():
    rng = np.random.default_rng(1)
    q1, q2, k1, k2 = (rng.normal(size=(4, 6)) for _ in range(4))
    want = reference_ctr(q1, k2, 0.2) + reference_ctr(q2, k1, 0.2)
    got = mocov3_loss(*(torch.tensor(a) for a in (q1, q2, k1, k2)), tau=0.2)
    assert got.item() == pytest.approx(want, rel=1e-5)
    assert MoCoV3Loss(0.2)(*(torch.tensor(a) for a in (q1, q2, k1, k2))).item() == pytest.approx(want, rel=1e-5)
    # swapping the keys gives another value: the pairing matters
    swapped = reference_ctr(q1, k1, 0.2) + reference_ctr(q2, k2, 0.2)
    assert abs(swapped - want) > 1e-3


def test_no_gradient_reaches_the_keys():
    q = torch.randn(4, 6, requires_grad=True)
    k = torch.randn(4, 6, requires_grad=True)
    mocov3_contrastive_loss(q, k).backward()
    assert k.grad is None
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_keys_are_gathered_from_every_rank_and_labels_offset_by_rank(monkeypatch):
    """A faked world of 3 ranks seen from rank 1: all_gather fills the slots in rank order."""
    rng = np.random.default_rng(2)
    B, D, rank, world = 3, 5, 1, 3
    q, own = rng.normal(size=(B, D)), rng.normal(size=(B, D))
    others = {r: rng.normal(size=(B, D)) for r in range(world) if r != rank}
    others = {r: v / np.linalg.norm(v, axis=1, keepdims=True) for r, v in others.items()}  # as the ranks send them

    def all_gather(parts, tensor):
        assert len(parts) == world
        for r in range(world):
            parts[r].copy_(tensor if r == rank else torch.tensor(others[r], dtype=tensor.dtype))

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: world)
    monkeypatch.setattr(dist, "get_rank", lambda: rank)
    monkeypatch.setattr(dist, "all_gather", all_gather)
    all_keys = np.concatenate([others[0], own, others[2]])  # (world * B, D), rank order
    got = mocov3_contrastive_loss(torch.tensor(q), torch.tensor(own), 0.2).item()
    assert got == pytest.approx(reference_ctr(q, all_keys, 0.2, offset=rank * B), rel=1e-5)
    assert abs(got - reference_ctr(q, all_keys, 0.2, offset=0)) > 1e-3  # the offset matters


def test_temperature_is_range_checked():
    with pytest.raises(ConfigError, match="temperature"):
        MoCoV3Loss(0.0)
    with pytest.raises(ConfigError, match="temperature"):
        MoCoV3(tiny_backbone(), dim=8, mlp_dim=16, temperature=-1.0)


# --- the schedule -------------------------------------------------------------------------------------------


def test_momentum_schedule_values_by_hand():
    assert momentum_at(0, 100) == pytest.approx(0.99, abs=1e-12)
    assert momentum_at(50, 100) == pytest.approx(0.995, abs=1e-12)  # cos(pi/2) = 0
    assert momentum_at(25.0, 100) == pytest.approx(0.99 + 0.01 * (1 - math.sqrt(0.5)) / 2, abs=1e-12)
    assert momentum_at(100, 100) == pytest.approx(1.0, abs=1e-12)
    assert momentum_at(3, 6, base=0.9) == pytest.approx(0.95, abs=1e-12)
    with pytest.raises(ConfigError):
        momentum_at(1, 10, base=1.5)
    with pytest.raises(ValueError):
        momentum_at(11, 10)


# --- the model ----------------------------------------------------------------------------------------------


def test_mlps_follow_mocov3():
    model = tiny_moco()
    kinds = [type(m).__name__ for m in model.encoder.head]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert not model.encoder.head[-1].affine and model.encoder.head[1].affine
    assert [type(m).__name__ for m in model.predictor] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert all(m.bias is None for m in [*model.encoder.head, *model.predictor] if isinstance(m, torch.nn.Linear))
    assert (model.encoder.head[0].in_features, model.encoder.head[0].out_features) == (24, 16)
    assert model.predictor[-1].out_features == 8


def test_outputs_keys_without_gradient_and_maps_only_when_asked():
    model = tiny_moco()
    x = views()
    out = model(x)
    assert set(out) == {"q1", "q2", "k1", "k2"}
    assert all(out[k].shape == (4, 8) for k in out)
    assert out["q1"].requires_grad and not out["k1"].requires_grad
    assert set(model.loss(out, lam=0.5)) == {"loss", "moco"}

    out = model(x, se_kind="dot")
    assert out["S"].shape == (8, 2, 4, 4)  # (2B, heads, h, w)
    backbone = model.encoder.backbone
    want = torch.cat([backbone.forward_with_similarity(v, "dot")[1] for v in x])  # x1's maps, then x2's
    torch.testing.assert_close(out["S"], want)
    terms = model.loss(out, lam=0.5)
    assert set(terms) == {"loss", "moco", "se"}
    torch.testing.assert_close(terms["loss"], terms["moco"] + 0.5 * terms["se"])
    qk = [out[k].detach().double().numpy() for k in ("q1", "q2", "k1", "k2")]
    assert terms["moco"].item() == pytest.approx(reference_ctr(qk[0], qk[3], 0.2) + reference_ctr(qk[1], qk[2], 0.2),
                                                 rel=1e-5)


def test_momentum_encoder_gets_no_gradient_and_patch_projection_is_frozen():
    model = tiny_moco()
    model.loss(model(views(), se_kind="dot"), lam=0.01)["loss"].backward()
    assert all(not p.requires_grad and p.grad is None for p in model.momentum_encoder.parameters())
    embed = list(model.encoder.backbone.patch_embed.parameters())
    assert embed and all(not p.requires_grad and p.grad is None for p in embed)
    assert model.encoder.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    free = tiny_moco(freeze_patch_embed=False)
    assert all(p.requires_grad for p in free.encoder.backbone.patch_embed.parameters())


def test_update_momentum_is_the_ema_formula():
    model = tiny_moco()
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p))  # the two encoders now differ
    base = [p.detach().clone() for p in model.encoder.parameters()]
    before = [p.detach().clone() for p in model.momentum_encoder.parameters()]
    model.update_momentum(0.9)
    for k, k0, q in zip(model.momentum_encoder.parameters(), before, base):
        torch.testing.assert_close(k, 0.9 * k0 + 0.1 * q)


def test_a_few_sgd_steps_stay_finite_and_move_both_encoders():
    model = tiny_moco()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(3):
        terms = model.loss(model(views(), se_kind="dot"), lam=0.01)
        assert all(torch.isfinite(v) for v in terms.values())
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        model.update_momentum(momentum_at(step / 3, 1))
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, start[n])}
    assert "encoder.backbone.blocks.0.attn.qkv.weight" in moved
    assert "momentum_encoder.backbone.blocks.0.attn.qkv.weight" in moved
    assert "encoder.backbone.patch_embed.proj.weight" not in moved
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_evaluation_backbone_and_refusals():
    model = tiny_moco()
    assert model.backbone_for_evaluation() is model.encoder.backbone
    plain = tiny_moco(sar=False)
    with pytest.raises(ConfigError, match="attach SAR"):
        plain(views(), se_kind="dot")
    with pytest.raises(ConfigError, match="num_classes=0"):
        MoCoV3(timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=16, **TINY))
