"""MessageServer over real sockets: round trips, pipelining, descriptors, credentials, policy,
hooks, and the faults a many-client server meets (clients that never read, stall, lie about
sizes, vanish by the thousand; handlers that raise or block; descriptors running out;
signals). Stream and seqpacket, and datagrams where it applies; inline and with a pool.

No sleeps synchronise anything: events, bounded polling loops with deadlines, /proc.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import udskit
from udskit import Connection, ConnectionClosed, MessageServer, Policy

from ..conftest import open_fds
from .children import NOBODY, needs_root, run_in_child

#: Upper bound of every wait in this file: generous, since CI machines stall.
PATIENCE = 20.0

KINDS = ["stream", "seqpacket", "dgram"]
CONNECTED = ["stream", "seqpacket"]
WORKERS = [0, 2]

SOCK_TYPES = {
    "stream": socket.SOCK_STREAM,
    "seqpacket": socket.SOCK_SEQPACKET,
    "dgram": socket.SOCK_DGRAM,
}


class Running:
    """A MessageServer serving in a thread; leaving stops it (bounded) and re-raises what
    serve_forever raised."""

    def __init__(self, path: Path, handler: Callable[..., Any], **options: Any) -> None:
        self.path = path
        self.kind: str = options.get("type", "stream")
        self.server = MessageServer(path, handler, **options)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        try:
            self.server.serve_forever()
        except BaseException as exc:  # re-raised in the test's thread
            self.error = exc

    def client(self, **options: Any) -> udskit.Channel:
        return udskit.connect(self.path, type=self.kind, timeout=PATIENCE, **options)

    def __enter__(self) -> Running:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.stop()
        self.thread.join(PATIENCE)
        assert not self.thread.is_alive(), "the server did not stop"
        self.server.close()
        if self.error is not None:
            raise self.error


def wait_until(predicate: Callable[[], object], what: str, timeout: float = PATIENCE) -> None:
    """Poll ``predicate`` until true; fail after ``timeout`` (a bounded loop, not a sleep)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


def echo(conn: Connection, message: bytes) -> bytes:
    return message


def round_trip(channel: udskit.Channel, data: bytes) -> bytes:
    channel.send(data)
    return channel.recv()


@pytest.fixture
def path(sockdir: Path) -> Path:
    return sockdir / "ms.sock"


@pytest.fixture
def fd_check() -> Iterator[None]:
    """The server runs in this process: every descriptor it opened must be closed after."""
    before = open_fds()
    yield
    leaked = {fd for fd in open_fds() - before if os.path.exists(f"/proc/self/fd/{fd}")}
    assert not leaked, f"descriptors leaked: {sorted(leaked)}"


