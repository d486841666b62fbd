"""A self-pipe that wakes a thread waiting in poll()/epoll: safe from other threads and from
signal handlers (one non-blocking write, errors ignored)."""

from __future__ import annotations

import os

__all__ = ["WakeUp"]


class WakeUp:
    """Watch ``fd`` for reading; ``wake()`` makes it readable, ``drain()`` quiet again."""

    __slots__ = ("_write", "fd")

    def __init__(self) -> None:
        self.fd, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    @property
    def write_fd(self) -> int:
        """The end that ``wake()`` writes to (-1 once closed)."""
        return self._write

    def wake(self) -> None:
        try:
            os.write(self._write, b"!")
        except OSError:
            pass  # full (a wake-up is pending anyway), or closed

    def drain(self) -> None:
        try:
            while os.read(self.fd, 4096):
                pass
        except OSError:
            pass  # empty (BlockingIOError), or closed

    def close(self) -> None:
        """Close both ends. Retired first: a later ``wake()`` (a late thread, a signal) must
        not write to these numbers, which the next open() in any thread may get."""
        ends = (self.fd, self._write)
        self.fd = self._write = -1  # -1: EBADF, ignored
        for fd in ends:
            if fd >= 0:
                os.close(fd)
