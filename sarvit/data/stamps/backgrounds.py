"""Real photographs and textures that ship inside the scikit-image and scikit-learn wheels.

Nothing is downloaded: only the images bundled with the installed packages are read
(other ``skimage.data`` images are fetched from the network and fail offline). Left out:
``chelsea`` (a cat), ``horse`` (a binary silhouette of a horse) and scikit-learn's
``flower.jpg``, which show objects of the benchmark's classes, and ``stereo_motorcycle``,
whose licence scikit-image does not state.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Background", "BACKGROUNDS", "load_backgrounds", "random_crop"]


@dataclass(frozen=True)
class Background:
    name: str
    source: str  # "skimage" or "sklearn"
    licence: str


BACKGROUNDS = (
    Background("astronaut", "skimage", "public domain (NASA)"),
    Background("coffee", "skimage", "CC0 (Rachel Michetti)"),
    Background("rocket", "skimage", "public domain (SpaceX)"),
    Background("hubble_deep_field", "skimage", "public domain (NASA)"),
    Background("immunohistochemistry", "skimage", "no known copyright restrictions"),
    Background("retina", "skimage", "CC0 (Mikael Häggström)"),
    Background("brick", "skimage", "CC0 (CC0Textures)"),
    Background("grass", "skimage", "CC0 (CC0Textures)"),
    Background("gravel", "skimage", "CC0 (CC0Textures)"),
    Background("camera", "skimage", "CC0 (Lav Varshney)"),
    Background("moon", "skimage", "bundled with scikit-image (BSD-3-Clause)"),
    Background("coins", "skimage", "no known copyright restrictions (Brooklyn Museum)"),
    Background("page", "skimage", "bundled with scikit-image (BSD-3-Clause)"),
    Background("clock", "skimage", "public domain (Stefan van der Walt)"),
    Background("china", "sklearn", "CC BY 2.0 (danielbuechele, Flickr)"),
)


def _load(background: Background) -> np.ndarray:
    if background.source == "sklearn":  # the file load_sample_image reads, without importing sklearn (1 s)
        from importlib.util import find_spec

        from PIL import Image

        spec = find_spec("sklearn")
        if spec is None or spec.origin is None:
            raise ModuleNotFoundError("scikit-learn is not installed; `make setup` (pip install -e .) installs it")
        with Image.open(Path(spec.origin).parent / "datasets" / "images" / f"{background.name}.jpg") as im:
            return np.asarray(im.convert("RGB"))
    from skimage import data

    return getattr(data, background.name)()


def load_backgrounds() -> list[np.ndarray]:
    """Every background of ``BACKGROUNDS`` as (H, W, 3) uint8 RGB (grey images repeated)."""
    images = []
    for background in BACKGROUNDS:
        image = np.asarray(_load(background))
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)  # (H, W) -> (H, W, 3)
        images.append(np.ascontiguousarray(image[..., :3].astype(np.uint8)))
    return images


def random_crop(image: np.ndarray, size: int, rng: np.random.Generator, min_fraction: float = 0.35) -> np.ndarray:
    """A random square crop of side ``U(min_fraction, 1) * min(H, W)``, resized to ``size`` and flipped at random.

    Args:
        image: (H, W, 3) uint8.
    Returns: (size, size, 3) uint8.
    """
    from PIL import Image

    h, w = image.shape[:2]
    side = max(1, int(round(rng.uniform(min_fraction, 1.0) * min(h, w))))
    top = int(rng.integers(0, h - side + 1))
    left = int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(image[top:top + side, left:left + side])
    crop = crop.resize((size, size), Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(crop)
