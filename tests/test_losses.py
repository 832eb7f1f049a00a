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
