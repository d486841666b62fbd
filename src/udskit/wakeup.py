"""A self-pipe that wakes a thread waiting in poll()/epoll: safe from other threads and from
signal handlers (one non-blocking write, errors ignored)."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

__all__ = ["WakeUp", "woken_by_signals"]


class WakeUp:
    """Watch ``fd`` for reading; ``wake()`` makes it readable, ``drain()`` quiet again."""

    __slots__ = ("_lock", "_write", "fd")

    def __init__(self) -> None:
        self.fd, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # Held across each use of the descriptors and across close(): a wake() in another
        # thread that read the number just before close() would otherwise write after it,
        # into whatever took the number in the meantime (a client's socket, a file).
        self._lock = threading.Lock()

    @property
    def write_fd(self) -> int:
        """The end that ``wake()`` writes to (-1 once closed)."""
        return self._write

    def wake(self) -> None:
        # Never waits: safe in a signal handler that interrupted a holder of the lock. A
        # holder is waking it already (then the pipe is written), or closing it.
        if not self._lock.acquire(blocking=False):
            return
        try:
            os.write(self._write, b"!")
        except OSError:
            pass  # full (a wake-up is pending anyway), or closed
        finally:
            self._lock.release()

    def drain(self) -> None:
        with self._lock:
            try:
                while os.read(self.fd, 4096):
                    pass
            except OSError:
                pass  # empty (BlockingIOError), or closed

    def close(self) -> None:
        """Close both ends. Retired first: a later ``wake()`` (a late thread, a signal) must
        not write to these numbers, which the next open() in any thread may get."""
        with self._lock:
            ends = (self.fd, self._write)
            self.fd = self._write = -1  # -1: EBADF, ignored
            for fd in ends:
                if fd >= 0:
                    os.close(fd)


@contextlib.contextmanager
def woken_by_signals(wakeup: WakeUp) -> Iterator[None]:
    """While the block runs in the main thread, a signal also wakes ``wakeup``'s reader.

    The kernel may hand a process's signal to any of its threads. Python runs the handler
    only in the main thread, at its next instruction: one asleep in poll() while a worker
    took the signal would not run it until something else woke it. Python's own handler
    writes to the wakeup descriptor (``signal.set_wakeup_fd``) in whatever thread gets the
    signal: here a copy of ``wakeup``'s write end, closed only once signals stop writing
    to it. Elsewhere than the main thread, nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    ring = os.dup(wakeup.write_fd)
    try:
        previous = signal.set_wakeup_fd(ring, warn_on_full_buffer=False)
        try:
            yield
        finally:
            signal.set_wakeup_fd(previous)
    finally:
        os.close(ring)
