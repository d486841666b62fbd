"""The shared measuring loops: what they count, and when their clocks start."""

from __future__ import annotations

import asyncio
import time

import pytest

from udskit.bench.loops import asend_all, make_payload, send_all


def test_warm_up_sends_go_first_and_are_neither_counted_nor_timed() -> None:
    calls: list[int] = []

    def send() -> int:
        calls.append(time.monotonic_ns())
        return 1

    result = send_all(send, count=5, seconds=60.0, check_every=1, warmup=3)
    assert (result.messages, result.warmup, len(calls)) == (5, 3, 8)
    assert calls[2] <= result.started_ns <= calls[3]


def test_a_batched_send_reports_the_warm_up_it_actually_sent() -> None:
    result = send_all(lambda: 2, count=4, seconds=60.0, check_every=1, warmup=3)
    assert (result.messages, result.warmup) == (4, 4)


def test_the_coroutine_loop_warms_up_the_same_way() -> None:
    sent = 0

    async def send() -> int:
        nonlocal sent
        sent += 1
        return 1

    result = asyncio.run(asend_all(send, count=2, seconds=60.0, check_every=1, warmup=2))
    assert (result.messages, result.warmup, sent) == (2, 2, 4)


def test_without_warm_up_the_clock_starts_at_once() -> None:
    before = time.monotonic_ns()
    result = send_all(lambda: 1, count=3, seconds=60.0, check_every=1)
    assert (result.messages, result.warmup) == (3, 0)
    assert result.started_ns >= before


@pytest.mark.parametrize("size", [0, 1, 255, 256, 257, 1 << 20])
def test_the_payload_is_a_pattern_not_zeros(size: int) -> None:
    """A copy of zeros that were never written reads the kernel's one shared zero page:
    every contender sends the same non-zero pattern instead, of exactly ``size`` bytes."""
    data = make_payload(size)
    assert type(data) is bytes
    assert len(data) == size
    assert data == bytes(i % 256 for i in range(size))
