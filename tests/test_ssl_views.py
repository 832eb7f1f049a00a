"""The views of DINO and MoCo v3: counts and sizes, grey images, collate, options, lazy imports."""

import pickle
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from sarvit.errors import ConfigError
from sarvit.ssl import collate_views, dino_views, mocov3_views

FASHION = dict(mean=(0.286,) * 3, std=(0.353,) * 3)


def grey(size: int = 28, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8), mode="L")


def colour(h: int = 250, w: int = 300) -> Image.Image:
    return Image.fromarray(np.random.default_rng(1).integers(0, 256, (h, w, 3), dtype=np.uint8))


def shapes(views) -> list[tuple[int, ...]]:
    return [tuple(v.shape) for v in views]


def test_dino_views_on_a_grey_28px_image():
    transform = dino_views(28, 12, 4, **FASHION)
    out = transform(grey())
    assert shapes(out) == [(3, 28, 28)] * 2 + [(3, 12, 12)] * 4
    assert transform.sizes == [(28, 28)] * 2 + [(12, 12)] * 4
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in out)


def test_dino_views_at_imagenet_scale():
    out = dino_views()(colour())
    assert shapes(out) == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 10  # the paper: 2 x 224^2 + 10 x 96^2


def test_mocov3_views():
    assert shapes(mocov3_views(28, **FASHION)(grey())) == [(3, 28, 28)] * 2
    assert shapes(mocov3_views()(colour())) == [(3, 224, 224)] * 2


def test_grey_tensor_and_array_inputs_become_rgb():
    transform = dino_views(28, 12, 1, **FASHION)
    for image in (torch.rand(1, 28, 28), np.zeros((28, 28), dtype=np.uint8)):
        assert shapes(transform(image)) == [(3, 28, 28)] * 2 + [(3, 12, 12)]


def test_normalisation_uses_the_given_statistics():
    """A black image stays black under every augmentation of these views (crops, flips, jitter of
    brightness/contrast/saturation/hue, grey scale, blur; solarisation turns it white): each pixel
    is (0 - mean) / std, or (1 - mean) / std where solarised."""
    black = Image.new("RGB", (28, 28))
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.2)
    for view in dino_views(28, 12, 2, mean=mean, std=std)(black) + mocov3_views(28, mean=mean, std=std)(black):
        for c in range(3):
            pixels = view[c].numpy().ravel()[:, None]  # (n, 1)
            allowed = np.array([[-mean[c] / std[c], (1 - mean[c]) / std[c]]])  # (1, 2)
            assert np.isclose(pixels, allowed, atol=1e-5).any(axis=1).all(), np.unique(pixels)


def test_views_are_reproducible_under_the_seeds_and_picklable():
    transform = pickle.loads(pickle.dumps(dino_views(28, 12, 2, **FASHION)))

    def draw():
        random.seed(3)
        np.random.seed(3)
        torch.manual_seed(3)
        return transform(grey())

    for a, b in zip(draw(), draw()):
        torch.testing.assert_close(a, b)


def test_collate_gives_one_batch_per_view():
    transform = dino_views(28, 12, 2, **FASHION)
    samples = [(transform(grey(seed=i)), i % 3) for i in range(4)]
    views, targets = collate_views(samples)
    assert shapes(views) == [(4, 3, 28, 28)] * 2 + [(4, 3, 12, 12)] * 2
    for i, (sample, _) in enumerate(samples):
        for v, view in enumerate(sample):
            assert torch.equal(views[v][i], view)
    assert targets.tolist() == [0, 1, 2, 0]


@pytest.mark.parametrize("call", [
    lambda: dino_views(0, 12, 2),
    lambda: dino_views(28, 12, -1),
    lambda: dino_views(28, 12, 2, global_scale=(0.6, 0.3)),
    lambda: dino_views(28, 12, 2, local_scale=(0.0, 0.4)),
    lambda: dino_views(28, 12, 2, mean=(0.5,), std=(0.5,)),
    lambda: mocov3_views(28, min_scale=1.5),
    lambda: mocov3_views(28, std=(0.2, 0.0, 0.2)),
])
def test_options_are_range_checked(call):
    with pytest.raises(ConfigError):
        call()


def test_importing_the_package_imports_neither_torch_nor_lightly():
    code = ("import sys, sarvit, sarvit.ssl, sarvit.ssl.views; "
            "assert not {'torch', 'lightly'} & set(sys.modules), sorted({'torch', 'lightly'} & set(sys.modules))")
    subprocess.run([sys.executable, "-c", code], check=True)
