import math

import numpy as np
import pytest
import torch

import sarvit
from sarvit.components import max_components
from tests.masks import checkerboard, random_masks, scipy_labels, serpentine, spiral

BACKENDS = ["scipy", "torch"]
SIZES = [(1, 1), (1, 9), (9, 1), (2, 2), (7, 7), (14, 14), (5, 11), (16, 9), (32, 32), (64, 64), (3, 64)]


def assert_matches_scipy(masks: np.ndarray, labels: torch.Tensor, connectivity: int) -> None:
    assert labels.dtype == torch.int64
    labels = labels.cpu().numpy()
    h, w = masks.shape[-2:]
    for mask, got in zip(masks.reshape(-1, h, w), labels.reshape(-1, h, w), strict=True):
        np.testing.assert_array_equal(got, scipy_labels(mask, connectivity))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_random_masks_match_scipy(backend, connectivity, size):
    h, w = size
    rng = np.random.default_rng(h * 1000 + w)
    count = 600 if h * w <= 256 else 60
    masks = random_masks(rng, count, h, w)
    labels = sarvit.connected_components(torch.from_numpy(masks), connectivity=connectivity, backend=backend)
    assert labels.shape == masks.shape
    assert_matches_scipy(masks, labels, connectivity)


ADVERSARIAL = {
    "serpentine": lambda n: serpentine(n, n),
    "serpentine_T": lambda n: serpentine(n, n, transpose=True),
    "serpentine_rect": lambda n: serpentine(n, n // 2 + 1),
    "spiral": spiral,
    "spiral_flipped": lambda n: spiral(n)[::-1, ::-1].copy(),
    "checkerboard": lambda n: checkerboard(n, n),
    "empty": lambda n: np.zeros((n, n), dtype=bool),
    "full": lambda n: np.ones((n, n), dtype=bool),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("kind", sorted(ADVERSARIAL))
def test_adversarial_masks_match_scipy(backend, connectivity, kind):
    for n in (3, 14, 31, 64):
        mask = ADVERSARIAL[kind](n)
        labels = sarvit.connected_components(torch.from_numpy(mask), connectivity=connectivity, backend=backend)
        assert_matches_scipy(mask[None], labels[None], connectivity)


def test_spiral_is_one_long_component():
    # Guards the fixture itself: a spiral that fell apart would not be adversarial.
    mask = spiral(64)
    assert scipy_labels(mask, 4).max() == 1
    assert mask.sum() > 64 * 64 / 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_shape_and_per_map_numbering(backend):
    rng = np.random.default_rng(0)
    masks = random_masks(rng, 2 * 3 * 4, 10, 12).reshape(2, 3, 4, 10, 12)
    labels = sarvit.connected_components(torch.from_numpy(masks), backend=backend)
    assert labels.shape == (2, 3, 4, 10, 12)
    assert_matches_scipy(masks, labels, 8)
    # single 2-D map, no leading dimensions
    labels2d = sarvit.connected_components(torch.from_numpy(masks[1, 2, 3]), backend=backend)
    np.testing.assert_array_equal(labels2d.numpy(), scipy_labels(masks[1, 2, 3], 8))


def test_torch_backend_checks_convergence_a_logarithmic_number_of_times(monkeypatch):
    calls = []
    real_equal = torch.equal

    def counting_equal(a, b):
        calls.append(1)
        return real_equal(a, b)

    monkeypatch.setattr(torch, "equal", counting_equal)
    masks = np.stack([spiral(64), serpentine(64, 64), serpentine(64, 64, transpose=True)])
    labels = sarvit.connected_components(torch.from_numpy(masks), backend="torch")
    assert_matches_scipy(masks, labels, 8)
    assert 1 <= len(calls) <= math.log2(64 * 64)


def test_max_components_bound_is_reached_and_not_exceeded():
    for h, w in [(1, 1), (5, 5), (6, 7), (14, 14)]:
        sparse = np.zeros((h, w), dtype=bool)
        sparse[::2, ::2] = True  # isolated pixels, one per 2 x 2 block
        assert scipy_labels(sparse, 8).max() == max_components(h, w, 8)
        assert scipy_labels(checkerboard(h, w), 4).max() == max_components(h, w, 4)


def test_bad_input_raises_clear_errors():
    with pytest.raises(TypeError, match="bool mask"):
        sarvit.connected_components(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="connectivity"):
        sarvit.connected_components(torch.zeros(4, 4, dtype=torch.bool), connectivity=6)
    with pytest.raises(ValueError, match="backend"):
        sarvit.connected_components(torch.zeros(4, 4, dtype=torch.bool), backend="opencv")
    with pytest.raises(ValueError, match=r"\(\.\.\., h, w\)"):
        sarvit.connected_components(torch.zeros(4, dtype=torch.bool))


def test_empty_batch():
    labels = sarvit.connected_components(torch.zeros(0, 6, 14, 14, dtype=torch.bool))
    assert labels.shape == (0, 6, 14, 14)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_backend_matches_scipy():
    rng = np.random.default_rng(1)
    masks = np.concatenate([random_masks(rng, 512, 14, 14), np.stack([serpentine(14, 14), spiral(14)])])
    labels = sarvit.connected_components(torch.from_numpy(masks).cuda())
    assert labels.device.type == "cuda"
    assert_matches_scipy(masks, labels, 8)
