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
