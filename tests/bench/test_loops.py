"""The shared measuring loops: what they count, and when their clocks start."""

from __future__ import annotations

import asyncio
import time

from udskit.bench.loops import asend_all, send_all


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
