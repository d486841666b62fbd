"""The benchmark's statistics: percentiles, summaries, rates, ratios."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from udskit.bench.stats import latency, median_index, percentile, ratio, throughput


def test_percentile_interpolates_between_ranks() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == 2.5  # the mean of the middle two
    assert percentile(values, 25) == pytest.approx(1.75)
    assert percentile(values, 99) == pytest.approx(3.97)


def test_percentile_of_one_value_is_that_value() -> None:
    assert percentile([7.0], 0) == percentile([7.0], 50) == percentile([7.0], 100) == 7.0


@pytest.mark.parametrize("q", [-1, 100.5])
def test_percentile_refuses_out_of_range(q: float) -> None:
    with pytest.raises(ValueError, match="from 0 to 100"):
        percentile([1.0], q)


def test_percentile_refuses_no_values() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)


@given(st.lists(st.floats(-1e9, 1e9), min_size=1, max_size=200), st.floats(0, 100))
def test_percentile_lies_within_the_data_and_grows_with_q(values: list[float], q: float) -> None:
    ordered = sorted(values)
    found = percentile(ordered, q)
    assert ordered[0] <= found <= ordered[-1] or math.isclose(found, ordered[0])
    assert percentile(ordered, min(100.0, q + 1)) >= found - 1e-6


def test_latency_converts_nanoseconds_to_microseconds() -> None:
    summary = latency([3000, 1000, 2000, 4000, 100_000])
    assert summary.count == 5
    assert summary.min_us == 1.0
    assert summary.max_us == 100.0
    assert summary.p50_us == 3.0
    assert summary.mean_us == pytest.approx(22.0)
    assert summary.p99_us == pytest.approx(96.16)


def test_latency_refuses_no_samples() -> None:
    with pytest.raises(ValueError, match="no latency samples"):
        latency([])


def test_throughput_counts_payload_in_decimal_megabytes() -> None:
    rate = throughput(messages=1000, size=4096, seconds=0.5)
    assert rate.msgs_per_s == 2000
    assert rate.mb_per_s == pytest.approx(8.192)
    assert rate.messages == 1000


@pytest.mark.parametrize(("messages", "size", "seconds"), [(1, 1, 0.0), (1, 1, -1.0), (-1, 1, 1.0)])
def test_throughput_refuses_impossible_input(messages: int, size: int, seconds: float) -> None:
    with pytest.raises(ValueError):
        throughput(messages, size, seconds)


def test_ratio_needs_both_values_and_a_positive_baseline() -> None:
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(None, 2.0) is None
    assert ratio(3.0, None) is None
    assert ratio(3.0, 0.0) is None


def test_median_index_points_at_the_median_run() -> None:
    assert median_index([5.0]) == 0
    assert median_index([3.0, 1.0, 2.0]) == 2
    assert median_index([4.0, 1.0, 3.0, 2.0]) == 3  # the lower of the middle two
    with pytest.raises(ValueError, match="no values"):
        median_index([])
