"""Seed statistics: mean, spread, a t-distribution confidence interval, Welch's t-test."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats as scipy_stats

# The metric seeds are compared on (adaptive seeds, the report, a study's table): the last
# epoch evaluated with the study's eval settings (segdist.train), mIoU in 0..1.
HEADLINE_METRIC = "final_miou"


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: float  # sample standard deviation (n - 1); NaN for one value
    ci_low: float
    ci_high: float

    @property
    def halfwidth(self) -> float:
        return (self.ci_high - self.ci_low) / 2

    def overlaps(self, other: Summary) -> bool:
        return self.ci_low <= other.ci_high and other.ci_low <= self.ci_high


def summarize(values: Sequence[float], confidence: float = 0.95) -> Summary:
    """A one-value summary has an infinite interval: one seed says nothing about spread."""
    n = len(values)
    if n == 0:
        nan = float("nan")
        return Summary(0, nan, nan, nan, nan)
    mean = statistics.fmean(values)
    if n == 1:
        return Summary(1, mean, float("nan"), -math.inf, math.inf)
    std = statistics.stdev(values)
    t = scipy_stats.t.ppf(0.5 + confidence / 2, df=n - 1)
    half = t * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


def welch_p_value(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided Welch's t-test (unequal variances); NaN when either side has < 2 values."""
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    if statistics.stdev(a) == 0 and statistics.stdev(b) == 0:
        return 1.0 if statistics.fmean(a) == statistics.fmean(b) else 0.0
    return float(scipy_stats.ttest_ind(a, b, equal_var=False).pvalue)
