"""ImageNet-C corruptions applied on the fly, reproducibly, to any dataset.

The corruptions are those of Hendrycks & Dietterich (ICLR 2019), as implemented by the
maintained ``imagecorruptions-imaug`` package (``from imagecorruptions import corrupt``):
15 standard types (``common``) and 4 held-out ``validation`` types, each at severities 1-5.

Where a corruption is applied. ImageNet-C corrupts the 224x224 centre crops of the
validation images. Here each image goes through the geometric part of the model's
evaluation transform first (resize + centre crop to the model's input size), is
corrupted as uint8 RGB at that size, and is then converted and normalised like a clean
image. A crop smaller than the library's 32x32 minimum (Fashion-MNIST at 28x28) is
upscaled (bicubic) to 32 on its shorter side, corrupted, and resized back to the input
size; the results record that this happened.

Reproducibility. The library draws from NumPy's global RNG (and, for ``impulse_noise``
and ``glass_blur``, from a ``seed`` argument that otherwise defaults to fresh OS
entropy). Every corrupted image is therefore drawn under its own seed,

    image_seed(seed, corruption, severity, index)
        = SeedSequence([seed, crc32(corruption), severity, index]).generate_state(1)[0]

which seeds Python's ``random``, NumPy's global RNG and the library's ``seed`` argument.
An image's corruption depends on nothing else: not on the batch size, the loader's
workers, nor the order in which images are visited.
"""

from __future__ import annotations

import difflib
import zlib
from collections.abc import Sequence

import numpy as np
from PIL import Image

from ..config import ConfigError

__all__ = [
    "MIN_SIZE", "SEVERITIES", "corruption_names", "resolve_corruptions", "resolve_severities", "image_seed",
    "corrupt_array", "corruption_size",
]

MIN_SIZE = 32  # the library refuses smaller images
SEVERITIES = (1, 2, 3, 4, 5)
SUBSETS = ("common", "validation", "all")


def _library():
    """The ``imagecorruptions`` module, or a message saying how to install it."""
    try:
        import imagecorruptions
    except ImportError as err:
        raise ConfigError(
            f"the corruption evaluation needs the package imagecorruptions-imaug ({err}). Install it with "
            "`make setup`, or `pip install --no-deps imagecorruptions-imaug==1.1.5` beside "
            "opencv-python-headless, scikit-image and numba"
        ) from err
    return imagecorruptions


def corruption_names(subset: str = "common") -> list[str]:
    """The corruption types of ``subset``: ``common`` (15), ``validation`` (4) or ``all`` (19)."""
    return list(_library().get_corruption_names(subset))


def resolve_corruptions(spec: str | Sequence[str] | None) -> list[str]:
    """Corruption names from ``common`` / ``validation`` / ``all`` or a comma-separated list.

    Raises ``ConfigError`` naming an unknown type and the closest known ones.
    """
    if spec is None:
        spec = "common"
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    known = corruption_names("all")
    names: list[str] = []
    for item in items:
        if item in SUBSETS:
            names += corruption_names(item)
        elif item in known:
            names.append(item)
        else:
            close = difflib.get_close_matches(item, known, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(
                f"--corruptions: unknown corruption {item!r}.{hint} Give common, validation, all, or a "
                f"comma-separated list of: {', '.join(known)}"
            )
    if not names:
        raise ConfigError("--corruptions: no corruption given; use common (the 15 of ImageNet-C) or a list")
    return list(dict.fromkeys(names))  # drop repeats, keep the order


def resolve_severities(spec: str | Sequence[int] | None) -> list[int]:
    """Severities from ``"1,2,3"`` or a sequence; each in 1..5, sorted, without repeats."""
    if spec is None:
        return list(SEVERITIES)
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    try:
        values = [int(str(s).strip()) for s in items if str(s).strip()]
    except ValueError as err:
        raise ConfigError(
            f"--severities must be comma-separated integers in 1..5, e.g. 1,2,3,4,5; got {spec!r}") from err
    bad = [v for v in values if v not in SEVERITIES]
    if bad or not values:
        raise ConfigError(f"--severities must be integers in 1..5 (ImageNet-C's five levels), got {spec!r}")
    return sorted(set(values))


def image_seed(seed: int, corruption: str, severity: int, index: int) -> int:
    """The 32-bit seed of one corrupted image (see the module docstring)."""
    words = [int(seed), zlib.crc32(corruption.encode()), int(severity), int(index)]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


def corruption_size(height: int, width: int) -> tuple[int, int]:
    """``(height, width)`` at which an image of that size is corrupted: itself, or upscaled
    so that its shorter side is ``MIN_SIZE``."""
    short = min(height, width)
    if short >= MIN_SIZE:
        return height, width
    scale = MIN_SIZE / short
    return max(MIN_SIZE, round(height * scale)), max(MIN_SIZE, round(width * scale))


def _takes_seed(corruption: str) -> bool:
    import inspect

    return "seed" in inspect.signature(_library().corruption_dict[corruption]).parameters


def corrupt_array(image: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
    """``corrupt(image, severity, corruption)`` drawn under ``seed``; any size.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        corruption: a name of :func:`corruption_names`.
        severity: 1..5.
        seed: 32-bit seed (:func:`image_seed`).

    Returns:
        ``(H, W, 3)`` uint8: upscaled to at least 32x32 (bicubic) before corrupting and
        resized back afterwards when ``H`` or ``W`` is under 32.
    """
    from ..data.pipeline import seeded_rngs

    lib = _library()
    height, width = image.shape[:2]
    size = corruption_size(height, width)
    work = image if size == (height, width) else np.asarray(
        Image.fromarray(image).resize((size[1], size[0]), Image.BICUBIC))
    kwargs = {"seed": seed} if _takes_seed(corruption) else {}  # impulse_noise, glass_blur: their own RNG
    with seeded_rngs(seed):  # Python's, NumPy's and torch's global RNGs, restored afterwards
        out = lib.corrupt(work, severity=severity, corruption_name=corruption, **kwargs)
    if out.shape[:2] != (height, width):
        out = np.asarray(Image.fromarray(out).resize((width, height), Image.BICUBIC))
    return np.ascontiguousarray(out, dtype=np.uint8)
