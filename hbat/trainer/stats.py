"""Intervals over seeds for `hbat compare`: Student t-intervals of a mean and of paired differences.

    mean_interval([0.70, 0.74, 0.69, 0.72, 0.71])          # mean and 95% t-interval over 5 seeds
    paired_difference(hbat_by_seed, two_stage_by_seed)      # mean difference, its 95% t-interval, p-value

A run's metric over n seeds is treated as n independent draws; its interval is
``mean +- t_{(1+level)/2, n-1} * sd / sqrt(n)`` (sd with n - 1 in the denominator). Two methods run on the same
seeds share the data, base model, SFT model and reward model of each seed, so they are compared by the
differences seed by seed (a paired t-test): the difference is significant at ``level`` when the t-interval of the
mean difference excludes 0, which is the two-sided paired t-test's p-value being below ``1 - level``.

No scipy: the t distribution's CDF is the regularized incomplete beta function (continued fraction, as in
Numerical Recipes' ``betacf``) and its quantile is found by bisection, both to ~1e-12.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), for a, b > 0 and x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (e.g. t_quantile(0.975, 4) = 2.776)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Interval:
    """The mean of ``n`` values and its t-interval ``[low, high]`` at ``level`` (None where n < 2)."""

    mean: float
    low: float | None
    high: float | None
    n: int
    level: float = 0.95
    p_value: float | None = None      # paired differences: two-sided p of the paired t-test (H0: mean 0)

    @property
    def half_width(self) -> float | None:
        return None if self.high is None else (self.high - self.low) / 2.0

    @property
    def excludes_zero(self) -> bool:
        """The difference is significant at ``level``: its interval lies wholly on one side of 0."""
        return self.low is not None and (self.low > 0.0 or self.high < 0.0)


def mean_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean and Student t-interval of ``values`` (one per seed)."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("mean_interval needs at least one value")
    n = len(xs)
    mean = math.fsum(xs) / n
    if n < 2:
        return Interval(mean, None, None, n, level)
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile((1.0 + level) / 2.0, n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, level)


def paired_difference(values: Sequence[float], baseline: Sequence[float], level: float = 0.95) -> Interval:
    """``values - baseline`` seed by seed: the mean difference, its t-interval and the paired t-test's p-value.

    Identical differences on every seed (sd 0) give a zero-width interval: significant unless they are 0."""
    if len(values) != len(baseline):
        raise ValueError(f"paired_difference needs one baseline value per value, got {len(values)} and {len(baseline)}")
    diffs = [float(a) - float(b) for a, b in zip(values, baseline)]
    interval = mean_interval(diffs, level)
    if interval.n < 2:
        return interval
    n, mean = interval.n, interval.mean
    sd = math.sqrt(math.fsum((d - mean) ** 2 for d in diffs) / (n - 1))
    if sd == 0.0:
        p = 1.0 if mean == 0.0 else 0.0
    else:
        p = 2.0 * (1.0 - t_cdf(abs(mean) / (sd / math.sqrt(n)), n - 1))
    return Interval(mean, interval.low, interval.high, n, level, min(1.0, max(0.0, p)))
