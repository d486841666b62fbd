"""Which event loop to run: uvloop when it is installed (``udskit[fast]``), else asyncio's.

Everything in :mod:`udskit.aio` works on both; ``run`` only picks the faster one.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["loop_factory", "new_event_loop", "run", "uvloop_available"]

T = TypeVar("T")


def uvloop_available() -> bool:
    """True if uvloop can be imported (``pip install 'udskit[fast]'``)."""
    try:
        importlib.import_module("uvloop")
    except ImportError:
        return False
    return True


def loop_factory(use_uvloop: bool | None = None) -> Callable[[], asyncio.AbstractEventLoop]:
    """A callable making a new event loop: uvloop's if ``use_uvloop`` (None: if installed).

    ``use_uvloop=True`` without uvloop installed raises ImportError that says how to get it.
    """
    if use_uvloop is None:
        use_uvloop = uvloop_available()
    if not use_uvloop:
        return asyncio.new_event_loop
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError as exc:
        raise ImportError(
            "uvloop is not installed: pip install 'udskit[fast]' (or pass use_uvloop=None "
            "to fall back to the standard event loop)"
        ) from exc
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def new_event_loop(use_uvloop: bool | None = None) -> asyncio.AbstractEventLoop:
    """A new event loop: uvloop when installed (or asked for), else the standard one."""
    return loop_factory(use_uvloop)()


def run(main: Coroutine[Any, Any, T], *, use_uvloop: bool | None = None, debug: bool = False) -> T:
    """Run ``main`` to completion like :func:`asyncio.run`, on uvloop when it is installed.

    ``use_uvloop=False`` forces the standard loop; ``True`` requires uvloop.
    """
    try:
        factory = loop_factory(use_uvloop)
    except BaseException:
        main.close()  # never started: do not leave it to warn "never awaited"
        raise
    # asyncio.Runner (3.11+) takes a loop factory and keeps asyncio.run's semantics (SIGINT
    # cancels main, async generators and the default executor are shut down).
    runner_type = getattr(asyncio, "Runner", None)
    if runner_type is not None:
        with runner_type(debug=debug, loop_factory=factory) as runner:
            result: T = runner.run(main)
            return result
    return _run_py310(main, factory, debug)  # pragma: no cover - Python 3.10 only


def _run_py310(  # pragma: no cover - Python 3.10 only
    main: Coroutine[Any, Any, T], factory: Callable[[], asyncio.AbstractEventLoop], debug: bool
) -> T:
    """asyncio.run's body for Python 3.10, which has no Runner."""
    loop = factory()
    try:
        asyncio.set_event_loop(loop)
        loop.set_debug(debug)
        return loop.run_until_complete(main)
    finally:
        try:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
