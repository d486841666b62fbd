"""Fixtures for the asyncio tests: every test runs on asyncio's loop and on uvloop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest

import udskit.aio

from .transport import LOOPS

T = TypeVar("T")

#: Upper bound for one test's coroutine: a hang fails the test instead of the whole run.
TEST_TIMEOUT = 30.0

# libuv opens one pipe for the whole process the first time a uvloop loop is made (its
# signal lock, uv__signal_global_init). Make that happen now, so that the descriptor counts
# the tests take before and after never see it.
udskit.aio.new_event_loop(use_uvloop=True).close()


@pytest.fixture(params=LOOPS)
def loop_name(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def arun(loop_name: str) -> Callable[[Coroutine[Any, Any, T]], T]:
    """Run a coroutine to completion on a fresh loop of the parametrised kind."""

    def run(coro: Coroutine[Any, Any, T]) -> T:
        async def bounded() -> T:
            return await asyncio.wait_for(coro, TEST_TIMEOUT)

        return udskit.aio.run(bounded(), use_uvloop=loop_name == "uvloop")

    return run
