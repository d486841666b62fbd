"""The measuring loops every Python contender shares, so that all pay the same loop overhead.

Each contender supplies the one operation (a round trip, a send, a receive) as a callable;
these loops time it, bounded by a count and a time cap. The clock is CLOCK_MONOTONIC
(``time.monotonic_ns``), which every process on the machine shares: a sender's start and a
receiver's end can be subtracted.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Final

from .wire import RttResult, SendResult, StreamResult

__all__ = [
    "areceive_all",
    "make_payload",
    "arun_round_trips",
    "asend_all",
    "receive_all",
    "run_round_trips",
    "send_all",
    "stream_check_every",
]

_clock = time.monotonic_ns

#: The sender reads the clock once per this many bytes sent: often enough to stop within
#: a few milliseconds of the cap, rarely enough not to cost anything measurable.
_CLOCK_EVERY_BYTES: Final = 256 * 1024


def make_payload(size: int) -> bytes:
    """What every Python contender sends: ``size`` bytes of a repeating 0-255 pattern,
    backed by memory of its own. ``bytes(size)`` would not do: above the allocator's mmap
    threshold its zeros are the kernel's one shared zero page until written, so a copy
    from it reads one cached page, and a 256 MiB copy measured three times as fast as one
    of real data (the C reference fills its payload the same way)."""
    return (_PATTERN * (size // len(_PATTERN) + 1))[:size]


_PATTERN: Final = bytes(range(256))


def stream_check_every(size: int) -> int:
    """How many sends of ``size`` bytes between two looks at the clock."""
    return max(1, _CLOCK_EVERY_BYTES // max(size, 1))


def run_round_trips(
    once: Callable[[], object], *, count: int, warmup: int, seconds: float
) -> RttResult:
    """Time ``once()`` ``count`` times (after ``warmup`` untimed calls), or until the cap."""
    for _ in range(warmup):
        once()
    samples: list[int] = []
    deadline = _clock() + int(seconds * 1e9)
    for _ in range(count):
        start = _clock()
        once()
        end = _clock()
        samples.append(end - start)
        if end > deadline:
            break
    return RttResult(samples)


async def arun_round_trips(
    once: Callable[[], Awaitable[object]], *, count: int, warmup: int, seconds: float
) -> RttResult:
    """``run_round_trips`` for a coroutine function."""
    for _ in range(warmup):
        await once()
    samples: list[int] = []
    deadline = _clock() + int(seconds * 1e9)
    for _ in range(count):
        start = _clock()
        await once()
        end = _clock()
        samples.append(end - start)
        if end > deadline:
            break
    return RttResult(samples)


def send_all(
    send: Callable[[], int], *, count: int, seconds: float, check_every: int, warmup: int = 0
) -> SendResult:
    """Call ``send()`` (which returns how many messages it sent) until ``count`` messages or
    the time cap; first, untimed and uncounted, until ``warmup`` messages went."""
    warm = 0
    while warm < warmup:
        warm += send()
    started = _clock()
    deadline = started + int(seconds * 1e9)
    sent = 0
    calls = 0
    while sent < count:
        sent += send()
        calls += 1
        if calls % check_every == 0 and _clock() > deadline:
            break
    return SendResult(sent, started, warm)


async def asend_all(
    send: Callable[[], Awaitable[int]],
    *,
    count: int,
    seconds: float,
    check_every: int,
    warmup: int = 0,
) -> SendResult:
    """``send_all`` for a coroutine function."""
    warm = 0
    while warm < warmup:
        warm += await send()
    started = _clock()
    deadline = started + int(seconds * 1e9)
    sent = 0
    calls = 0
    while sent < count:
        sent += await send()
        calls += 1
        if calls % check_every == 0 and _clock() > deadline:
            break
    return SendResult(sent, started, warm)


def receive_all(receive: Callable[[], int]) -> StreamResult:
    """Call ``receive()`` (messages received, 0 at the end of the stream) until the end."""
    total = 0
    last = _clock()
    while got := receive():
        total += got
        last = _clock()
    return StreamResult(total, last)


async def areceive_all(receive: Callable[[], Awaitable[int]]) -> StreamResult:
    """``receive_all`` for a coroutine function."""
    total = 0
    last = _clock()
    while got := await receive():
        total += got
        last = _clock()
    return StreamResult(total, last)
