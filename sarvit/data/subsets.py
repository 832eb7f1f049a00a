"""Class-stratified training subsets with a fixed seed (the sampling ratios of Table 3)."""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError

__all__ = ["stratified_subset"]


def stratified_subset(
    targets: np.ndarray, *, per_class: int | None = None, fraction: float | None = None, seed: int = 0,
    option: str = "per_class",
) -> np.ndarray:
    """Indices of a random subset that keeps every class.

    Args:
        targets: ``(N,)`` class index of every sample.
        per_class: take exactly this many samples of every class.
        fraction: take ``round(fraction * n_c)`` samples of class ``c`` (at least one).
        seed: the subset depends on the seed and the targets only.
        option: the option's name, for the messages (``per_class`` or ``val_per_class``).

    Returns:
        sorted int64 indices into ``targets``.
    """
    if (per_class is None) == (fraction is None):
        raise ValueError("give exactly one of per_class and fraction")
    targets = np.asarray(targets)
    classes, counts = np.unique(targets, return_counts=True)
    if per_class is not None:
        if per_class < 1:
            raise ConfigError(f"{option} must be a positive number of images, got {per_class}")
        short = {int(c): int(n) for c, n in zip(classes, counts, strict=True) if n < per_class}
        if short:
            raise ConfigError(
                f"--{option.replace('_', '-')} {per_class} asks for more images than {len(short)} classes have "
                f"(class: count, e.g. {dict(list(short.items())[:5])}); lower it"
                + (" or use --train-fraction" if option == "per_class" else "")
            )
    elif not 0.0 < fraction <= 1.0:
        raise ConfigError(f"train_fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    chosen = []
    for c, n in zip(classes, counts, strict=True):
        members = np.flatnonzero(targets == c)
        k = per_class if per_class is not None else max(1, int(round(fraction * n)))
        chosen.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)
