import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.special import log_softmax

from sarvit.objectives import SupervisedObjective, classification_loss, lambda_at

LOGITS = np.array([[2.0, -1.0, 0.5, 0.0], [0.1, 0.2, 3.0, -2.0], [-1.5, 1.0, 1.0, 0.3]])  # (B=3, C=4)
TARGETS = np.array([0, 2, 3])


def hand_ce(logits: np.ndarray, targets: np.ndarray, smoothing: float = 0.0) -> float:
    """(1 - eps) * NLL of the target + eps * the mean NLL over all classes, averaged over the batch."""
    logp = log_softmax(logits, axis=1)
    nll = -logp[np.arange(len(targets)), targets]
    uniform = -logp.mean(axis=1)
    return float(np.mean((1 - smoothing) * nll + smoothing * uniform))


def loop_entropy(s: np.ndarray) -> float:
    """Eq. 5-8 for one map, one component at a time, labelled by scipy (8-connectivity)."""
    b = np.maximum(s - s.mean(), 0.0)
    labels, count = ndimage.label(b > 0, structure=np.ones((3, 3)))
    entropy = 0.0
    for j in range(1, count + 1):
        p = b[labels == j].sum() / b.sum()
        entropy -= p * math.log(p)
    return entropy


def test_plain_ce_is_the_mean_negative_log_likelihood():
    loss = classification_loss(mixup_active=False, smoothing=0.0)
    got = loss(torch.tensor(LOGITS), torch.tensor(TARGETS))
    assert got.item() == pytest.approx(hand_ce(LOGITS, TARGETS), rel=1e-12)


def test_label_smoothing_by_hand():
    loss = classification_loss(mixup_active=False, smoothing=0.1)
    got = loss(torch.tensor(LOGITS), torch.tensor(TARGETS))
    assert got.item() == pytest.approx(hand_ce(LOGITS, TARGETS, 0.1), rel=1e-12)
    assert got.item() != pytest.approx(hand_ce(LOGITS, TARGETS, 0.0), rel=1e-3)  # the smoothing does matter


def test_mixup_uses_soft_target_ce():
    soft = np.array([[0.7, 0.1, 0.1, 0.1], [0.0, 0.0, 1.0, 0.0], [0.25, 0.25, 0.0, 0.5]])
    loss = classification_loss(mixup_active=True, smoothing=0.1)  # Mixup's targets carry the smoothing
    got = loss(torch.tensor(LOGITS), torch.tensor(soft))
    want = np.mean(-(soft * log_softmax(LOGITS, axis=1)).sum(axis=1))
    assert got.item() == pytest.approx(want, rel=1e-12)


def test_supervised_objective_is_ce_plus_lambda_times_the_mean_loop_entropy():
    rng = np.random.default_rng(0)
    S_np = rng.normal(size=(3, 2, 5, 5))  # (B, heads, k, k)
    S_np[0, 1] = 0.0  # a flat map: no component, entropy 0, still counted in the mean
    S_np[1, 0] = -1.0
    S_np[1, 0, 1:3, 1:3] = 2.0  # one component: entropy 0
    entropies = [loop_entropy(s) for s in S_np.reshape(-1, 5, 5)]
    assert entropies[1] == 0.0 and entropies[2] == 0.0 and max(entropies) > 0.5
    objective = SupervisedObjective(classification_loss(False, 0.1))
    lam = 0.3
    terms = objective(torch.tensor(LOGITS), torch.tensor(TARGETS), torch.tensor(S_np), lam)
    assert set(terms) == {"loss", "ce", "se"}
    ce, se = hand_ce(LOGITS, TARGETS, 0.1), np.mean(entropies)
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-6)  # the CE is computed in float32
    assert terms["se"].item() == pytest.approx(se, rel=1e-9)
    assert terms["loss"].item() == pytest.approx(ce + lam * se, rel=1e-6)


def test_without_similarity_maps_the_objective_is_the_ce_alone():
    objective = SupervisedObjective(classification_loss(False, 0.0))
    terms = objective(torch.tensor(LOGITS), torch.tensor(TARGETS), None, lam=0.5)
    assert set(terms) == {"loss", "ce"}
    assert terms["loss"].item() == pytest.approx(hand_ce(LOGITS, TARGETS), rel=1e-6)


def test_low_precision_logits_give_a_float32_loss():
    logits = torch.tensor(LOGITS, dtype=torch.bfloat16)
    terms = SupervisedObjective(classification_loss(False, 0.0))(logits, torch.tensor(TARGETS))
    assert terms["loss"].dtype == torch.float32
    rounded = logits.double().numpy()  # the bf16 values, exactly
    assert terms["loss"].item() == pytest.approx(hand_ce(rounded, TARGETS), rel=1e-6)


