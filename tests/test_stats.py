import math

import pytest
from scipy import stats as scipy_stats

from segdist.stats import summarize, welch_p_value


def test_t_interval_by_hand():
    s = summarize([0.60, 0.62, 0.64])
    assert s.n == 3 and s.mean == pytest.approx(0.62) and s.std == pytest.approx(0.02)
    half = 4.302652729911275 * 0.02 / math.sqrt(3)  # t(0.975, df=2)
    assert s.ci_low == pytest.approx(0.62 - half) and s.ci_high == pytest.approx(0.62 + half)


def test_one_value_has_an_unbounded_interval():
    s = summarize([0.5])
    assert math.isnan(s.std) and s.ci_low == -math.inf and s.ci_high == math.inf


def test_welch_matches_scipy_and_detects_a_real_gap():
    a, b = [0.683, 0.654, 0.668], [0.682, 0.684]
    assert welch_p_value(a, b) == pytest.approx(scipy_stats.ttest_ind(a, b, equal_var=False).pvalue)
    assert welch_p_value([0.50, 0.51, 0.52], [0.70, 0.71, 0.72]) < 0.001
    assert math.isnan(welch_p_value([0.5], [0.6, 0.7]))
