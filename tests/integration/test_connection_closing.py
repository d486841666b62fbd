"""How a message server's :class:`udskit.Connection` ends, driven step by step as the loop
would drive it (a scripted driver, a real socketpair): a reply due after the client's
half-close still reaches it; a client gone entirely while a worker is busy is let go."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import udskit
from udskit.connection import Connection
from udskit.proto import make_framing


class ScriptedDriver:
    """The loop's side of a connection, with a worker that is still busy (``busy`` set as
    MessageServer's dispatch does with workers)."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.dropped_conns: list[Connection] = []
        self.watching: tuple[bool, bool, bool] = (True, False, False)
        self.ends = 0

    def watch(self, conn: Connection, read: bool, write: bool, hang_up: bool) -> None:
        self.watching = (read, write, hang_up)

    def in_loop(self) -> bool:
        return True

    def call_soon(self, callback: Callable[..., object], *args: Any) -> None:
        callback(*args)

    def dispatch(self, conn: Connection, message: bytes, fds: list[int]) -> None:
        self.messages.append(message)
        conn.busy = True  # a worker has it

    def ended(self, conn: Connection) -> None:
        self.ends += 1

    def dropped(self, conn: Connection) -> None:
        self.dropped_conns.append(conn)


@pytest.fixture
def pair() -> Iterator[tuple[Connection, socket.socket, ScriptedDriver]]:
    ours, client = socket.socketpair()
    ours.setblocking(False)
    client.settimeout(5)
    driver = ScriptedDriver()
    conn = Connection(
        ours,
        driver,
        id=1,
        kind="stream",
        framing=make_framing("raw"),
        peer=None,
        remote=None,
        max_fds=0,
        max_outbox=1 << 20,
        loop_thread=threading.get_ident(),
    )
    yield conn, client, driver
    conn.abort()
    client.close()


def test_a_reply_after_the_clients_half_close_is_delivered(
    pair: tuple[Connection, socket.socket, ScriptedDriver],
) -> None:
    conn, client, driver = pair
    buffer = memoryview(bytearray(4096))
    client.sendall(b"question")
    client.shutdown(socket.SHUT_WR)  # printf question | nc -U -N
    conn.on_readable(buffer)  # the message, to the (busy) worker
    conn.on_readable(buffer)  # the end of the stream
    assert driver.messages == [b"question"]
    assert driver.ends == 1
    assert not conn.closed  # the worker has yet to answer
    conn.send(b"answer")  # the worker's reply
    conn.busy = False
    conn.flush()  # as the server does when the worker hands the connection back
    assert client.recv(100) == b"answer"
    assert client.recv(100) == b""  # then closed
    assert conn.closed
    assert driver.dropped_conns == [conn]


def test_a_client_gone_while_its_worker_is_busy_neither_loses_messages_nor_spins(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client sends two messages and closes while the worker still handles the first:
    the second is handled too, and meanwhile the loop is not woken again and again by the
    hang-up (epoll reports it whatever the connection watches)."""
    path = sockdir / "gone.sock"
    wakes = [0]
    on_readable = Connection.on_readable

    def counted(conn: Connection, buffer: memoryview) -> None:
        if conn is accepted[0]:
            wakes[0] += 1
        on_readable(conn, buffer)

    monkeypatch.setattr(Connection, "on_readable", counted)
    release = threading.Event()
    handled: list[bytes] = []
    accepted: list[udskit.Connection] = []
    passes = threading.Semaphore(0)

    done = threading.Semaphore(0)

    def handler(conn: udskit.Connection, message: bytes) -> None:
        release.wait()
        handled.append(message)
        done.release()

    def probe_ended(conn: udskit.Connection) -> None:
        if conn is not accepted[0]:
            passes.release()  # a probe's end: read in a later pass of the loop than its accept

    server = udskit.MessageServer(
        path,
        handler,
        framing="lines",
        workers=1,
        on_connect=accepted.append,
        on_eof=probe_ended,
    )
    serving = threading.Thread(target=server.serve_forever)
    serving.start()

    def one_more_pass() -> None:
        with socket.socket(socket.AF_UNIX) as probe:
            probe.connect(os.fspath(path))
        assert passes.acquire(timeout=5)

    try:
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(os.fspath(path))
            client.sendall(b"first\nsecond\n")
        for _ in range(3):  # the client's messages, its end, its hang-up: all seen by now
            one_more_pass()
        before = wakes[0]
        for _ in range(5):
            one_more_pass()
        assert wakes[0] == before  # no wake-up per pass for the client that is gone
        release.set()
        for _ in range(2):  # both handled before stop(), which would close the client
            assert done.acquire(timeout=5)
    finally:
        release.set()
        server.stop()
        serving.join()
    assert handled == [b"first", b"second"]


def test_on_eof_may_answer_after_the_clients_half_close(sockdir: Path) -> None:
    """A server that answers once the client has said everything: the sum of what came."""
    path = sockdir / "sum.sock"

    def add(conn: udskit.Connection, message: bytes) -> None:
        conn.state["total"] = conn.state.get("total", 0) + int(message)

    def total(conn: udskit.Connection) -> None:
        conn.send(b"%d" % conn.state.get("total", 0))

    server = udskit.MessageServer(path, add, framing="lines", on_eof=total)
    serving = threading.Thread(target=server.serve_forever)
    serving.start()
    try:
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(5)
            client.connect(os.fspath(path))
            client.sendall(b"1\n2\n39\n")
            client.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := client.recv(100):
                got += chunk
        assert got == b"42\n"
    finally:
        server.stop()
        serving.join()