def test_the_gradient_reaches_the_maps_scaled_by_lambda():
    rng = np.random.default_rng(1)
    S = torch.tensor(rng.normal(size=(2, 2, 4, 4)), requires_grad=True)
    logits = torch.tensor(LOGITS[:2], requires_grad=True)
    lam = 0.25
    SupervisedObjective(classification_loss(False, 0.0))(logits, torch.tensor(TARGETS[:2]), S, lam)["loss"].backward()
    # Eq. 12-13: the components are fixed; dH/dS by central differences of the loop entropy with them fixed
    eps = 1e-6
    flat = S.detach().numpy().reshape(-1, 4, 4)
    grad = np.zeros_like(flat)
    for m, s in enumerate(flat):
        labels, count = ndimage.label(np.maximum(s - s.mean(), 0) > 0, structure=np.ones((3, 3)))

        def h(x):
            b = np.maximum(x - x.mean(), 0.0)
            p = np.array([b[labels == j].sum() for j in range(1, count + 1)]) / b.sum()
            return -(p * np.log(p)).sum()

        for idx in np.ndindex(4, 4):
            up, down = s.copy(), s.copy()
            up[idx] += eps
            down[idx] -= eps
            grad[m][idx] = (h(up) - h(down)) / (2 * eps)
    want = lam * grad / len(flat)
    np.testing.assert_allclose(S.grad.numpy().reshape(-1, 4, 4), want, atol=1e-6)


def test_constant_lambda_ignores_the_epoch():
    assert [lambda_at("constant", 0.01, e, 30) for e in (0, 7.5, 30)] == [0.01, 0.01, 0.01]


@pytest.mark.parametrize("epoch,want", [
    (0, 0.0), (2.5, 0.0025), (5, 0.005), (10, 0.01),  # linear warm-up over the first 10 epochs
    (15, 0.005 * (1 + math.sqrt(0.5))),  # a quarter of the cosine: 0.5 * (1 + cos(pi / 4))
    (20, 0.005), (25, 0.005 * (1 - math.sqrt(0.5))), (30, 0.0),
])
def test_warmup_cosine_lambda_by_hand(epoch, want):
    assert lambda_at("warmup_cosine", 0.01, epoch, 30, warmup_epochs=10) == pytest.approx(want, abs=1e-15)


def test_warmup_cosine_without_warmup_starts_at_lambda():
    assert lambda_at("warmup_cosine", 0.2, 0, 8, warmup_epochs=0) == pytest.approx(0.2)
    assert lambda_at("warmup_cosine", 0.2, 4, 8, warmup_epochs=0) == pytest.approx(0.1)
    assert lambda_at("warmup_cosine", 0.2, 8, 8, warmup_epochs=0) == pytest.approx(0.0, abs=1e-15)


def test_unknown_lambda_schedule():
    with pytest.raises(ValueError, match="unknown lambda schedule 'cosine'"):
        lambda_at("cosine", 0.01, 1, 10)


# --- the objectives of `sarvit train --objective` ----------------------------------------------


def test_the_objectives_are_the_choices_of_the_option():
    from sarvit.config import CHOICES
    from sarvit.objectives import OBJECTIVES

    assert OBJECTIVES == CHOICES["objective"]


def _tv_loop(s: np.ndarray) -> float:
    return float(np.abs(np.diff(s, axis=0)).sum() + np.abs(np.diff(s, axis=1)).sum())


def _position_entropy_loop(s: np.ndarray) -> float:
    b = np.maximum(s - s.mean(), 0.0).ravel()
    p = b[b > 0] / b.sum()
    return float(-(p * np.log(p)).sum())


@pytest.mark.parametrize("name,term,similarity,per_map", [
    ("sar", "se", "dot", loop_entropy),
    ("sar_softmax", "se_softmax", "softmax", loop_entropy),  # the model hands it the post-softmax maps
    ("sar_cosine", "se_cosine", "cosine", loop_entropy),  # ... the cosine maps of Eq. 15
    ("tv", "tv", "dot", _tv_loop),
    ("entropy", "entropy", "dot", _position_entropy_loop),
])
def test_map_objectives_are_ce_plus_lambda_times_their_term(name, term, similarity, per_map):
    from sarvit.objectives import Needs, build_objective

    rng = np.random.default_rng(2)
    S_np = rng.normal(size=(3, 2, 4, 5))  # (B, heads, h, w), a rectangular grid
    S_np[0, 0] = 0.0  # a flat map: 0 for every term, still counted in the mean
    objective = build_objective(name, classification_loss(False, 0.0))
    assert objective.needs == Needs(similarity=similarity, tokens=False) and objective.inner is None
    lam = 0.3
    terms = objective(torch.tensor(LOGITS), torch.tensor(TARGETS), {"S": torch.tensor(S_np)}, lam)
    assert list(terms) == ["ce", term, "loss"]
    want = np.mean([per_map(s) for s in S_np.reshape(-1, 4, 5)])
    assert terms[term].item() == pytest.approx(want, rel=1e-9)
    assert terms["loss"].item() == pytest.approx(hand_ce(LOGITS, TARGETS) + lam * want, rel=1e-6)


