"""The report's statistics: 95% t-intervals over seeds, paired comparisons, verdicts, chance checks.

Values are per-seed floats; None and nan are dropped (a unit that did not measure the metric).
Intervals use the exact Student-t quantile with n − 1 degrees of freedom; one value has no interval.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import stats

LEVEL = 0.95
CHANCE_MARGIN = 0.05  # a before-edit mean within max(this, its 95% half-width) of chance is "at chance"


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value)


def t_quantile(n: int) -> float:
    """The two-sided 95% Student-t quantile for n ≥ 2 values (n − 1 degrees of freedom)."""
    return float(stats.t.ppf(0.5 + LEVEL / 2, n - 1))


def mean_interval(values) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval) of values [n]; half nan when n = 1, both nan when n = 0."""
    values = np.asarray([v for v in values if _finite(v)], np.float64)
    if values.size == 0:
        return float("nan"), float("nan")
    if values.size == 1:
        return float(values[0]), float("nan")
    return float(values.mean()), t_quantile(values.size) * float(values.std(ddof=1)) / math.sqrt(values.size)


@dataclasses.dataclass(frozen=True)
class Paired:
    """Mean difference a − b over n pairs and its 95% paired-t interval [low, high] (nan when n < 2)."""

    diff: float
    low: float
    high: float
    n: int


def paired(a: dict, b: dict) -> Paired:
    """a, b: {pair key (e.g. seed): value}; compares on the keys where both values are finite."""
    keys = [k for k in a if k in b and _finite(a[k]) and _finite(b[k])]
    mean, half = mean_interval([a[k] - b[k] for k in keys])
    return Paired(mean, mean - half, mean + half, len(keys))


def verdict(metric: str, a: str, b: str, p: Paired, lower_is_better: bool | None = None) -> str:
    """One clause saying only what `p` (a − b) supports; 'better' / 'worse' only where the good direction is known."""
    if p.n == 0:
        return f"no seed where both {a} and {b} measured {metric}"
    if p.n == 1:
        return f"{a} − {b} = {p.diff:+.3f} on one seed: no interval, no verdict"
    ci = f"95% CI {p.low:+.3f} to {p.high:+.3f}"
    if not (p.low > 0 or p.high < 0):
        return f"no difference from {b} supported by {p.n} seeds ({p.diff:+.3f}, {ci})"
    side = "lower" if p.high < 0 else "higher"
    judged = "" if lower_is_better is None else (", better" if (side == "lower") == lower_is_better else ", worse")
    return f"{a} has {side} {metric} than {b}{judged} ({p.diff:+.3f}, {ci}, {p.n} seeds)"


def at_chance(values, chance: float, margin: float = CHANCE_MARGIN) -> bool:
    """True when the mean of values [n] exceeds chance by at most max(margin, its 95% half-width); False if empty."""
    mean, half = mean_interval(values)
    if math.isnan(mean):
        return False
    return mean - chance <= max(margin, 0.0 if math.isnan(half) else half)