# -- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("kind", KINDS)
def test_echo_round_trips(path: Path, kind: str, workers: int, fd_check: None) -> None:
    with Running(path, echo, type=kind, workers=workers) as running, running.client() as client:
        for size in (1, 100, 4096, 60_000):
            data = os.urandom(size)
            assert round_trip(client, data) == data
        if kind == "stream":
            assert round_trip(client, b"") == b""


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("framing", ["length", "lines"])
def test_stream_framings_round_trip(path: Path, framing: str, workers: int) -> None:
    with (
        Running(path, echo, framing=framing, workers=workers) as running,
        running.client(framing=framing) as client,
    ):
        for line in (b"one", b"two words", b"x" * 5000):
            assert round_trip(client, line) == line


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("kind", KINDS)
def test_pipelined_messages_come_back_whole_and_in_order(
    path: Path, kind: str, workers: int
) -> None:
    count = 300 if kind == "dgram" else 2000
    sent = [b"%05d:" % i + b"x" * (i % 300) for i in range(count)]
    with Running(path, echo, type=kind, workers=workers) as running, running.client() as client:
        # From a helper thread: the replies fill the client's buffer while it still sends.
        sender = threading.Thread(target=client.send_many, args=(sent,), daemon=True)
        sender.start()
        received = [client.recv() for _ in sent]
        sender.join(PATIENCE)
        assert not sender.is_alive()
    if kind == "dgram" and workers:
        # Every datagram is a client of its own: the pool may answer them in any order.
        assert sorted(received) == sent
    else:
        assert received == sent


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("kind", KINDS)
def test_replies_by_return_and_by_conn_send_keep_their_order(
    path: Path, kind: str, workers: int
) -> None:
    def handler(conn: Connection, message: bytes) -> bytes:
        conn.send(message + b"-1")
        conn.send(bytearray(message + b"-2"))
        conn.send(memoryview(message + b"-3"))
        return message + b"-4"

    with (
        Running(path, handler, type=kind, workers=workers) as running,
        running.client() as client,
    ):
        for word in (b"a", b"b"):
            client.send(word)
            assert [client.recv() for _ in range(4)] == [word + b"-%d" % n for n in range(1, 5)]


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("kind", CONNECTED)
def test_a_large_reply_between_small_ones(path: Path, kind: str, workers: int) -> None:
    big = os.urandom(200_000 if kind == "stream" else 100_000)

    def handler(conn: Connection, message: bytes) -> None:
        conn.send(b"before")
        conn.send(big)
        conn.send(b"after")

    with (
        Running(path, handler, type=kind, workers=workers) as running,
        running.client() as client,
    ):
        client.send(b"go")
        assert [client.recv() for _ in range(3)] == [b"before", big, b"after"]


# -- descriptors ----------------------------------------------------------------------------


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("kind", KINDS)
def test_descriptors_reach_the_handler_and_are_closed_after_it(
    path: Path, kind: str, workers: int, fd_check: None
) -> None:
    def handler(conn: Connection, message: bytes) -> bytes:
        for fd in conn.fds:
            os.write(fd, message)
        return b"%d" % len(conn.fds)

    with Running(path, handler, type=kind, workers=workers) as running:
        pipes = [os.pipe() for _ in range(3)]
        try:
            with running.client() as client:
                client.send_fds(b"hi", [w for _, w in pipes])
                assert client.recv() == b"3"
                assert round_trip(client, b"none") == b"0"
            for r, _ in pipes:
                assert os.read(r, 10) == b"hi"
        finally:
            for r, w in pipes:
                os.close(r)
                os.close(w)
    # fd_check: the server closed its copies once the handler returned.


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("kind", KINDS)
def test_take_fds_keeps_descriptors_open(path: Path, kind: str, workers: int) -> None:
    taken: list[int] = []

    def handler(conn: Connection, message: bytes) -> bytes:
        taken.extend(conn.take_fds())
        assert conn.fds == ()
        return b"taken"

    with Running(path, handler, type=kind, workers=workers) as running:
        r, w = os.pipe()
        try:
            with running.client() as client:
                client.send_fds(b"take", [w])
                assert client.recv() == b"taken"
            assert len(taken) == 1
            os.write(taken[0], b"still open")
            assert os.read(r, 20) == b"still open"
        finally:
            for fd in (r, w, *taken):
                os.close(fd)


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("kind", KINDS)
def test_handler_replies_with_descriptors(
    path: Path, kind: str, workers: int, fd_check: None
) -> None:
    def handler(conn: Connection, message: bytes) -> None:
        r, w = os.pipe()
        try:
            os.write(w, message)
            conn.send(b"plain")
            conn.send_fds(b"with", [r])
            conn.send(b"plain again")
        finally:
            os.close(r)  # send_fds duplicated it
            os.close(w)

    with (
        Running(path, handler, type=kind, workers=workers) as running,
        running.client() as client,
    ):
        client.send(b"payload")
        replies = [client.recv_fds() for _ in range(3)]
        assert [data for data, _ in replies] == [b"plain", b"with", b"plain again"]
        assert [len(fds) for _, fds in replies] == [0, 1, 0]
        (fd,) = replies[1][1]
        try:
            assert os.read(fd, 20) == b"payload"
        finally:
            os.close(fd)


