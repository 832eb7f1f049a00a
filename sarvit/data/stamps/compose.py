"""Paste one cut-out on a background: random scale, flip, colour jitter and position.

The object is resized with premultiplied alpha (PIL does so for RGBA), so its soft edges
keep their colour. Compositing uses the resized 8-bit alpha ``a``:
``image = round(object * a/255 + background * (1 - a/255))``, so a pixel with ``a = 255``
is exactly the object and a pixel with ``a = 0`` exactly the background. The masks are
read from the same ``a`` (see :func:`semantic_mask`, :func:`instance_mask`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Composite", "compose", "jitter_colours", "semantic_mask", "instance_mask", "VOID"]

VOID = 255
SCALE = (0.35, 0.85)  # longest side of the object, as a fraction of the image side
JITTER = 0.25  # brightness, contrast and saturation factors drawn from U(1 - JITTER, 1 + JITTER)
LUMA = np.array([0.2989, 0.587, 0.114])  # torchvision's rgb_to_grayscale


@dataclass
class Composite:
    image: np.ndarray  # (S, S, 3) uint8
    alpha: np.ndarray  # (S, S) uint8, the object's alpha on the canvas


def jitter_colours(rgb: np.ndarray, weight: np.ndarray, brightness: float, contrast: float, saturation: float) -> np.ndarray:
    """torchvision's ColorJitter factors, in this order, on an object's visible pixels.

    Args:
        rgb: (h, w, 3) float in [0, 1].
        weight: (h, w) alpha in [0, 1]; the contrast pivot is the alpha-weighted mean luma.
    Returns: (h, w, 3) float in [0, 1].
    """
    out = np.clip(rgb * brightness, 0.0, 1.0)
    mean = float((out @ LUMA * weight).sum() / max(weight.sum(), 1e-12))
    out = np.clip((out - mean) * contrast + mean, 0.0, 1.0)
    grey = (out @ LUMA)[..., None]  # (h, w, 1)
    return np.clip((out - grey) * saturation + grey, 0.0, 1.0)


def _resize_object(stamp: np.ndarray, longest: int) -> np.ndarray:
    """(h, w, 4) uint8 -> (h', w', 4) uint8 with max(h', w') = longest."""
    from PIL import Image

    h, w = stamp.shape[:2]
    factor = longest / max(h, w)
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    return np.asarray(Image.fromarray(stamp, "RGBA").resize(size, Image.Resampling.BILINEAR))


def compose(background: np.ndarray, stamp: np.ndarray, rng: np.random.Generator) -> Composite:
    """Paste ``stamp`` on ``background`` with random scale, flip, jitter and position (fully inside).

    Args:
        background: (S, S, 3) uint8.
        stamp: (h, w, 4) uint8 RGBA cut-out.
    """
    size = background.shape[0]
    obj = _resize_object(stamp, max(1, round(rng.uniform(*SCALE) * size)))
    if rng.random() < 0.5:
        obj = obj[:, ::-1]
    factors = rng.uniform(1 - JITTER, 1 + JITTER, size=3)
    h, w = obj.shape[:2]
    top, left = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))

    alpha = obj[..., 3]
    weight = alpha / 255.0  # (h, w)
    rgb = jitter_colours(obj[..., :3] / 255.0, weight, *factors) * 255.0
    image = background.astype(np.float64)
    window = image[top:top + h, left:left + w]
    image[top:top + h, left:left + w] = rgb * weight[..., None] + window * (1.0 - weight[..., None])
    canvas_alpha = np.zeros((size, size), np.uint8)
    canvas_alpha[top:top + h, left:left + w] = alpha
    return Composite(np.clip(np.rint(image), 0, 255).astype(np.uint8), canvas_alpha)


def semantic_mask(alpha: np.ndarray, class_id: int) -> np.ndarray:
    """(S, S) uint8: 0 where alpha = 0, ``class_id`` where alpha = 255, ``VOID`` (255) in between."""
    return np.where(alpha == 0, 0, np.where(alpha == 255, class_id, VOID)).astype(np.uint8)


def instance_mask(alpha: np.ndarray) -> np.ndarray:
    """(S, S) bool: the pixels at least half covered by the object (alpha >= 128)."""
    return alpha >= 128
