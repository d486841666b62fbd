"""How the asyncio layer waits: for a readiness callback, or, where the kernel gives none,
with growing pauses.

Waiting never loses data: a woken task re-checks the state it waited on (bytes buffered,
queue drained, channel closed) instead of receiving anything through the future, so a task
cancelled at any point leaves every message where the next call finds it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Final

from ..address import Address
from ..translate import translating

__all__ = ["EXPIRED", "RETRY_FIRST", "expire", "RETRY_MAX", "RetryPause", "Waiters"]

#: First and longest pause between retries of an operation the kernel cannot signal us about
#: (a full datagram receiver queue behind an unconnected socket, a full listen backlog):
#: short enough to add little latency, growing so a stuck peer costs almost no CPU.
RETRY_FIRST: Final = 0.0005
RETRY_MAX: Final = 0.05


class _Expired:
    """Sentinel: a wait ended because its timeout passed."""

    def __repr__(self) -> str:
        return "EXPIRED"


EXPIRED: Final = _Expired()


def expire(future: asyncio.Future[object]) -> None:
    if not future.done():
        future.set_result(EXPIRED)


class Waiters:
    """Tasks waiting for one condition on one descriptor; ``wake_all`` lets them re-check."""

    __slots__ = ("_futures", "_what")

    def __init__(self, what: str) -> None:
        self._futures: list[asyncio.Future[object]] = []
        self._what = what

    def __bool__(self) -> bool:
        return bool(self._futures)

    async def wait(
        self, loop: asyncio.AbstractEventLoop, timeout: float | None, *, exclusive: bool = False
    ) -> object:
        """Wait for ``wake_all`` (None) or ``timeout`` seconds (EXPIRED)."""
        if exclusive and self._futures:
            raise RuntimeError(
                f"another task is already waiting to {self._what} on this endpoint; "
                "one task at a time may do that"
            )
        future = loop.create_future()
        self._futures.append(future)
        timer = None if timeout is None else loop.call_later(timeout, expire, future)
        try:
            return await future
        finally:
            self._futures.remove(future)
            if timer is not None:
                timer.cancel()

    def wake_all(self) -> None:
        for future in self._futures:
            if not future.done():
                future.set_result(None)


class RetryPause:
    """Growing pauses for one retry loop, ending in ``Timeout`` after ``timeout`` seconds."""

    __slots__ = ("_deadline", "_delay", "_op", "_where")

    def __init__(self, timeout: float | None, op: str, where: Address | str | None) -> None:
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._delay = RETRY_FIRST
        self._op = op
        self._where = where

    async def pause(self) -> None:
        delay = self._delay
        if self._deadline is not None:
            left = self._deadline - time.monotonic()
            if left <= 0:
                with translating(self._op, self._where):
                    raise TimeoutError
            delay = min(delay, left)
        await asyncio.sleep(delay)
        self._delay = min(self._delay * 2, RETRY_MAX)