def test_unknown_objective_names_the_choices():
    from sarvit.objectives import build_objective

    with pytest.raises(ValueError, match="choose one of sar, sar_softmax, sar_cosine, tv, entropy, drloc"):
        build_objective("bogus", classification_loss(False, 0.0))


def _tiny_sar_model():
    import sarvit

    torch.manual_seed(0)
    return sarvit.create_model("vit_tiny_patch16_224", 4, img_size=16, layout="C",
                               model_kwargs=dict(patch_size=4, embed_dim=24, depth=2, num_heads=2))


@pytest.mark.parametrize("name", ["sar", "sar_softmax", "sar_cosine", "tv", "entropy", "drloc"])
def test_the_auxiliary_term_alone_reaches_the_backbone(name):
    from sarvit.engine import TrainForward
    from sarvit.objectives import build_objective

    model = _tiny_sar_model().train()
    objective = build_objective(name, classification_loss(False, 0.0), dim=24, drloc_pairs=8)
    net = TrainForward(model, objective.inner)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    logits, outputs = net(x, objective.needs)
    terms = objective(logits, y, outputs, lam=0.5)
    torch.testing.assert_close(terms["loss"], terms["ce"] + 0.5 * terms[objective.term])
    terms[objective.term].backward()  # the auxiliary term only
    qkv = model.blocks[-1].attn.qkv.weight.grad
    assert qkv is not None and qkv.abs().sum() > 0, name
    assert model.blocks[0].mlp.fc1.weight.grad.abs().sum() > 0  # down to the first block
    if name == "drloc":  # the MLP learns too, and the tokens it reads come before the final norm
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in objective.parameters())
        assert model.norm.weight.grad is None or model.norm.weight.grad.abs().sum() == 0
    else:
        assert list(objective.parameters()) == []


def test_drloc_term_equals_the_loss_on_the_pre_norm_tokens():
    from sarvit.engine import TrainForward
    from sarvit.losses import drloc_loss
    from sarvit.objectives import DRLocObjective, Needs

    model = _tiny_sar_model().eval()
    objective = DRLocObjective(classification_loss(False, 0.0), 24, pairs=5)
    assert objective.needs == Needs(similarity=None, tokens=True) and objective.term == "drloc"
    x, y = torch.randn(3, 3, 16, 16), torch.tensor([0, 1, 2])
    torch.manual_seed(11)
    logits, outputs = TrainForward(model, objective.inner)(x, objective.needs)
    assert set(outputs) == {"inner"}  # no similarity map computed
    _, _, tokens = model.forward_with_similarity(x, None, tokens=True)
    want = drloc_loss(tokens.reshape(3, 16, 24), (4, 4), objective.drloc.head, m=5,
                      generator=torch.Generator().manual_seed(11))
    terms = objective(logits, y, outputs, lam=0.1)
    assert terms["drloc"].item() == pytest.approx(want.item(), rel=1e-6)
    torch.testing.assert_close(logits, model(x))


@pytest.mark.parametrize("epoch,want", [
    (0, 0.0), (5, 0.025), (10, 0.05), (20, 0.1),  # linear warm-up over 20 epochs
    (22.5, 0.075), (25, 0.05), (30, 0.0),  # then linear decay to 0 at the end
])
def test_drloc_weight_by_hand(epoch, want):
    from sarvit.objectives import drloc_lambda_at

    assert drloc_lambda_at(0.1, epoch, 30, warmup_epochs=20) == pytest.approx(want, abs=1e-15)


def test_drloc_warmup_is_capped_at_the_run_length():
    from sarvit.objectives import drloc_lambda_at

    assert drloc_lambda_at(0.1, 1, 4, warmup_epochs=20) == pytest.approx(0.025)  # a 4-epoch warm-up
    assert drloc_lambda_at(0.1, 4, 4, warmup_epochs=20) == pytest.approx(0.1)
    assert drloc_lambda_at(0.1, 0, 4, warmup_epochs=0) == pytest.approx(0.1)  # no warm-up: decay from the start
    assert drloc_lambda_at(0.1, 3, 4, warmup_epochs=0) == pytest.approx(0.025)
