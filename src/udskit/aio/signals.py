"""SIGINT and SIGTERM routed to a callback on an event loop while something serves, and
given back afterwards: how ``udskit.aio.serve()`` and ``udskit.bridge.run()`` stop cleanly.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable

__all__ = ["give_back_signals", "take_signals"]


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
