"""The statistics of a study's tables and curves: spread over seeds and paired differences.

Every quantile and p-value comes from SciPy. Two methods are compared by pairing their runs
by seed within one grid cell: the same seed gives the same training subset, initial weights
and data order, so the per-seed difference removes the part of the variation that the seed
alone causes. With ``d_s = x_s - b_s`` over the ``n`` seeds where both runs finished:

    mean d +- t(0.975, n - 1) * sd(d) / sqrt(n)        (Student t, sd with ddof = 1)

and the two-sided p-value of the paired t-test (``scipy.stats.ttest_rel``). Fewer than two
pairs give no interval and no p-value (``nan``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

__all__ = ["Spread", "PairedDifference", "spread", "paired_difference", "Band", "band"]

LEVEL = 0.95  # confidence level of every interval


@dataclass(frozen=True)
class Spread:
    """Mean and sample standard deviation (ddof = 1; ``nan`` below two values) of ``n`` values."""

    n: int
    mean: float
    std: float


@dataclass(frozen=True)
class PairedDifference:
    """``mean`` of the per-seed differences over the ``n`` shared ``seeds``, its 95% interval and p-value."""

    n: int
    seeds: tuple
    mean: float
    low: float
    high: float
    p_value: float


@dataclass(frozen=True)
class Band:
    """A curve over seeds: at each of ``epochs`` the mean, min and max over the ``count`` seeds that logged it."""

    epochs: np.ndarray  # (E,)
    mean: np.ndarray  # (E,)
    low: np.ndarray  # (E,)
    high: np.ndarray  # (E,)
    count: np.ndarray  # (E,) int


def spread(values: Sequence[float]) -> Spread:
    """Mean and sample standard deviation of the finite ``values``."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if x.size == 0:
        return Spread(0, math.nan, math.nan)
    return Spread(int(x.size), float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else math.nan)


def paired_difference(values: Mapping[int, float], baseline: Mapping[int, float]) -> PairedDifference:
    """``values - baseline`` paired by seed (dicts seed -> value), over the seeds both hold (finite values)."""
    from scipy import stats

    seeds = tuple(sorted(s for s in values if s in baseline and _finite(values[s]) and _finite(baseline[s])))
    x = np.asarray([values[s] for s in seeds], dtype=float)
    b = np.asarray([baseline[s] for s in seeds], dtype=float)
    if len(seeds) == 0:
        return PairedDifference(0, seeds, math.nan, math.nan, math.nan, math.nan)
    mean = float((x - b).mean())
    if len(seeds) < 2:
        return PairedDifference(1, seeds, mean, math.nan, math.nan, math.nan)
    with warnings.catch_warnings():  # identical differences: scipy warns, and its answer (sd 0) stands
        warnings.simplefilter("ignore", RuntimeWarning)
        test = stats.ttest_rel(x, b)
        interval = test.confidence_interval(LEVEL)
    return PairedDifference(len(seeds), seeds, mean, float(interval.low), float(interval.high), float(test.pvalue))


def band(series: Sequence[tuple[Sequence[float], Sequence[float]]]) -> Band:
    """Mean, min and max over runs of ``(epochs, values)`` curves, at every epoch any run logged."""
    by_epoch: dict[float, list[float]] = {}
    for epochs, values in series:
        for e, v in zip(epochs, values):
            if _finite(v):
                by_epoch.setdefault(e, []).append(float(v))
    epochs = sorted(by_epoch)
    stacked = [np.asarray(by_epoch[e]) for e in epochs]
    return Band(np.asarray(epochs, dtype=float), np.asarray([s.mean() for s in stacked]),
                np.asarray([s.min() for s in stacked]), np.asarray([s.max() for s in stacked]),
                np.asarray([s.size for s in stacked], dtype=int))


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
