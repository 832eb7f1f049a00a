"""Binary test masks, including the adversarial shapes for label propagation."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def serpentine(h: int, w: int, transpose: bool = False) -> np.ndarray:
    """One path snaking row by row: the longest geodesic a grid can hold."""
    m = np.zeros((h, w), dtype=bool)
    m[::2] = True
    for i in range(1, h, 2):
        m[i, -1 if (i // 2) % 2 == 0 else 0] = True
    return m.T.copy() if transpose else m


def spiral(n: int) -> np.ndarray:
    """A square spiral wall of width 1 winding inwards (one component, long geodesic)."""
    m = np.zeros((n, n), dtype=bool)
    top, left, bottom, right = 0, 0, n - 1, n - 1
    while top <= bottom and left <= right:
        m[top, left : right + 1] = True
        m[top : bottom + 1, right] = True
        if top + 2 <= bottom:
            m[bottom, left : right + 1] = True
        if left + 2 <= right and top + 2 <= bottom:
            m[top + 2 : bottom + 1, left] = True
        top, left, bottom, right = top + 2, left + 2, bottom - 2, right - 2
        if top <= bottom and left < n:
            m[top - 1, left] = True
    return m


def checkerboard(h: int, w: int) -> np.ndarray:
    """One component with 8-connectivity, h*w/2 components with 4-connectivity."""
    return (np.add.outer(np.arange(h), np.arange(w)) % 2) == 0


def random_masks(rng: np.random.Generator, count: int, h: int, w: int) -> np.ndarray:
    """``count`` masks mixing i.i.d. noise of several densities and smooth blobs."""
    out = np.empty((count, h, w), dtype=bool)
    for i in range(count):
        kind = i % 3
        if kind == 0:
            out[i] = rng.random((h, w)) < rng.uniform(0.05, 0.95)
        else:
            size = 3 if kind == 1 else 5
            noise = ndimage.uniform_filter(rng.standard_normal((h, w)), size=size, mode="wrap")
            out[i] = noise > noise.mean()
    return out


def scipy_labels(mask: np.ndarray, connectivity: int) -> np.ndarray:
    """Reference: ``scipy.ndimage.label`` on one 2-D map."""
    labels, _ = ndimage.label(mask, structure=ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2))
    return labels
