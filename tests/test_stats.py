"""Tests for peftlab.harness.stats (chapters: rank_alpha.md, qlora.md)."""

from __future__ import annotations

import math
import statistics

import pytest

from peftlab.harness import stats

# Two-sided 95 % and one-sided 95 % critical values of Student's t, from any printed table.
TABLE_975 = {1: 12.706, 2: 4.303, 4: 2.776, 9: 2.262, 30: 2.042}
TABLE_95 = {1: 6.314, 4: 2.132, 8: 1.860}


@pytest.mark.parametrize("df, value", TABLE_975.items())
def test_t_quantile_matches_the_printed_table_at_97_5_percent(df, value):
    assert stats.t_quantile(0.975, df) == pytest.approx(value, abs=5e-4)


@pytest.mark.parametrize("df, value", TABLE_95.items())
def test_t_quantile_matches_the_printed_table_at_95_percent(df, value):
    assert stats.t_quantile(0.95, df) == pytest.approx(value, abs=5e-4)


def test_t_cdf_is_symmetric_and_tends_to_the_normal():
    assert stats.t_cdf(0.0, 3) == pytest.approx(0.5)
    assert stats.t_cdf(-1.3, 5) == pytest.approx(1 - stats.t_cdf(1.3, 5))
    normal = 0.5 * (1 + math.erf(1.96 / math.sqrt(2)))
    assert stats.t_cdf(1.96, 1e6) == pytest.approx(normal, abs=1e-6)


def test_mean_interval_is_mean_plus_minus_t_times_standard_error():
    values = [2.0, 2.2, 2.1, 1.9]
    iv = stats.mean_interval(values)
    se = statistics.stdev(values) / 2
    assert iv.estimate == pytest.approx(2.05)
    assert iv.half_width == pytest.approx(stats.t_quantile(0.975, 3) * se)
    assert iv.n == 4 and iv.confidence == 0.95


def test_welch_interval_of_identical_groups_is_a_point_and_of_shifted_groups_is_centred():
    assert stats.difference_interval([1.0, 1.0], [1.0, 1.0]).half_width == 0.0
    iv = stats.difference_interval([1.0, 1.2, 1.1], [0.5, 0.7, 0.6])
    assert iv.estimate == pytest.approx(0.5) and iv.low > 0


def test_paired_interval_removes_the_shared_seed_effect():
    a, b = [1.0, 2.0, 3.0], [0.9, 1.9, 2.9]
    assert stats.paired_interval(a, b).half_width == pytest.approx(0.0, abs=1e-12)
    assert stats.difference_interval(a, b).half_width > 1.0


def test_equivalence_needs_the_whole_interval_inside_the_margin():
    inside = stats.Interval(0.01, -0.02, 0.04, 5, 0.9)
    assert stats.equivalent(inside, 0.05) and not stats.equivalent(inside, 0.03)
    with pytest.raises(ValueError, match="margin must be positive"):
        stats.equivalent(inside, 0)


@pytest.mark.parametrize("call, message", [
    (lambda: stats.mean_interval([1.0]), "at least 2 values"),
    (lambda: stats.mean_interval([1.0, float("nan")]), "finite"),
    (lambda: stats.paired_interval([1.0, 2.0], [1.0, 2.0, 3.0]), "pair up"),
    (lambda: stats.t_quantile(1.0, 3), "p must be in"),
    (lambda: stats.t_cdf(1.0, 0), "df must be positive"),
])
def test_bad_input_is_refused_with_a_message(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_detectable_difference_is_the_t_sum_times_the_standard_error():
    diffs = [0.01, -0.02, 0.015, 0.0, 0.005, -0.01]
    iv = stats.mean_interval(diffs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs))
    expected = (stats.t_quantile(0.975, 5) + stats.t_quantile(0.8, 5)) * se
    assert stats.detectable_difference(iv) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="power"):
        stats.detectable_difference(iv, power=1.0)


def test_a_comparison_says_only_what_its_intervals_allow():
    base = [1.00, 1.02, 0.99, 1.01, 1.00, 1.03]
    far = stats.compare([x - 0.2 for x in base], base, paired=False, margin=0.01)
    assert far.different and not far.equivalent and far.verdict() == "lower"
    noise = [0.001, -0.001, 0.0005, -0.0005, 0.0, 0.0002]
    near = stats.compare([x + d for x, d in zip(base, noise)], base, paired=True, margin=0.01)
    assert near.equivalent and near.verdict().startswith("equivalent within ±0.010")
    wide = stats.compare([1.0, 1.2, 0.8], [1.1, 0.9, 1.0], paired=True, margin=0.01)
    assert not wide.different and not wide.equivalent and wide.verdict() == "undetermined"
    assert wide.tost.confidence == 0.90 and wide.interval.confidence == 0.95
    with pytest.raises(ValueError, match="margin must be positive"):
        stats.compare(base, base, paired=True, margin=0.0)
