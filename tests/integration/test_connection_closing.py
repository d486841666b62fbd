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
        self.watching: tuple[bool, bool] = (True, False)
        self.ends = 0

    def watch(self, conn: Connection, read: bool, write: bool) -> None:
        self.watching = (read, write)

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


def test_a_client_gone_entirely_while_its_worker_is_busy_is_let_go(
    pair: tuple[Connection, socket.socket, ScriptedDriver],
) -> None:
    conn, client, driver = pair
    buffer = memoryview(bytearray(4096))
    client.sendall(b"question")
    client.close()
    conn.on_readable(buffer)
    conn.on_readable(buffer)  # the end of the stream: no longer reading
    assert driver.watching == (False, False)
    assert not conn.closed
    # epoll reports EPOLLHUP whatever the connection watches: the loop calls again
    conn.on_readable(buffer)
    assert conn.closed
    assert driver.dropped_conns == [conn]


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
