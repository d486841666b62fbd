"""``connect(timeout=...)`` to a server whose backlog is full waits for room, as a blocking
connect does, up to the timeout: a burst of clients, or a server at max_clients, makes
clients wait; it does not refuse them."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import udskit
from udskit import Timeout

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


@pytest.mark.parametrize("full", ["stream"], indirect=True)
def test_timeout_zero_never_waits(full: tuple[Path, socket.socket], no_fd_leak: None) -> None:
    path, _ = full
    with pytest.raises(udskit.ConnectError, match="backlog is full"):
        udskit.connect(path, timeout=0)
