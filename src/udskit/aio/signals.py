"""SIGINT and SIGTERM routed to a callback on an event loop while something serves, and
given back afterwards: how ``udskit.aio.serve()``, ``serve_messages()`` and
``udskit.bridge.run()`` stop cleanly.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Awaitable, Callable
from typing import Protocol

__all__ = ["give_back_signals", "serve_until_signalled", "take_signals"]

log = logging.getLogger("udskit")


def take_signals(
    loop: asyncio.AbstractEventLoop, callback: Callable[[int], object]
) -> list[tuple[signal.Signals, object]]:
    """Route SIGINT and SIGTERM to ``callback`` on ``loop``; what was there before."""
    if threading.current_thread() is not threading.main_thread():
        return []  # only the main thread may handle signals
    installed: list[tuple[signal.Signals, object]] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous = signal.getsignal(signum)
        try:
            loop.add_signal_handler(signum, callback, signum)
        except (NotImplementedError, RuntimeError, ValueError):
            continue  # a loop without signal support: the caller has to stop it itself
        installed.append((signum, previous))
    return installed


def give_back_signals(
    loop: asyncio.AbstractEventLoop, installed: list[tuple[signal.Signals, object]]
) -> None:
    """Undo :func:`take_signals`: the handlers that were there before are put back."""
    for signum, previous in installed:
        try:
            loop.remove_signal_handler(signum)
        except (RuntimeError, ValueError):
            pass  # the loop is closing: its handlers go with it
        if previous is not None:
            signal.signal(signum, previous)  # type: ignore[arg-type]


class _Serving(Protocol):
    def stop(self) -> None: ...
    async def serve_forever(self) -> None: ...
    async def aclose(self) -> None: ...


async def serve_until_signalled(address: object, start: Callable[[], Awaitable[_Serving]]) -> None:
    """``await start()`` and serve until SIGINT or SIGTERM (or ``stop()``). In the main
    thread those signals stop the server cleanly and their previous handlers are put back
    after. The handlers go in before the socket is claimed, so an early signal still
    removes it."""
    loop = asyncio.get_running_loop()
    server: _Serving | None = None
    stop_requested = False

    def on_signal(signum: int) -> None:
        nonlocal stop_requested
        log.info("%s: received %s, stopping", address, signal.Signals(signum).name)
        stop_requested = True
        if server is not None:
            server.stop()

    installed = take_signals(loop, on_signal)
    try:
        server = await start()
        if stop_requested:
            server.stop()
        await server.serve_forever()
    finally:
        give_back_signals(loop, installed)
        if server is not None:
            await server.aclose()
