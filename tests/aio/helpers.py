"""Small helpers for the asyncio tests: waiting on the event loop without timing."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

E = TypeVar("E", bound=BaseException)

#: Upper bound on event-loop turns while waiting for a state the loop is bound to reach.
TURNS = 20_000


async def turns_until(condition: Callable[[], bool]) -> None:
    """Let the loop run until ``condition()`` holds (bounded; no timing involved)."""
    for _ in range(TURNS):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never held")


async def idle_turns(count: int = 200) -> None:
    """Let the loop run ``count`` times: whatever could happen without I/O has happened."""
    for _ in range(count):
        await asyncio.sleep(0)


def numbered(count: int, size: int) -> list[bytes]:
    """``count`` distinct messages of ``size`` bytes each."""
    return [b"%06d" % i + bytes(size - 6) for i in range(count)]


async def first_error(
    step: Callable[[], Awaitable[object]], error: type[E], limit: int = TURNS
) -> E:
    """Await ``step()`` again and again until it raises ``error``; return that (bounded)."""
    for _ in range(limit):
        try:
            await step()
        except error as exc:
            return exc
    raise AssertionError(f"{error.__name__} never came")
