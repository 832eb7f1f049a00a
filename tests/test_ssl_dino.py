"""DINO (+ SAR): the loss against the formula written out, the schedules, the teacher, multi-crop."""

import math

import numpy as np
import pytest
import timm
import torch
from scipy.special import log_softmax, softmax

from sarvit.errors import ConfigError
from sarvit.factory import create_model
from sarvit.ssl import DINO, teacher_momentum

TINY = dict(patch_size=4, embed_dim=24, depth=2, num_heads=2, mlp_ratio=2.0, dynamic_img_size=True)
OUT = 32


def tiny_backbone(sar: bool = True, drop_path: float = 0.0) -> torch.nn.Module:
    if sar:
        return create_model("vit_tiny_patch16_224", num_classes=0, img_size=16, drop_path=drop_path, model_kwargs=TINY)
    return timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=16, drop_path_rate=drop_path, **TINY)


def tiny_dino(sar: bool = True, drop_path: float = 0.0, **kwargs) -> DINO:
    torch.manual_seed(0)
    return DINO(tiny_backbone(sar, drop_path), out_dim=OUT, hidden_dim=16, bottleneck_dim=8, **kwargs)


def crops(batch: int = 3, local: int = 3, local_size: int = 8, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(batch, 3, 16, 16, generator=g) for _ in range(2)]
            + [torch.randn(batch, 3, local_size, local_size, generator=g) for _ in range(local)])


# --- the loss -----------------------------------------------------------------------------------------------


def reference_dino(teacher, student, center, t_temp, s_temp=0.1) -> float:
    """mean over (global view i, view v != i) of mean_b -sum_d softmax((t_i - c)/tt) log_softmax(s_v/ts)."""
    total, terms = 0.0, 0
    for i, t in enumerate(teacher):
        p = softmax((t - center) / t_temp, axis=-1)  # (B, D)
        for v, s in enumerate(student):
            if v == i:
                continue
            total += np.mean(-(p * log_softmax(s / s_temp, axis=-1)).sum(axis=-1))
            terms += 1
    return total / terms


def test_loss_matches_the_formula_and_the_centre_follows_the_teacher():
    model = tiny_dino(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=10)
    rng = np.random.default_rng(0)
    teacher = [rng.normal(size=(3, OUT)) for _ in range(2)]
    student = [rng.normal(size=(3, OUT)) for _ in range(5)]
    center = rng.normal(size=OUT) * 0.1
    model.criterion.center.copy_(torch.tensor(center).view(1, 1, OUT))
    outputs = {"teacher": [torch.tensor(t, dtype=torch.float32) for t in teacher],
               "student": [torch.tensor(s, dtype=torch.float32) for s in student]}

    terms = model.loss(outputs, epoch=4.5, lam=0.3)
    t_temp = 0.04 + (0.07 - 0.04) * 4 / 9  # linspace(0.04, 0.07, 10)[4]: the epoch's integer part
    assert terms["dino"].item() == pytest.approx(reference_dino(teacher, student, center, t_temp), rel=1e-4)
    assert set(terms) == {"loss", "dino"} and terms["loss"].item() == terms["dino"].item()

    center = 0.9 * center + 0.1 * np.mean(np.stack(teacher), axis=(0, 1))  # (D,)
    np.testing.assert_allclose(model.criterion.center.view(-1).numpy(), center, rtol=1e-5, atol=1e-7)
    terms = model.loss(outputs, epoch=12, lam=0.3)  # past the warm-up: 0.07, and the new centre
    assert terms["dino"].item() == pytest.approx(reference_dino(teacher, student, center, 0.07), rel=1e-4)


def test_teacher_temperature_warm_up_by_hand():
    model = tiny_dino(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=30)
    assert model.teacher_temperature(0) == pytest.approx(0.04)
    assert model.teacher_temperature(15.9) == pytest.approx(0.04 + 0.03 * 15 / 29)
    assert model.teacher_temperature(29) == pytest.approx(0.07)
    assert model.teacher_temperature(200) == pytest.approx(0.07)
    assert tiny_dino().teacher_temperature(0) == pytest.approx(0.04)  # the published defaults: no warm-up


def test_teacher_momentum_schedule_by_hand():
    assert teacher_momentum(0, 101) == pytest.approx(0.996, abs=1e-12)
    assert teacher_momentum(50, 101) == pytest.approx(0.998, abs=1e-12)  # half way: cos(pi/2) = 0
    assert teacher_momentum(25, 101) == pytest.approx(1 - 0.004 * (1 + math.sqrt(0.5)) / 2, abs=1e-12)
    assert teacher_momentum(100, 101) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError):
        teacher_momentum(101, 101)
    with pytest.raises(ConfigError):
        teacher_momentum(0, 10, base=-0.1)


# --- the teacher --------------------------------------------------------------------------------------------


def test_update_teacher_is_the_ema_formula():
    model = tiny_dino(norm_last_layer=False)
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(torch.randn_like(p))
    student = [p.detach().clone() for p in model.student.parameters()]
    teacher = [p.detach().clone() for p in model.teacher.parameters()]
    model.update_teacher(0.7)
    for t, t0, s in zip(model.teacher.parameters(), teacher, student):
        torch.testing.assert_close(t, 0.7 * t0 + 0.3 * s)


