"""Run a contender's coroutine on the event loop its job names: asyncio's own, or uvloop's."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from ..wire import Job

__all__ = ["run"]

T = TypeVar("T")


def run(job: Job, main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on a new loop of the kind ``job.options["loop"]`` names."""
    kind = job.option("loop", "asyncio")
    loop: asyncio.AbstractEventLoop
    if kind == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
    elif kind == "asyncio":
        loop = asyncio.new_event_loop()
    else:
        main.close()
        raise ValueError(f"unknown event loop {kind!r}: choose 'asyncio' or 'uvloop'")
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(main)
    finally:
        asyncio.set_event_loop(None)
        loop.close()
