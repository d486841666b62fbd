"""Shared fixtures: short temporary directories, readiness waits, descriptor counting."""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import fcntl
import os
import resource
import shutil
import socket
import tempfile
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest

import udskit.accepting
from udskit.proto.framing import LengthPrefixed


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests marked ``long`` first (in their order): the workers share them out at the
    start, and none is left to run alone at the end while the other worker waits."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


#: Upper bound for waiting on a server to come up: generous, since CI machines stall.
READY_TIMEOUT = 20.0


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A private temporary directory with a short path (sun_path is 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="uds-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def wait_connectable(path: str | os.PathLike[str], kind: int = socket.SOCK_STREAM) -> None:
    """Return once ``path`` accepts a connection; fail after READY_TIMEOUT (bounded loop)."""
    deadline = time.monotonic() + READY_TIMEOUT
    delay = 0.001
    while True:
        with socket.socket(socket.AF_UNIX, kind) as probe:
            try:
                probe.connect(os.fspath(path))
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
        time.sleep(delay)  # back-off between readiness probes, not synchronisation
        delay = min(delay * 2, 0.05)


def unread(sock: socket.socket) -> int:
    """The size of the next datagram in a datagram socket's receive queue (0: none waits,
    for a test that sends no empty datagram): whether the kernel still holds one."""
    size = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, size)
    return size[0]


def open_fds() -> set[int]:
    """This process's open descriptors."""
    return {int(name) for name in os.listdir("/proc/self/fd")}


@contextlib.contextmanager
def no_descriptor_left(free: int = 0) -> Iterator[None]:
    """This process at its open-file limit but for ``free`` descriptors (restored after),
    as if that were its hard limit: a server that runs out would raise its soft limit to
    the hard one (``udskit.accepting.raise_open_file_limit``), and lowering the hard limit
    could not be undone here."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers: list[int] = []
    at_hard_limit = mock.patch.object(udskit.accepting, "raise_open_file_limit", return_value=None)
    try:
        at_hard_limit.start()
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(open_fds()) + 1 + free, hard))
        while True:  # bounded: by the limit just set
            try:
                fillers.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
            except OSError as exc:
                if exc.errno != errno.EMFILE:
                    raise
                break
        for _ in range(free):  # at least ``free`` were made: the limit is past every open one
            os.close(fillers.pop())
        yield
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        at_hard_limit.stop()


@pytest.fixture
def no_fd_leak() -> Iterator[None]:
    """Fail the test if it leaves descriptors open that were not open before it."""
    before = open_fds()
    yield
    leaked = open_fds() - before
    # listdir itself holds one descriptor while it reads
    leaked = {fd for fd in leaked if os.path.exists(f"/proc/self/fd/{fd}")}
    assert not leaked, f"descriptors leaked: {sorted(leaked)}"


def stop_loop_thread(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    """Stop ``loop``, running in ``thread``, the way ``asyncio.run()`` ends its loop.

    Tasks still running (a handler waiting for its peer, a connection accepted but not yet
    handed to its handler) are cancelled and run to their end, so that they close their
    transports on the loop; closing the loop under them would leave the sockets to the
    garbage collector, which reports them in whichever later test it happens to run.
    """

    async def cancel_the_rest() -> None:
        current = asyncio.current_task()
        rest = [task for task in asyncio.all_tasks() if task is not current]
        for task in rest:
            task.cancel()
        await asyncio.gather(*rest, return_exceptions=True)
        await loop.shutdown_asyncgens()

    if thread.is_alive():
        asyncio.run_coroutine_threadsafe(cancel_the_rest(), loop).result(READY_TIMEOUT)
        # The callbacks that close the cancelled tasks' sockets were queued before this stop.
        loop.call_soon_threadsafe(loop.stop)
        thread.join(READY_TIMEOUT)
    assert not thread.is_alive(), "event loop thread did not stop"
    loop.close()


def cpu_used(pid: int, seconds: float) -> float:
    """User plus system CPU time process ``pid`` uses over the next ``seconds`` (from
    /proc/PID/stat): what a process that spins uses up, however busy the machine (a
    wall-clock bound would time the machine, not the process)."""
    before = _cpu_seconds(pid)
    time.sleep(seconds)  # the measured window, not a synchronisation
    return _cpu_seconds(pid) - before


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    # After the command: state is field 3; utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture
def rests(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the messages a channel completed in their own ``bytes`` after a part the
    framing held (``LengthPrefixed.receive_rest``: the rest read straight in), in order."""
    completed: list[int] = []
    real = LengthPrefixed.receive_rest

    def receive_rest(self: LengthPrefixed, message: bytes) -> bytes:
        completed.append(len(message))
        return real(self, message)

    monkeypatch.setattr(LengthPrefixed, "receive_rest", receive_rest)
    return completed


def marked(size: int, mark: int) -> bytes:
    """``size`` bytes whose first and last differ from the rest, and from other marks'."""
    edge = bytes([mark])
    return edge + bytes([mark ^ 0xFF]) * (size - 2) + edge


def vm_rss() -> int:
    """This process's resident memory, in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")
