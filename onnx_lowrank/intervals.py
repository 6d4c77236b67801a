"""95 % intervals for the numbers a pipeline gates on.

A proportion measured on n inputs (top-1 agreement, exact strings) gets the Wilson score
interval (Wilson 1927), which stays inside [0, 1] and is honest for small n and for proportions
near 0 or 1 (16 inputs that all agree: [0.81, 1.00]). Any other score averaged over inputs gets
a percentile bootstrap over the inputs (Efron 1979), with a fixed seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["Z95", "bootstrap_mean", "bound_check", "straddles", "with_interval", "wilson"]

#: The standard normal quantile of a two-sided 95 % interval.
Z95 = 1.959963984540054
#: Resamples of the bootstrap.
RESAMPLES = 2000


def wilson(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """``(p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)``, ``p = successes / trials``."""
    if trials <= 0:
        return 0.0, 1.0
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_mean(values: Sequence[float], seed: int = 0, resamples: int = RESAMPLES) -> tuple[float, float]:
    """The 2.5 and 97.5 percentiles of the mean of `values` resampled with replacement."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return (float(values[0]),) * 2 if values.size else (0.0, 1.0)
    picks = np.random.default_rng(seed).integers(0, values.size, size=(resamples, values.size))
    means = values[picks].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def straddles(interval: tuple[float, float] | None, bound: float) -> bool:
    """Whether `bound` lies strictly inside `interval`: the data cannot tell which side is true."""
    return interval is not None and interval[0] < bound < interval[1]


def with_interval(value: float | None, interval: Sequence[float] | None, spec: str = ".4f") -> str:
    """``0.9375 (95 % CI 0.7167-0.9889)``, or the value alone without an interval ('n/a' for None)."""
    if value is None:
        return "n/a"
    text = format(value, spec)
    return text if interval is None else f"{text} (95 % CI {interval[0]:{spec}}-{interval[1]:{spec}})"


def bound_check(value: float | None, interval: Sequence[float] | None, bound: float) -> dict:
    """``{"bound", "met", "straddles"}``: whether the value reaches `bound`, and whether its interval
    straddles it (then the inputs cannot tell whether the bound holds)."""
    return {"bound": bound, "met": value is not None and value >= bound,
            "straddles": straddles(tuple(interval) if interval is not None else None, bound)}
