"""Auxiliary losses against plain loops and hand-computed values."""

import numpy as np
import pytest
import torch
from scipy import stats

from sarvit.losses import DRLocHead, TotalVariationLoss, drloc_loss, sample_position_pairs, total_variation


def _tv_loop(S: np.ndarray) -> float:
    h, w = S.shape
    total = 0.0
    for x in range(h):
        for y in range(w):
            if y + 1 < w:
                total += abs(S[x, y] - S[x, y + 1])
            if x + 1 < h:
                total += abs(S[x, y] - S[x + 1, y])
    return total


def test_total_variation_hand_computed():
    S = torch.tensor([[0.0, 1.0], [3.0, 7.0]])
    # across: |0-1| + |3-7| = 5; down: |0-3| + |1-7| = 9
    assert total_variation(S).item() == 14.0


@pytest.mark.parametrize("shape", [(2, 3, 5, 5), (1, 2, 3, 7), (4, 1, 1, 6)])
def test_total_variation_matches_loop(shape):
    S = torch.randn(shape, dtype=torch.float64)
    got = total_variation(S)
    assert got.shape == shape[:2]
    for b in range(shape[0]):
        for h in range(shape[1]):
            assert got[b, h].item() == pytest.approx(_tv_loop(S[b, h].numpy()), rel=1e-12)
    loss = TotalVariationLoss()(S)
    assert loss.item() == pytest.approx(np.mean([_tv_loop(m) for m in S.reshape(-1, *shape[2:]).numpy()]))


def test_total_variation_half_precision_is_promoted_and_constant_maps_are_zero():
    S = torch.full((2, 2, 4, 4), 3.0, dtype=torch.float16)
    out = total_variation(S)
    assert out.dtype == torch.float32 and torch.all(out == 0)
    with pytest.raises(TypeError):
        total_variation(torch.ones(3, 3, dtype=torch.int64))


def test_pairs_cover_rectangular_grid_uniformly():
    g = torch.Generator().manual_seed(0)
    first, second = sample_position_pairs(64, 3, 5, 200, generator=g)
    assert first.shape == second.shape == (64, 200, 2)
    for pos in (first, second):
        assert pos[..., 0].min() == 0 and pos[..., 0].max() == 2
        assert pos[..., 1].min() == 0 and pos[..., 1].max() == 4
    cells = (first[..., 0] * 5 + first[..., 1]).flatten().numpy()
    counts = np.bincount(cells, minlength=15)
    assert stats.chisquare(counts).pvalue > 1e-3  # uniform over the 15 cells


def test_drloc_loss_matches_a_loop():
    torch.manual_seed(0)
    b, h, w, c, m = 3, 2, 4, 5, 7
    tokens = torch.randn(b, h * w, c, dtype=torch.float64)
    head = DRLocHead(c, hidden=6).double()
    loss = drloc_loss(tokens, (h, w), head, m=m, generator=torch.Generator().manual_seed(1))
    first, second = sample_position_pairs(b, h, w, m, generator=torch.Generator().manual_seed(1))
    errors = []
    for i in range(b):
        grid = tokens[i].reshape(h, w, c)
        for j in range(m):
            (r1, c1), (r2, c2) = first[i, j].tolist(), second[i, j].tolist()
            pred = head(torch.cat([grid[r1, c1], grid[r2, c2]]))
            errors += [abs(pred[0].item() - abs(r1 - r2)), abs(pred[1].item() - abs(c1 - c2))]
    assert loss.item() == pytest.approx(np.mean(errors), rel=1e-6)


def test_drloc_trains_head_and_backbone_and_checks_grid():
    tokens = torch.randn(2, 9, 4, requires_grad=True)
    head = DRLocHead(4)
    assert [p.shape for p in head.parameters()][0] == (512, 8)
    drloc_loss(tokens, (3, 3), head).backward()
    assert tokens.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    with pytest.raises(ValueError, match="3x4 grid"):
        drloc_loss(tokens, (3, 4), head)


# --- entropy over positions (the control without space) ---------------------------------------


def test_position_entropy_hand_computed():
    from sarvit.losses import position_entropy

    # mean 3: B = [0, 0, 1, 3], p = [1/4, 3/4]
    S = torch.tensor([[0.0, 2.0], [4.0, 6.0]], dtype=torch.float64)
    want = -(0.25 * np.log(0.25) + 0.75 * np.log(0.75))
    assert position_entropy(S).item() == pytest.approx(want, rel=1e-12)
    # one position above the mean: a point mass, entropy 0; a flat map: no mass, entropy 0
    assert position_entropy(torch.tensor([[0.0, 0.0], [0.0, 4.0]])).item() == 0.0
    assert position_entropy(torch.full((3, 3), 2.0)).item() == 0.0


@pytest.mark.parametrize("shape", [(2, 3, 5, 5), (1, 2, 3, 7)])
def test_position_entropy_matches_scipy_and_ignores_adjacency(shape):
    from sarvit.entropy import spatial_entropy
    from sarvit.losses import PositionEntropyLoss, position_entropy

    S = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = position_entropy(S)
    maps = S.reshape(-1, shape[-2] * shape[-1]).numpy()
    want = [stats.entropy(np.maximum(m - m.mean(), 0.0)) for m in maps]  # scipy normalises the masses
    np.testing.assert_allclose(got.reshape(-1).numpy(), want, rtol=1e-12)
    assert PositionEntropyLoss()(S).item() == pytest.approx(np.mean(want), rel=1e-12)
    # every position its own component: larger than the spatial entropy wherever a component has 2+ cells
    assert (got >= spatial_entropy(S) - 1e-12).all() and (got > spatial_entropy(S) + 1e-3).any()


def test_position_entropy_gradient_by_central_differences():
    from sarvit.losses import PositionEntropyLoss

    S = torch.randn(2, 2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    PositionEntropyLoss()(S).backward()

    def loss(x: np.ndarray) -> float:
        return float(np.mean([stats.entropy(np.maximum(m - m.mean(), 0.0)) for m in x.reshape(-1, 12)]))

    base, eps = S.detach().numpy(), 1e-6
    grad = np.zeros_like(base)
    for idx in np.ndindex(base.shape):
        up, down = base.copy(), base.copy()
        up[idx] += eps
        down[idx] -= eps
        grad[idx] = (loss(up) - loss(down)) / (2 * eps)
    np.testing.assert_allclose(S.grad.numpy(), grad, atol=1e-6)
    flat = torch.zeros(1, 1, 3, 3, requires_grad=True)
    PositionEntropyLoss()(flat).backward()
    assert torch.all(flat.grad == 0)  # 0 log 0 = 0 and a finite gradient


def test_drloc_module_is_the_loss_on_the_grid_of_tokens():
    from sarvit.losses import DRLocLoss

    torch.manual_seed(0)
    tokens = torch.randn(3, 2, 5, 4, dtype=torch.float64)  # (B, h, w, C), a rectangular grid
    module = DRLocLoss(4, m=9).double()
    torch.manual_seed(7)
    got = module(tokens)
    torch.manual_seed(7)
    first, second = sample_position_pairs(3, 2, 5, 9)
    errors = []
    for i in range(3):
        for j in range(9):
            (r1, c1), (r2, c2) = first[i, j].tolist(), second[i, j].tolist()
            pred = module.head(torch.cat([tokens[i, r1, c1], tokens[i, r2, c2]]))
            errors += [abs(pred[0].item() - abs(r1 - r2)), abs(pred[1].item() - abs(c1 - c2))]
    assert got.item() == pytest.approx(np.mean(errors), rel=1e-6)  # the loss is float32
