"""SIGTERM and SIGHUP end a command the way Ctrl-C does: by unwinding, so that what it
holds (a datagram client's private reply socket and directory, a child process, a
temporary directory) is cleaned up instead of left behind by the default action, which
kills the process on the spot."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType

__all__ = ["exit_on_termination"]

_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def exit_on_termination() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise SystemExit(128 + N), the shell's code for
    death by signal N; the previous handlers come back afterwards."""

    def leave(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, leave) for sig in _SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