# -- who is there ---------------------------------------------------------------------------


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("kind", KINDS)
def test_peer_credentials(path: Path, kind: str, workers: int) -> None:
    seen: list[Connection] = []

    def handler(conn: Connection, message: bytes) -> bytes:
        seen.append(conn)
        assert conn.peer is not None
        assert conn.type == kind
        return b"%d %d %d" % (conn.peer.pid, conn.peer.uid, conn.peer.gid)

    with (
        Running(path, handler, type=kind, workers=workers) as running,
        running.client() as client,
    ):
        assert round_trip(client, b"who") == b"%d %d %d" % (os.getpid(), os.getuid(), os.getgid())
        if kind == "dgram":
            remote = seen[0].remote
            assert remote is not None, "a datagram is answered at its sender's address"
            assert remote.raw == os.fsencode(client.socket.getsockname())
        else:
            assert seen[0].remote is None, "the client did not bind"


@needs_root
@pytest.mark.parametrize("kind", KINDS)
def test_policy_refuses_a_client_and_the_server_goes_on(
    path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    peers: list[int] = []

    def handler(conn: Connection, message: bytes) -> bytes:
        assert conn.peer is not None
        peers.append(conn.peer.uid)
        return message

    def refused_client() -> str:
        with udskit.connect(path, type=kind, timeout=PATIENCE) as client:
            if kind == "dgram":
                client.send(b"let me in")
                return "sent"
            try:
                client.recv()
            except ConnectionClosed:
                return "end of stream"
            return "served"

    os.chmod(path.parent, 0o755)  # the other user must reach the socket file
    policy = Policy(uids={os.getuid()})
    with Running(path, handler, type=kind, allow=policy, mode=0o666) as running:
        assert run_in_child(refused_client, as_user=NOBODY) == (
            "sent" if kind == "dgram" else "end of stream"
        )
        with running.client() as client:
            assert round_trip(client, b"me") == b"me"
    assert peers == [os.getuid()], "the refused client never reached the handler"
    assert any("refused" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("kind", CONNECTED)
def test_connect_and_close_hooks(path: Path, kind: str, workers: int) -> None:
    events: list[tuple[str, int]] = []
    closed = threading.Event()

    def on_connect(conn: Connection) -> None:
        conn.state["greeted"] = True
        events.append(("connect", conn.id))

    def on_close(conn: Connection) -> None:
        events.append(("close", conn.id))
        closed.set()

    def handler(conn: Connection, message: bytes) -> bytes:
        return b"greeted" if conn.state.get("greeted") else b"stranger"

    with Running(
        path, handler, type=kind, workers=workers, on_connect=on_connect, on_close=on_close
    ) as running:
        with running.client() as client:
            assert round_trip(client, b"hello") == b"greeted"
            assert running.server.active_clients == 1
        assert closed.wait(PATIENCE)
        wait_until(lambda: running.server.active_clients == 0, "the client to be dropped")
    assert [name for name, _ in events] == ["connect", "close"]
    assert events[0][1] == events[1][1]


@pytest.mark.parametrize("kind", CONNECTED)
def test_a_failing_hook_closes_only_its_client(
    path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[int] = []

    def on_connect(conn: Connection) -> None:
        calls.append(conn.id)
        if len(calls) == 1:
            raise RuntimeError("first client unwelcome")

    def on_close(conn: Connection) -> None:
        raise RuntimeError("on_close broke")

    with Running(path, echo, type=kind, on_connect=on_connect, on_close=on_close) as running:
        with running.client() as first:
            first.send(b"x")
            with pytest.raises(ConnectionClosed):
                first.recv()
        with running.client() as second:
            assert round_trip(second, b"ok") == b"ok"
    messages = [record.getMessage() for record in caplog.records]
    assert any("handler failed" in message for message in messages)
    assert any("on_close failed" in message for message in messages)
