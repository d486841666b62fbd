"""Plain statistics for the benchmark: percentiles, latency and throughput summaries, ratios.

Latencies come in as integer nanoseconds and go out in microseconds; throughput is payload
bytes only (framing headers are not counted), in decimal megabytes (10**6 bytes) per second.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "Latency",
    "Throughput",
    "latency",
    "median_index",
    "percentile",
    "ratio",
    "throughput",
]


@dataclass(frozen=True, slots=True)
class Latency:
    """A latency distribution's summary, in microseconds."""

    count: int
    p50_us: float
    p90_us: float
    p99_us: float
    mean_us: float
    min_us: float
    max_us: float


@dataclass(frozen=True, slots=True)
class Throughput:
    """Messages and payload megabytes per second."""

    messages: int
    seconds: float
    msgs_per_s: float
    mb_per_s: float


def percentile(ordered: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ascending ``ordered`` values.

    Linear interpolation between the two nearest ranks (NumPy's default, Hyndman and Fan's
    type 7), so p50 of an even count is the mean of the middle two.
    """
    if not ordered:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be from 0 to 100, not {q}")
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    fraction = rank - low
    return ordered[low] + (ordered[high] - ordered[low]) * fraction


def latency(samples_ns: Sequence[int]) -> Latency:
    """Summarise round-trip samples given in nanoseconds."""
    if not samples_ns:
        raise ValueError("no latency samples: the peer measured nothing")
    ordered = sorted(samples_ns)
    us = [value / 1000 for value in ordered]
    return Latency(
        count=len(us),
        p50_us=percentile(us, 50),
        p90_us=percentile(us, 90),
        p99_us=percentile(us, 99),
        mean_us=math.fsum(us) / len(us),
        min_us=us[0],
        max_us=us[-1],
    )


def throughput(messages: int, size: int, seconds: float) -> Throughput:
    """Rates for ``messages`` payloads of ``size`` bytes moved in ``seconds``."""
    if messages < 0 or size < 0:
        raise ValueError(f"messages and size must be >= 0, not {messages} and {size}")
    if seconds <= 0:
        raise ValueError(f"the measured interval must be positive, not {seconds} s")
    rate = messages / seconds
    return Throughput(messages, seconds, rate, rate * size / 1e6)


def median_index(values: Sequence[float]) -> int:
    """Index of the median of ``values`` (the lower one of an even count): the median run
    itself, rather than an average of two runs that never happened."""
    if not values:
        raise ValueError("median of no values")
    order = sorted(range(len(values)), key=values.__getitem__)
    return order[(len(values) - 1) // 2]


def ratio(value: float | None, baseline: float | None) -> float | None:
    """``value / baseline``, or None when either is missing or the baseline is not positive."""
    if value is None or baseline is None or baseline <= 0:
        return None
    return value / baseline
