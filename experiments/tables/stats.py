"""Small statistics for ablation tables: summaries and paired gains with t confidence intervals.

Student's t quantile comes from ``scipy.stats.t``; this module keeps only what scipy does not do
in one call: a summary that tolerates n < 2 (nan instead of a warning) and the paired difference of
two runs-by-seed mappings over the seeds they share, with its interval.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scipy.stats import t as student_t

__all__ = ["PairedGain", "Summary", "paired_gain", "summarize"]


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
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"paired_gain: confidence must be in (0, 1), got {confidence}")
    common = [k for k in treatment if k in baseline]
    diffs = [treatment[k] - baseline[k] for k in common]
    s = summarize(diffs)
    if s.n < 2:
        return PairedGain(s.mean, math.nan, math.nan, s.n, confidence)
    quantile = float(student_t.ppf(0.5 + confidence / 2.0, s.n - 1))
    half = quantile * s.std / math.sqrt(s.n)
    return PairedGain(s.mean, s.mean - half, s.mean + half, s.n, confidence)
