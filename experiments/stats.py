"""Small statistics for ablation tables: summaries, Student's t quantile, paired gains.

Pure Python (math only): no scipy. The t quantile inverts the t CDF, which is written with the
regularized incomplete beta function (Numerical Recipes, 3rd ed., section 6.4, continued fraction
evaluated with the modified Lentz method).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "PairedGain",
    "Summary",
    "betainc",
    "normal_quantile",
    "paired_gain",
    "summarize",
    "t_cdf",
    "t_quantile",
]


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation (ddof=1; nan when n < 2) and count of some values."""

    mean: float
    std: float
    n: int


@dataclass(frozen=True)
class PairedGain:
    """Mean of paired differences with a two-sided t confidence interval (nan when n < 2)."""

    mean: float
    ci_low: float
    ci_high: float
    n: int
    confidence: float = 0.95


def summarize(values: Sequence[float]) -> Summary:
    """Mean, sample std (ddof=1) and count; an empty sequence gives nan mean and std, n=0."""
    n = len(values)
    if n == 0:
        return Summary(math.nan, math.nan, 0)
    mean = math.fsum(values) / n
    if n < 2:
        return Summary(mean, math.nan, n)
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return Summary(mean, math.sqrt(var), n)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction for the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = 1.0
    d = 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc: x must be in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    front = math.exp(log_front)
    # The continued fraction converges fast for x < (a + 1) / (a + b + 2); use symmetry otherwise.
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """CDF of Student's t distribution with `df` > 0 degrees of freedom."""
    if df <= 0:
        raise ValueError(f"t_cdf: df must be > 0, got {df}")
    if math.isinf(df):
        return 0.5 * math.erfc(-t / math.sqrt(2.0))
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t >= 0 else tail


def _invert(cdf, p: float) -> float:
    """Solve cdf(x) = p for a continuous increasing cdf by bracketing and bisection."""
    lo, hi = -1.0, 1.0
    while cdf(lo) > p:
        lo *= 2.0
    while cdf(hi) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if cdf(mid) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, abs(mid)):
            break
    return 0.5 * (lo + hi)


def normal_quantile(p: float) -> float:
    """Quantile of the standard normal distribution (0 < p < 1)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"normal_quantile: p must be in (0, 1), got {p}")
    return _invert(lambda x: 0.5 * math.erfc(-x / math.sqrt(2.0)), p)


def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t: the x with P(T <= x) = p; e.g. t_quantile(0.975, 2) = 4.303.

    `df` may be any positive real, or math.inf (the normal distribution).
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p must be in (0, 1), got {p}")
    if df <= 0:
        raise ValueError(f"t_quantile: df must be > 0, got {df}")
    if p == 0.5:
        return 0.0
    if math.isinf(df):
        return normal_quantile(p)
    return _invert(lambda x: t_cdf(x, df), p)


def paired_gain(
    baseline: Mapping[object, float],
    treatment: Mapping[object, float],
    confidence: float = 0.95,
) -> PairedGain:
    """Paired difference treatment - baseline over the keys (seeds) present in both.

    Returns the mean difference and a two-sided `confidence` interval
    mean ± t_{(1+confidence)/2, n-1} * sd / sqrt(n). With one pair the interval is nan; with none
    the mean is nan too.
    """
    common = [k for k in treatment if k in baseline]
    diffs = [treatment[k] - baseline[k] for k in common]
    s = summarize(diffs)
    if s.n < 2:
        return PairedGain(s.mean, math.nan, math.nan, s.n, confidence)
    half = t_quantile(0.5 + confidence / 2.0, s.n - 1) * s.std / math.sqrt(s.n)
    return PairedGain(s.mean, s.mean - half, s.mean + half, s.n, confidence)