def test_teacher_starts_as_the_student_gets_no_gradient_and_never_drops_paths():
    model = tiny_dino(drop_path=0.5)
    for (name, s), t in zip(model.student.state_dict().items(), model.teacher.state_dict().values()):
        assert torch.equal(s, t), name
    model.train()
    assert model.student.training and not model.teacher.training
    x = crops()
    out = model(x, se_kind="dot")
    assert not any(t.requires_grad for t in out["teacher"])
    model.loss(out, epoch=0, lam=0.01)["loss"].backward()
    assert all(not p.requires_grad and p.grad is None for p in model.teacher.parameters())
    assert model.student.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    again = model(x)["teacher"]  # no stochastic depth in the teacher: the same outputs twice
    for a, b in zip(out["teacher"], again):
        torch.testing.assert_close(a, b)
    assert hasattr(model.teacher.backbone, "forward_with_similarity")  # a SAR student has a SAR teacher


def test_last_layer_is_frozen_during_the_first_epoch_only():
    model = tiny_dino(norm_last_layer=False)
    last = list(model.student.head.last_layer.parameters())
    for epoch, frozen in ((0.0, True), (0.99, True), (1.0, False)):
        model.zero_grad()
        model.loss(model(crops()), epoch=epoch)["loss"].backward()
        model.cancel_last_layer_gradients(epoch, freeze_last_layer=1)
        assert len(last) == 2  # weight_g, weight_v
        for p in last:
            assert (p.grad is None) == frozen
            if not frozen:
                assert p.grad.abs().sum() > 0
        assert model.student.head.layers[0].weight.grad.abs().sum() > 0  # the rest of the head trains


# --- multi-crop and the maps --------------------------------------------------------------------------------


def test_multi_crop_batches_runs_of_one_size_and_equals_one_view_at_a_time():
    model = tiny_dino()
    batches = []
    model.student.backbone.patch_embed.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    x = crops(batch=3, local=3)
    out = model(x, se_kind="dot")
    assert batches == [6, 9]  # the 2 global crops in one pass, the 3 local crops in another
    assert len(out["student"]) == 5 and len(out["teacher"]) == 2
    with torch.no_grad():
        for v, got in zip(x, out["student"]):
            torch.testing.assert_close(got, model.student.head(model.student.backbone(v)), atol=1e-5, rtol=1e-4)
        for v, got in zip(x[:2], out["teacher"]):
            torch.testing.assert_close(got, model.teacher.head(model.teacher.backbone(v)), atol=1e-5, rtol=1e-4)
        want = torch.cat([model.student.backbone.forward_with_similarity(v, "dot")[1] for v in x[:2]])
    assert out["S"].shape == (6, 2, 4, 4)  # (2B, heads, h, w): the 16x16 global crops' 4x4 grid
    torch.testing.assert_close(out["S"], want, atol=1e-5, rtol=1e-4)


def test_maps_come_from_the_global_views_even_when_local_crops_have_their_size():
    model = tiny_dino()
    x = crops(batch=2, local=2, local_size=16)  # one run of 4 views of one size
    out = model(x, se_kind="dot")
    assert out["S"].shape == (4, 2, 4, 4)
    with torch.no_grad():
        want = torch.cat([model.student.backbone.forward_with_similarity(v, "dot")[1] for v in x[:2]])
    torch.testing.assert_close(out["S"], want, atol=1e-5, rtol=1e-4)


def test_se_term_only_with_se_kind():
    model = tiny_dino()
    x = crops()
    assert set(model.loss(model(x), epoch=0, lam=0.5)) == {"loss", "dino"}
    out = model(x, se_kind="dot")
    terms = model.loss(out, epoch=0, lam=0.5)
    assert set(terms) == {"loss", "dino", "se"}
    torch.testing.assert_close(terms["loss"], terms["dino"] + 0.5 * terms["se"])
    assert terms["se"].item() > 0  # random maps have several components
    with pytest.raises(ConfigError, match="attach SAR"):
        tiny_dino(sar=False)(x, se_kind="dot")


# --- checkpoints, training, options -------------------------------------------------------------------------


def test_state_dict_holds_teacher_and_centre():
    model = tiny_dino()
    model.loss(model(crops()), epoch=0)  # moves the centre
    with torch.no_grad():
        for p in model.teacher.parameters():
            p.mul_(0.5)  # the teacher differs from the student
    state = model.state_dict()
    assert "criterion.center" in state and state["criterion.center"].abs().sum() > 0
    torch.manual_seed(123)
    fresh = DINO(tiny_backbone(), out_dim=OUT, hidden_dim=16, bottleneck_dim=8)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.criterion.center, model.criterion.center)
    x = crops(seed=5)
    for a, b in zip(fresh(x)["teacher"], model(x)["teacher"]):
        torch.testing.assert_close(a, b)
    assert model.backbone_for_evaluation() is model.teacher.backbone


def test_a_few_sgd_steps_stay_finite_and_move_the_teacher():
    model = tiny_dino()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(3):
        terms = model.loss(model(crops(seed=step), se_kind="dot"), epoch=step / 3, lam=0.01)
        assert all(torch.isfinite(v) for v in terms.values())
        opt.zero_grad()
        terms["loss"].backward()
        model.cancel_last_layer_gradients(step / 3, freeze_last_layer=1)
        opt.step()
        model.update_teacher(teacher_momentum(step, 3, base=0.9))
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, start[n])}
    assert "teacher.backbone.blocks.0.attn.qkv.weight" in moved
    assert "student.head.last_layer.weight_v" not in moved  # frozen during the first epoch
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("kwargs", [dict(teacher_temp=0.0), dict(student_temp=-1.0), dict(center_momentum=1.0),
                                    dict(out_dim=0), dict(warmup_teacher_temp_epochs=-1)])
def test_options_are_range_checked(kwargs):
    with pytest.raises(ConfigError):
        DINO(tiny_backbone(), **{**dict(out_dim=OUT, hidden_dim=16, bottleneck_dim=8), **kwargs})
