"""Listener.disown(): the socket file and the socket itself outlive this process's copy,
for a listener that systemd's descriptor store (or another process) keeps open."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from pathlib import Path

import pytest

import udskit
import udskit.aio

#: How long a test waits for a thread to block or to end before failing.
PATIENCE = 20.0


def _still_served(path: Path, kind: str, kept: int) -> None:
    """The listening socket's other copy (descriptor ``kept``, closed here) still takes a
    client at ``path``."""
    types = {"stream": socket.SOCK_STREAM, "seqpacket": socket.SOCK_SEQPACKET}
    with (
        socket.socket(socket.AF_UNIX, types.get(kind, socket.SOCK_DGRAM)) as client,
        socket.socket(fileno=kept) as other,
    ):
        client.connect(os.fspath(path))
        client.send(b"still there")
        if kind == "dgram":
            assert other.recv(64) == b"still there"
        else:
            conn, _ = other.accept()
            with conn:
                assert conn.recv(64) == b"still there"


@pytest.mark.parametrize("kind", ["stream", "seqpacket", "dgram"])
def test_a_disowned_listener_leaves_file_and_socket(sockdir: Path, kind: str) -> None:
    path = sockdir / "kept.sock"
    listener = udskit.listen(path, type=kind)
    kept = os.dup(listener.fileno())  # the copy another process holds
    inode = os.stat(path).st_ino
    listener.disown()
    listener.close()
    try:
        assert os.stat(path).st_ino == inode  # the file stays
        # and the socket still works for the other copy: close() did not shut it down
        kept, other = -1, kept
        _still_served(path, kind, other)
    finally:
        if kept >= 0:
            os.close(kept)
    assert path.exists()  # nobody removes it: the next owner reclaims it as stale


def test_the_asyncio_listener_disowns_too(sockdir: Path) -> None:
    path = sockdir / "kept.sock"

    async def main() -> None:
        listener = await udskit.aio.listen(path)
        listener.disown()
        listener.close()

    asyncio.run(main())
    assert path.exists()
    with udskit.listen(path):  # stale now: reclaimed
        pass
    assert not path.exists()


def _wait_until_blocked(thread: threading.Thread) -> None:
    """Return once ``thread`` sleeps on a socket: in poll(), or in accept()/recv() itself
    (where the kernel waits for the next packet), as it says in wchan."""
    deadline = time.monotonic() + PATIENCE
    wchan = Path(f"/proc/self/task/{thread.native_id}/wchan")
    while not any(where in wchan.read_text() for where in ("poll", "skb_wait")):
        assert thread.is_alive(), "it returned instead of waiting"
        assert time.monotonic() < deadline, f"not waiting on the socket but in {wchan.read_text()}"
        time.sleep(0.001)


@pytest.mark.parametrize("kind", ["stream", "seqpacket", "dgram"])
@pytest.mark.parametrize("shared", ["fd", "handover", "disowned"])
@pytest.mark.usefixtures("no_fd_leak")
def test_close_wakes_a_thread_waiting_on_a_shared_socket(
    sockdir: Path, kind: str, shared: str
) -> None:
    """close() of a socket another process may hold skips shutdown(), which would stop it
    for that process too; a thread waiting in accept()/recv() must end all the same, with
    ConnectionClosed, and no client that comes later may reach a closed listener."""
    path = sockdir / "shared.sock"
    types = {"stream": socket.SOCK_STREAM, "seqpacket": socket.SOCK_SEQPACKET}
    kept = -1  # the copy another process holds
    if shared == "fd":
        raw = socket.socket(socket.AF_UNIX, types.get(kind, socket.SOCK_DGRAM))
        raw.bind(os.fspath(path))
        if kind != "dgram":
            raw.listen(8)
        kept = os.dup(raw.fileno())
        listener = udskit.listen(f"fd:{raw.detach()}", type=kind)
    else:
        listener = udskit.listen(path, type=kind, handover=shared == "handover")
        if shared == "disowned":
            kept = os.dup(listener.fileno())
            listener.disown()
    outcome: list[object] = []

    def wait() -> None:
        try:
            if isinstance(listener, udskit.DatagramListener):
                outcome.append(listener.recv())
            else:
                outcome.append(listener.accept())
        except udskit.ConnectionClosed as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    try:
        _wait_until_blocked(waiter)
        listener.close()
        waiter.join(PATIENCE)
        assert not waiter.is_alive(), "close() did not wake the thread waiting on the socket"
        assert len(outcome) == 1
        assert isinstance(outcome[0], udskit.ConnectionClosed), outcome
        if kept >= 0:  # the other process's copy still works: close() did not shut it down
            kept, other = -1, kept
            _still_served(path, kind, other)
    finally:
        listener.close()
        if kept >= 0:
            os.close(kept)
