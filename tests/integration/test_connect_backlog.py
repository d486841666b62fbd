"""``connect(timeout=...)`` to a server whose backlog is full waits for room, as a blocking
connect does, up to the timeout: a burst of clients, or a server at max_clients, makes
clients wait; it does not refuse them."""

from __future__ import annotations

import errno
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import udskit
from udskit import Timeout, connecting
from udskit.address import Address

from ..conftest import READY_TIMEOUT

KINDS = {"stream": socket.SOCK_STREAM, "seqpacket": socket.SOCK_SEQPACKET}


@pytest.fixture
def full(sockdir: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Path, socket.socket]]:
    """A listener that accepts nobody, its backlog filled; yields its path and socket."""
    kind = KINDS[request.param]
    path = sockdir / "full.sock"
    listener = socket.socket(socket.AF_UNIX, kind)
    listener.bind(os.fspath(path))
    listener.listen(0)
    queued: list[socket.socket] = []
    try:
        for _ in range(16):  # a backlog of 0 holds one or two, whatever the kernel
            sock = socket.socket(socket.AF_UNIX, kind)
            queued.append(sock)
            sock.setblocking(False)
            try:
                sock.connect(os.fspath(path))
            except BlockingIOError:
                break
        else:
            pytest.fail("the backlog never filled")
        yield path, listener
    finally:
        for sock in queued:
            sock.close()
        listener.close()


def _waiting_in_connect(native_id: int) -> bool:
    """Whether thread ``native_id`` sleeps in a Unix connect, waiting for room in the
    backlog (True too where the kernel hides where threads sleep)."""
    try:
        with open(f"/proc/self/task/{native_id}/wchan") as wchan:
            where = wchan.read()
    except OSError:
        return True
    return where in ("unix_wait_for_peer", "0", "")


@pytest.mark.parametrize("full", list(KINDS), indirect=True)
def test_a_connect_waits_for_room_in_the_backlog(
    full: tuple[Path, socket.socket], no_fd_leak: None
) -> None:
    path, listener = full
    kind = listener.type.name.removeprefix("SOCK_").lower()
    outcome: list[object] = []
    thread_id: list[int] = []

    def client() -> None:
        thread_id.append(threading.get_native_id())
        try:
            with udskit.connect(path, type=kind, timeout=READY_TIMEOUT) as channel:
                outcome.append(channel.peer)
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=client)
    thread.start()
    deadline = time.monotonic() + READY_TIMEOUT
    while not thread_id or not _waiting_in_connect(thread_id[0]):
        assert thread.is_alive(), f"the connect did not wait: {outcome}"
        assert time.monotonic() < deadline, "the client never reached connect()"
        time.sleep(0.001)  # polling /proc for the thread's state, bounded
    # Room in the backlog: the waiting client gets in (a connect is done once queued).
    conn, _ = listener.accept()
    conn.close()
    thread.join(READY_TIMEOUT)
    assert not thread.is_alive()
    [peer] = outcome
    assert isinstance(peer, udskit.PeerCred), peer


@pytest.mark.parametrize("full", list(KINDS), indirect=True)
def test_a_backlog_that_stays_full_is_a_timeout(
    full: tuple[Path, socket.socket], no_fd_leak: None
) -> None:
    path, listener = full
    kind = listener.type.name.removeprefix("SOCK_").lower()
    started = time.monotonic()
    with pytest.raises(Timeout, match=r"backlog stayed full for 0\.2 s"):
        udskit.connect(path, type=kind, timeout=0.2)
    assert time.monotonic() - started >= 0.2  # it waited, not refused at once


class _EndsEarly(socket.socket):
    """A socket whose first connect fails with EAGAIN at once, as the kernel's wait does
    when it ends a clock tick before the deadline (it counts SO_SNDTIMEO in jiffies)."""

    early = True

    def connect(self, address: object) -> None:
        if self.early:
            self.early = False
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        super().connect(address)  # type: ignore[arg-type]


@pytest.mark.parametrize("full", ["stream"], indirect=True)
def test_a_wait_the_kernel_ends_early_goes_on_to_the_deadline(
    full: tuple[Path, socket.socket], no_fd_leak: None
) -> None:
    path, _ = full
    started = time.monotonic()
    with _EndsEarly(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        with pytest.raises(Timeout, match=r"backlog stayed full for 0\.2 s"):
            connecting._connect_waiting(sock, os.fspath(path), 0.2, Address.parse(path))
    assert time.monotonic() - started >= 0.2


@pytest.mark.parametrize("full", ["stream"], indirect=True)
def test_timeout_zero_never_waits(full: tuple[Path, socket.socket], no_fd_leak: None) -> None:
    path, _ = full
    with pytest.raises(udskit.ConnectError, match="backlog is full"):
        udskit.connect(path, timeout=0)


@pytest.mark.parametrize("timeout", [None, READY_TIMEOUT])
@pytest.mark.parametrize("full", list(KINDS), indirect=True)
def test_a_signal_while_waiting_does_not_end_the_connect(
    full: tuple[Path, socket.socket], timeout: float | None, no_fd_leak: None
) -> None:
    """A signal whose handler returns interrupts the wait in connect(2); CPython then takes
    the connect for one in progress and polls the socket, which an unconnected Unix socket
    answers at once, with no error. The connect goes on waiting; it does not return a
    channel connected to nothing."""
    path, listener = full
    kind = listener.type.name.removeprefix("SOCK_").lower()
    main, main_ident = threading.get_native_id(), threading.get_ident()
    signalled: list[int] = []
    returned = threading.Event()
    steps: list[str] = []

    def until(condition: Callable[[], bool]) -> bool:
        deadline = time.monotonic() + READY_TIMEOUT
        while not condition():
            if returned.is_set() or time.monotonic() > deadline:
                return False
            time.sleep(0.001)  # polling /proc and the handler's record, bounded
        return True

    def helper() -> None:
        if not until(lambda: _waiting_in_connect(main)):
            return
        steps.append("waiting")
        signal.pthread_kill(main_ident, signal.SIGUSR1)
        if not until(lambda: bool(signalled)):
            return
        steps.append("signalled")
        if not until(lambda: _waiting_in_connect(main)):
            return
        steps.append("waiting again")
        conn, _ = listener.accept()  # room in the backlog
        conn.close()

    previous = signal.signal(signal.SIGUSR1, lambda signum, _frame: signalled.append(signum))
    thread = threading.Thread(target=helper)
    try:
        thread.start()
        try:
            with udskit.connect(path, type=kind, timeout=timeout) as channel:
                peer = channel.peer
        finally:
            returned.set()
            thread.join(READY_TIMEOUT)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert not thread.is_alive()
    assert steps == ["waiting", "signalled", "waiting again"], (steps, peer)
    assert peer is not None
    assert peer.pid == os.getpid(), peer
