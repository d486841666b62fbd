"""MessageServer over real sockets: round trips, pipelining, descriptors, credentials, policy,
hooks, and the faults a many-client server meets (clients that never read, stall, lie about
sizes, vanish by the thousand; handlers that raise or block; descriptors running out;
signals). Stream and seqpacket, and datagrams where it applies; inline and with a pool.

The regressions section holds one test for each fault found in the server while writing
these. No sleeps synchronise anything: events, bounded polling loops with deadlines, /proc.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import udskit
from udskit import Connection, ConnectionClosed, MessageServer, Policy
from udskit.channel import RECV_CHUNK
from udskit.messageserver import WORKER_BACKLOG
from udskit.proto import DEFAULT_MAX_LINE

from ..conftest import READY_TIMEOUT, cpu_used, open_fds, wait_connectable
from .children import NOBODY, needs_root, run_in_child

#: Upper bound of every wait in this file: generous, since CI machines stall.
PATIENCE = 20.0

KINDS = ["stream", "seqpacket", "dgram"]
CONNECTED = ["stream", "seqpacket"]
WORKERS = [0, 2]

#: Small buffers and outbox for the slow-client tests, so that a few hundred KiB fill them.
SMALL_OUTBOX = 64 * 1024
SMALL_BUFFER = 16 * 1024

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


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("kind", CONNECTED)
def test_descriptors_stay_with_their_replies_through_a_backed_up_outbox(
    path: Path, kind: str, workers: int, fd_check: None
) -> None:
    """Replies with and without descriptors, large and small, queued behind each other in
    the outbox and sent in pieces: every descriptor arrives with its own reply."""
    filler = b"f" * (30_000 if kind == "stream" else 8_000)

    def handler(conn: Connection, message: bytes) -> None:
        r, w = os.pipe()
        try:
            os.write(w, message)
            conn.send(filler)
            conn.send_fds(b"fd for " + message, [r])
            conn.send(b"plain " + message)
        finally:
            os.close(r)
            os.close(w)

    sent = [b"%03d" % number for number in range(60)]
    with (
        Running(path, handler, type=kind, workers=workers, sndbuf=SMALL_BUFFER) as running,
        running.client() as client,
    ):
        client.send_many(sent)  # all at once: the replies back up behind a client not reading
        for message in sent:
            assert client.recv_fds() == (filler, [])
            data, fds = client.recv_fds()
            assert data == b"fd for " + message
            assert len(fds) == 1
            try:
                assert os.read(fds[0], 10) == message
            finally:
                os.close(fds[0])
            assert client.recv_fds() == (b"plain " + message, [])


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("kind", KINDS)
def test_pipelined_messages_with_descriptors_each_get_their_own(
    path: Path, kind: str, workers: int, fd_check: None
) -> None:
    def handler(conn: Connection, message: bytes) -> bytes:
        assert len(conn.fds) == 1, f"{message!r} came with {len(conn.fds)} descriptors"
        os.write(conn.fds[0], message)
        return message

    pipes = [os.pipe() for _ in range(40)]
    try:
        with (
            Running(path, handler, type=kind, workers=workers) as running,
            running.client() as client,
        ):
            # All sent before any reply is read: small enough that the replies fit the
            # server's send buffer (a datagram reply waits for room at most 1 s).
            for number, (_, w) in enumerate(pipes):
                client.send_fds(b"%02d" % number + b"." * number * 20, [w])
            replies = [client.recv() for _ in pipes]
        expected = [b"%02d" % number + b"." * number * 20 for number in range(len(pipes))]
        # A pool answers datagrams (each a client of its own) in any order.
        assert (sorted(replies) if kind == "dgram" and workers else replies) == expected
        for (r, _), message in zip(pipes, expected, strict=True):
            assert os.read(r, 10_000) == message, "each descriptor came with its message"
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)


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


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("kind", CONNECTED)
def test_state_is_kept_per_connection(path: Path, kind: str, workers: int) -> None:
    def handler(conn: Connection, message: bytes) -> bytes:
        count = conn.state.get("count", 0) + 1
        conn.state["count"] = count
        return b"%s %d" % (message, count)

    with (
        Running(path, handler, type=kind, workers=workers) as running,
        running.client() as a,
        running.client() as b,
    ):
        assert round_trip(a, b"a") == b"a 1"
        assert round_trip(a, b"a") == b"a 2"
        assert round_trip(b, b"b") == b"b 1"
        assert round_trip(a, b"a") == b"a 3"


@pytest.mark.parametrize("kind", CONNECTED)
def test_remote_is_the_clients_bound_address(path: Path, kind: str) -> None:
    seen: list[Connection] = []

    def handler(conn: Connection, message: bytes) -> bytes:
        seen.append(conn)
        return repr(conn).encode()

    with (
        Running(path, handler, type=kind) as running,
        running.client(bind=path.parent / "client.sock") as client,
    ):
        description = round_trip(client, b"who am I").decode()
    remote = seen[0].remote
    assert remote is not None
    assert remote.raw == os.fsencode(path.parent / "client.sock")
    assert description.startswith(f"<udskit.Connection {seen[0].id} {kind} pid {os.getpid()}")


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
        with running.client() as first, pytest.raises(ConnectionClosed):
            first.recv()
        with running.client() as second:
            assert round_trip(second, b"ok") == b"ok"
    messages = [record.getMessage() for record in caplog.records]
    assert any("handler failed" in message for message in messages)
    assert any("on_close failed" in message for message in messages)


# -- clients that misbehave -------------------------------------------------------------------


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("kind", CONNECTED)
def test_a_client_that_never_reads_pauses_alone(path: Path, kind: str, workers: int) -> None:
    conns: dict[int, Connection] = {}
    handled: dict[int, int] = {}

    def on_connect(conn: Connection) -> None:
        conns[conn.id] = conn
        handled[conn.id] = 0

    def handler(conn: Connection, message: bytes) -> bytes:
        handled[conn.id] += 1
        return message  # as much out as in: the outbox grows as fast as it is read

    request = b"r" * 1000
    with Running(
        path,
        handler,
        type=kind,
        workers=workers,
        max_outbox=SMALL_OUTBOX,
        sndbuf=SMALL_BUFFER,
        rcvbuf=SMALL_BUFFER,
        on_connect=on_connect,
    ) as running:
        with socket.socket(socket.AF_UNIX, SOCK_TYPES[kind]) as greedy:
            greedy.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
            greedy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
            greedy.connect(os.fspath(path))
            greedy.setblocking(False)
            wait_until(lambda: len(conns) == 1, "the greedy client to be accepted")
            (greedy_id,) = conns
            slow = conns[greedy_id]
            frame = request if kind == "seqpacket" else struct.pack(">I", len(request)) + request
            # Requests, never reading a reply, until the server stops reading them.
            _send_until(greedy, frame, lambda: slow.outbox_size > SMALL_OUTBOX, "a full outbox")
            with running.client() as polite:
                # The server turns to the polite client while the greedy one waits...
                assert round_trip(polite, b"me too") == b"me too"
                stalled_at = handled[greedy_id]
                for number in range(20):
                    assert round_trip(polite, b"%d" % number) == b"%d" % number
                # ... and reads nothing more from the greedy one meanwhile.
                assert handled[greedy_id] == stalled_at
            # At most the limit plus the replies to one read: a stream read takes at most
            # what the client's (doubled) SO_SNDBUF let into the socket; a packet batch, 64.
            sndbuf = greedy.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            per_read = 64 * len(frame) if kind == "seqpacket" else sndbuf
            assert SMALL_OUTBOX < slow.outbox_size <= SMALL_OUTBOX + per_read + len(frame)
        wait_until(lambda: running.server.active_clients == 0, "the greedy client to be dropped")


def _send_until(sock: socket.socket, frame: bytes, done: Callable[[], bool], what: str) -> None:
    """Send copies of ``frame`` on non-blocking ``sock`` until ``done()`` (bounded)."""
    data = frame * 64  # a whole number of frames: sending round it continues the stream
    offset = 0
    deadline = time.monotonic() + PATIENCE
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        try:
            chunk = frame if sock.type == socket.SOCK_SEQPACKET else memoryview(data)[offset:]
            offset = (offset + sock.send(chunk)) % len(data)
        except BlockingIOError:
            select.select([], [sock], [], 0.01)  # room, or another look at done()


@pytest.mark.parametrize("workers", WORKERS)
def test_a_half_sent_frame_stalls_only_its_client(path: Path, workers: int) -> None:
    with (
        Running(path, echo, workers=workers) as running,
        running.client() as other,
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stalled,
    ):
        stalled.settimeout(PATIENCE)
        stalled.connect(os.fspath(path))
        message = b"the whole message"
        frame = struct.pack(">I", len(message)) + message
        stalled.sendall(frame[:2])  # half a header
        assert round_trip(other, b"served") == b"served"
        stalled.sendall(frame[2:9])  # the header and a little
        assert round_trip(other, b"still") == b"still"
        stalled.sendall(frame[9:])
        assert _recv_exactly(stalled, len(frame)) == frame, "nothing was lost meanwhile"


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.parametrize("workers", WORKERS)
def test_a_header_over_max_frame_closes_that_client(
    path: Path, workers: int, caplog: pytest.LogCaptureFixture
) -> None:
    with Running(path, echo, workers=workers, max_frame=1024) as running:
        with running.client() as other, socket.socket(socket.AF_UNIX) as liar:
            liar.settimeout(PATIENCE)
            liar.connect(os.fspath(path))
            liar.sendall(struct.pack(">I", 1 << 30))
            assert liar.recv(16) == b"", "the liar reads the end of the stream"
            assert round_trip(other, b"fine") == b"fine"
        wait_until(lambda: running.server.active_clients == 0, "both clients to be dropped")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("closing the connection" in message for message in warnings), warnings


@pytest.mark.parametrize("workers", WORKERS)
def test_the_messages_before_a_bad_frame_are_answered_then_the_client_is_closed(
    path: Path, workers: int
) -> None:
    """A client sends a message and then a header over max_frame, in one write: the
    message was whole, and its reply goes out before the connection closes."""
    with Running(path, echo, workers=workers, max_frame=1024) as running:
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(PATIENCE)
            client.connect(os.fspath(path))
            client.sendall(struct.pack(">I", 5) + b"hello" + struct.pack(">I", 1 << 30))
            reply = struct.pack(">I", 5) + b"hello"
            assert _recv_exactly(client, len(reply) + 1) == reply, "the reply, then the end"
        wait_until(lambda: running.server.active_clients == 0, "the client to be dropped")


def test_a_lines_server_takes_the_lines_a_lines_channel_does_by_default(path: Path) -> None:
    """With 'lines' framing and no max_frame, a server bounds a line as a Channel does
    (DEFAULT_MAX_LINE), not by the 16 MiB of a length-prefixed frame."""
    with Running(path, echo, framing="lines"):
        with udskit.connect(path, framing="lines", timeout=PATIENCE) as client:
            client.send(b"x" * DEFAULT_MAX_LINE)
            assert client.recv() == b"x" * DEFAULT_MAX_LINE
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(PATIENCE)
            client.connect(os.fspath(path))
            client.sendall(b"x" * (DEFAULT_MAX_LINE + 1) + b"\n")
            assert _recv_exactly(client, 1) == b"", "a longer line ends the connection"


@pytest.mark.parametrize("kind", ["seqpacket", "dgram"])
def test_a_packet_over_max_frame_is_reported(
    path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        Running(path, echo, type=kind, max_frame=1024) as running,
        running.client() as big,
        running.client() as other,
    ):
        big.send(b"x" * 4096)
        if kind == "seqpacket":
            with pytest.raises(ConnectionClosed):
                big.recv()
        assert round_trip(other, b"fine") == b"fine"
        if kind == "dgram":  # no connection to close: that datagram alone is dropped
            assert round_trip(big, b"small") == b"small"
    assert any("truncated" in record.getMessage() for record in caplog.records)


# -- handlers that misbehave ------------------------------------------------------------------


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("kind", KINDS)
def test_a_handler_that_raises_closes_only_its_client(
    path: Path, kind: str, workers: int, caplog: pytest.LogCaptureFixture
) -> None:
    def handler(conn: Connection, message: bytes) -> bytes:
        if message == b"boom":
            raise RuntimeError("the handler broke")
        return message

    with (
        Running(path, handler, type=kind, workers=workers) as running,
        running.client() as victim,
        running.client() as other,
    ):
        victim.send(b"boom")
        if kind == "dgram":  # no connection: the datagram goes unanswered
            assert round_trip(victim, b"next") == b"next"
        else:
            with pytest.raises(ConnectionClosed):
                victim.recv()
        assert round_trip(other, b"fine") == b"fine"
    failures = [r for r in caplog.records if "handler failed" in r.getMessage()]
    assert len(failures) == 1
    assert failures[0].exc_info is not None
    assert "the handler broke" in str(failures[0].exc_info[1])


@pytest.mark.parametrize("kind", CONNECTED)
def test_a_blocked_handler_holds_one_worker_only(path: Path, kind: str) -> None:
    release = threading.Event()
    blocked = threading.Event()

    def handler(conn: Connection, message: bytes) -> bytes:
        if message == b"block":
            blocked.set()
            release.wait(PATIENCE)
        return message

    with Running(path, handler, type=kind, workers=2) as running:
        try:
            with running.client() as stuck, running.client() as a, running.client() as b:
                stuck.send(b"block")
                assert blocked.wait(PATIENCE)
                for number in range(20):
                    assert round_trip(a, b"a%d" % number) == b"a%d" % number
                    assert round_trip(b, b"b%d" % number) == b"b%d" % number
                release.set()
                assert stuck.recv() == b"block"
        finally:
            release.set()


#: Datagram senders in the lane test: the chance that all of them share the blocked
#: lane of two is 2**-16.
LANE_SENDERS = 16


def test_a_blocked_handler_holds_one_datagram_lane_only(path: Path) -> None:
    """Datagram senders go to the workers' lanes by their address: while one handler
    blocks, the senders of the other lane are answered, by the other worker, and those of
    the blocked lane once it is free."""
    release = threading.Event()
    blocked: list[str] = []  # the worker that blocks
    workers: dict[bytes, str] = {}  # message -> the worker that answered it
    lock = threading.Lock()

    def handler(conn: Connection, message: bytes) -> bytes:
        with lock:
            if message == b"block":
                blocked.append(threading.current_thread().name)
            else:
                workers[message] = threading.current_thread().name
        if message == b"block":
            release.wait(PATIENCE)
        return message

    with Running(path, handler, type="dgram", workers=2) as running:
        try:
            with contextlib.ExitStack() as stack:
                stuck = stack.enter_context(running.client())
                senders = [stack.enter_context(running.client()) for _ in range(LANE_SENDERS)]
                stuck.send(b"block")
                wait_until(lambda: blocked, "the handler to block")
                for number, sender in enumerate(senders):
                    sender.send(b"%d" % number)
                readable = select.poll()
                for sender in senders:
                    readable.register(sender.fileno(), select.POLLIN)
                first = readable.poll(int(PATIENCE * 1000))
                assert first, "no sender of the free lane was answered"
                fd = first[0][0]
                (early,) = [n for n, sender in enumerate(senders) if sender.fileno() == fd]
                assert senders[early].recv() == b"%d" % early
                with lock:
                    assert workers[b"%d" % early] != blocked[0]
                release.set()
                assert stuck.recv() == b"block"
                for number, sender in enumerate(senders):
                    if number != early:
                        assert sender.recv() == b"%d" % number
        finally:
            release.set()


def test_a_datagram_reply_finished_within_the_stop_grace_goes_out(
    path: Path, fd_check: None
) -> None:
    """stop() removes the socket file at once, but a worker's handler that was running
    still gets its reply out through the socket; the socket was closed first and the
    reply was dropped, leaving its sender waiting."""
    handling, release = threading.Event(), threading.Event()

    def handler(conn: Connection, message: bytes) -> bytes:
        handling.set()
        release.wait(PATIENCE)
        return b"late " + message

    with Running(path, handler, type="dgram", workers=1) as running, running.client() as client:
        try:
            client.send(b"question")
            assert handling.wait(PATIENCE), "the handler never ran"
            running.server.stop()
            wait_until(lambda: not path.exists(), "stop() to remove the socket file")
            release.set()
            assert client.recv() == b"late question"
        finally:
            release.set()
    assert running.server.listener.closed


@pytest.mark.parametrize("kind", CONNECTED)
def test_a_pool_stops_reading_a_client_it_cannot_keep_up_with(path: Path, kind: str) -> None:
    """Messages queued for a busy worker are bounded per client (WORKER_BACKLOG, plus what
    one read brought); the rest wait in the kernel, and all are answered in order."""
    release = threading.Event()
    started = threading.Event()

    def handler(conn: Connection, message: bytes) -> bytes:
        if message != b"hello":
            started.set()
            release.wait(PATIENCE)
        return message

    sent = [b"%06d" % number for number in range(3000)]
    with Running(path, handler, type=kind, workers=2) as running:
        server = running.server
        try:
            with running.client() as client:
                sender = threading.Thread(target=client.send_many, args=(sent,), daemon=True)
                sender.start()
                assert started.wait(PATIENCE)
                # Reading stops at WORKER_BACKLOG queued; the worker may have taken one since.
                wait_until(
                    lambda: sum(map(len, server._inboxes.values())) >= WORKER_BACKLOG - 1,
                    "the worker's queue to fill",
                )
                queued = sum(map(len, server._inboxes.values()))
                per_read = 64 if kind == "seqpacket" else RECV_CHUNK // (4 + len(sent[0]))
                assert queued <= WORKER_BACKLOG + per_read
                with running.client() as other:  # the other worker serves others meanwhile
                    assert round_trip(other, b"hello") == b"hello"
                release.set()
                assert [client.recv() for _ in sent] == sent
                sender.join(PATIENCE)
                assert not sender.is_alive()
        finally:
            release.set()


@pytest.mark.parametrize(
    "reply", [42, "text", ["a list"], 3.5], ids=["int", "str", "list", "float"]
)
@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("kind", KINDS)
def test_a_handler_returning_a_non_bytes_value_closes_its_client(
    path: Path, kind: str, workers: int, reply: object, caplog: pytest.LogCaptureFixture
) -> None:
    def handler(conn: Connection, message: bytes) -> object:
        return reply if message == b"bad" else message

    with (
        Running(path, handler, type=kind, workers=workers) as running,
        running.client() as victim,
        running.client() as other,
    ):
        victim.send(b"bad")
        if kind == "dgram":
            assert round_trip(victim, b"next") == b"next", "nothing was sent for it"
        else:
            with pytest.raises(ConnectionClosed):
                victim.recv()
        assert round_trip(other, b"fine") == b"fine"
    failures = [r for r in caplog.records if "handler failed" in r.getMessage()]
    assert len(failures) == 1
    assert failures[0].exc_info is not None
    assert isinstance(failures[0].exc_info[1], TypeError)


# -- limits and arguments ---------------------------------------------------------------------


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("kind", CONNECTED)
def test_max_clients_leaves_the_third_in_the_backlog(path: Path, kind: str, workers: int) -> None:
    accepted: list[int] = []
    with Running(
        path,
        echo,
        type=kind,
        workers=workers,
        max_clients=2,
        on_connect=lambda conn: accepted.append(conn.id),
    ) as running:
        first, second = running.client(), running.client()
        try:
            assert round_trip(first, b"1") == b"1"
            assert round_trip(second, b"2") == b"2"
            with running.client() as third:  # connect() succeeds: the kernel queues it
                third.send(b"3")
                for _ in range(5):  # the loop goes round; the third stays queued
                    assert round_trip(first, b"1") == b"1"
                assert len(accepted) == 2
                assert running.server.active_clients == 2
                second.close()
                assert third.recv() == b"3", "served once a slot freed"
                assert len(accepted) == 3
        finally:
            first.close()
            second.close()


@pytest.mark.parametrize(
    ("options", "error", "words"),
    [
        ({"handler": "not a function"}, TypeError, "handler must be a function"),
        ({"workers": -1}, ValueError, "workers must be from 0"),
        ({"workers": True}, TypeError, "workers must be a number"),
        ({"workers": "2"}, TypeError, "workers must be a number"),
        ({"workers": 2.0}, TypeError, "workers must be a number"),
        ({"workers": 100_000}, ValueError, "workers must be from 0"),
        ({"max_outbox": 0}, ValueError, "max_outbox must be a positive"),
        ({"max_outbox": -5}, ValueError, "max_outbox must be a positive"),
        ({"max_outbox": "big"}, ValueError, "max_outbox must be a positive"),
        ({"on_connect": 3}, TypeError, "on_connect must be a function"),
        ({"on_close": "x"}, TypeError, "on_close must be a function"),
        ({"max_clients": 0}, ValueError, "max_clients must be a positive"),
        ({"max_clients": -1}, ValueError, "max_clients must be a positive"),
    ],
    ids=lambda value: repr(value) if isinstance(value, dict) else None,
)
def test_bad_arguments_are_refused_clearly(
    path: Path, options: dict[str, Any], error: type[Exception], words: str
) -> None:
    arguments: dict[str, Any] = {"handler": echo, **options}
    handler = arguments.pop("handler")
    with pytest.raises(error, match=words) as caught:
        MessageServer(path, handler, **arguments)
    assert "\n" not in str(caught.value), "one line"
    assert not path.exists(), "nothing was claimed"


# -- datagrams --------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", WORKERS)
def test_datagram_replies_reach_each_sender(path: Path, workers: int) -> None:
    def handler(conn: Connection, message: bytes) -> bytes:
        return b"to " + message

    with Running(path, handler, type="dgram", workers=workers) as running:
        clients = [running.client() for _ in range(5)]
        try:
            for number, client in enumerate(clients):
                client.send(b"%d" % number)
            for number, client in enumerate(clients):
                assert client.recv() == b"to %d" % number
        finally:
            for client in clients:
                client.close()


@pytest.mark.parametrize("workers", WORKERS)
def test_an_unbound_datagram_sender_is_handled_but_cannot_be_answered(
    path: Path, workers: int, caplog: pytest.LogCaptureFixture
) -> None:
    handled = threading.Event()
    errors: list[BaseException] = []

    def handler(conn: Connection, message: bytes) -> bytes | None:
        if message == b"anonymous":
            assert conn.remote is None
            assert conn.peer is not None
            assert conn.peer.pid == os.getpid()
            try:
                conn.send(b"reply")
            except ConnectionClosed as exc:
                errors.append(exc)
            handled.set()
            return b"and a returned reply"  # fails the same way: logged, nothing else
        return message

    with Running(path, handler, type="dgram", workers=workers) as running:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as unbound:
            unbound.sendto(b"anonymous", os.fspath(path))
        assert handled.wait(PATIENCE)
        with running.client() as client:  # the server goes on
            assert round_trip(client, b"named") == b"named"
    assert len(errors) == 1
    assert "no address" in str(errors[0])
    assert "\n" not in str(errors[0])
    assert any("no address" in record.getMessage() for record in caplog.records)


# -- threads ----------------------------------------------------------------------------------


@pytest.mark.parametrize("max_outbox", [udskit.connection.DEFAULT_MAX_OUTBOX, 4096])
@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("kind", CONNECTED)
def test_conn_send_from_another_thread_arrives_whole_and_in_order(
    path: Path, kind: str, workers: int, max_outbox: int
) -> None:
    count = 200
    streamers: list[threading.Thread] = []
    failures: list[BaseException] = []

    def stream(conn: Connection) -> None:
        try:
            for number in range(count):
                conn.send(b"%03d:" % number + bytes([number]) * (number * 10))
        except BaseException as exc:
            failures.append(exc)

    def on_connect(conn: Connection) -> None:
        thread = threading.Thread(target=stream, args=(conn,), daemon=True)
        streamers.append(thread)
        thread.start()

    with (
        Running(
            path, echo, type=kind, workers=workers, max_outbox=max_outbox, on_connect=on_connect
        ) as running,
        running.client() as client,
    ):
        received = [client.recv() for _ in range(count)]
        # Before the client leaves: a send waiting for room when the connection closes
        # raises, even if its message went out.
        for thread in streamers:
            thread.join(PATIENCE)
            assert not thread.is_alive()
    assert not failures
    assert received == [b"%03d:" % n + bytes([n]) * (n * 10) for n in range(count)]


# -- crowds, descriptors running out, signals -----------------------------------------------

#: Clients that connect and vanish at once in the crowd test.
CROWD = 2000


@pytest.fixture
def many_fds() -> Iterator[None]:
    """Room for a crowd's descriptors (both ends live in this process): the soft limit is
    raised within the hard one, and restored after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * CROWD + 256
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip(f"needs {wanted} descriptors; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("kind", CONNECTED)
def test_a_crowd_that_connects_and_vanishes_at_once(
    path: Path, kind: str, workers: int, many_fds: None, fd_check: None
) -> None:
    closes = 0

    def on_close(conn: Connection) -> None:
        nonlocal closes
        closes += 1

    with Running(
        path, echo, type=kind, workers=workers, backlog=CROWD, on_close=on_close
    ) as running:
        crowd: list[socket.socket] = []
        try:
            for number in range(CROWD):
                sock = socket.socket(socket.AF_UNIX, SOCK_TYPES[kind])
                crowd.append(sock)
                sock.settimeout(PATIENCE)
                sock.connect(os.fspath(path))
                if number % 2:  # half of them leave a message they will never read
                    frame = b"bye" if kind == "seqpacket" else struct.pack(">I", 3) + b"bye"
                    sock.sendall(frame)
        finally:
            for sock in crowd:
                sock.close()
        wait_until(lambda: running.server.active_clients == 0, "the crowd to be dropped")
        with running.client() as survivor:
            assert round_trip(survivor, b"still here") == b"still here"
        wait_until(lambda: running.server.active_clients == 0, "the survivor to be dropped")
    assert closes == CROWD + 1, "every client accepted, every one dropped"
    # fd_check: nothing of the crowd is left open in this process.


#: A server program for the descriptor-exhaustion test: its descriptor limit leaves room for
#: a handful of clients; it logs to stderr.
EMFILE_SERVER = """
import logging, os, resource, sys
import udskit

logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(message)s")
server = udskit.MessageServer(sys.argv[1], lambda conn, message: message, backlog=64)
open_now = len(os.listdir("/proc/self/fd"))
# The hard limit too: below it, the server would raise its soft limit, and go on.
limit = open_now + int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
print("ready", flush=True)
server.serve_forever()
"""

#: Clients the exhausted server can hold (its limit leaves this many descriptors free).
ROOM = 5

#: How long the exhausted server is watched, and the CPU it may use meanwhile: backing
#: off, it wakes a handful of times; spinning, it would use the whole window.
CPU_WINDOW = 1.0
CPU_ALLOWED = 0.2


def _read_line(stream: Any, timeout: float = READY_TIMEOUT) -> str:
    ready, _, _ = select.select([stream], [], [], timeout)
    if not ready:
        raise AssertionError(f"no output from the child within {timeout} s")
    line: str = stream.readline()
    return line


def test_out_of_descriptors_backs_off_without_spinning(path: Path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    with subprocess.Popen(
        [sys.executable, "-c", EMFILE_SERVER, os.fspath(path), str(ROOM)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as proc:
        clients: list[udskit.Channel] = []
        try:
            assert _read_line(proc.stdout) == "ready\n"
            # More clients than the server can hold: the rest wait in its backlog.
            clients.extend(udskit.connect(path, timeout=PATIENCE) for _ in range(ROOM + 10))
            assert round_trip(clients[0], b"first") == b"first"
            line = _read_line(proc.stderr)
            assert "accept failed" in line
            assert "retrying, first in" in line
            used = cpu_used(proc.pid, CPU_WINDOW)
            assert used < CPU_ALLOWED, f"the server used {used:.2f} s of CPU in {CPU_WINDOW} s"
            # Descriptors come back as clients leave: the waiting ones are served in turn.
            for client in clients[:ROOM]:
                client.close()
            for number, client in enumerate(clients[ROOM:]):
                assert round_trip(client, b"%d" % number) == b"%d" % number
                client.close()
        finally:
            for client in clients:
                client.close()
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=READY_TIMEOUT)


#: A server program for the signal test: serve_messages with an echo handler.
SIGNAL_SERVER = """
import sys
import udskit

udskit.serve_messages(
    sys.argv[1], lambda conn, message: message, type=sys.argv[2], workers=int(sys.argv[3])
)
print("serve_messages returned", flush=True)
"""


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("kind", KINDS)
def test_sigterm_under_load_stops_serve_messages_cleanly(
    path: Path, kind: str, workers: int
) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    with subprocess.Popen(
        [sys.executable, "-c", SIGNAL_SERVER, os.fspath(path), kind, str(workers)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    ) as proc:
        try:
            wait_connectable(path, SOCK_TYPES[kind])
            busy = [threading.Event() for _ in range(4)]
            loaders = [
                threading.Thread(target=_load, args=(path, kind, event), daemon=True)
                for event in busy
            ]
            for loader in loaders:
                loader.start()
            for event in busy:  # every client has had replies: the server is under load
                assert event.wait(PATIENCE)
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=READY_TIMEOUT)
            took = time.monotonic() - started
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        for loader in loaders:
            loader.join(PATIENCE)
            assert not loader.is_alive(), "a client hung after the server stopped"
    assert proc.returncode == 0, err
    assert took < udskit.server.SHUTDOWN_GRACE, f"stopping took {took:.1f} s: it waited"
    assert out == b"serve_messages returned\n"
    assert b"Traceback" not in err
    assert not path.exists(), "the socket file was removed"


def _load(path: Path, kind: str, busy: threading.Event) -> None:
    """A client that sends and reads as fast as it can until the server goes away."""
    try:
        with udskit.connect(path, type=kind, timeout=2.0) as client:
            for number in range(1_000_000):
                client.send_many([b"%d" % number] * 8)
                for _ in range(8):
                    client.recv()
                busy.set()
    except (ConnectionClosed, udskit.Timeout, udskit.ConnectError):
        pass  # the server stopped: what this client waits for


# -- regressions ------------------------------------------------------------------------------


def _threadcpu_used(native_id: int) -> float:
    """User plus system CPU time of one of this process's threads, from /proc."""
    with open(f"/proc/self/task/{native_id}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("kind", CONNECTED)
def test_a_client_gone_while_its_handler_works_costs_no_cpu(path: Path, kind: str) -> None:
    """The loop stops watching a client whose handler is still at work in the pool; epoll
    reports a hang-up whatever it was asked, so without care the loop spins on it."""
    release = threading.Event()
    working = threading.Event()

    def handler(conn: Connection, message: bytes) -> bytes:
        working.set()
        release.wait(PATIENCE)
        return message

    with Running(path, handler, type=kind, workers=2) as running:
        try:
            with running.client() as client:
                client.send(b"work")
                assert working.wait(PATIENCE)
            # The client is gone (a full close: the server's socket now reports EPOLLHUP).
            native_id = running.thread.native_id
            assert native_id is not None
            before = _threadcpu_used(native_id)
            time.sleep(CPU_WINDOW)  # the measured window, not a synchronisation
            used = _threadcpu_used(native_id) - before
            assert used < CPU_ALLOWED, f"the loop used {used:.2f} s of CPU in {CPU_WINDOW} s"
        finally:
            release.set()
        wait_until(lambda: running.server.active_clients == 0, "the client to be dropped")


@pytest.mark.parametrize("kind", CONNECTED)
def test_stop_does_not_wait_for_a_worker_stuck_on_a_full_outbox(
    path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker waiting for room in a client's outbox waits on the loop, which stop() ends:
    stopping closes the clients first, so the worker is released at once."""
    conns: list[Connection] = []
    big = b"x" * 8192

    def handler(conn: Connection, message: bytes) -> bytes:
        return big

    running = Running(
        path,
        handler,
        type=kind,
        workers=2,
        max_outbox=SMALL_OUTBOX,
        sndbuf=SMALL_BUFFER,
        on_connect=conns.append,
    )
    with running, socket.socket(socket.AF_UNIX, SOCK_TYPES[kind]) as greedy:
        greedy.connect(os.fspath(path))
        greedy.setblocking(False)
        wait_until(lambda: conns, "the client to be accepted")
        frame = b"go" if kind == "seqpacket" else struct.pack(">I", 2) + b"go"
        _send_until(greedy, frame, lambda: conns[0].outbox_size > SMALL_OUTBOX, "a full outbox")
        started = time.monotonic()
        running.server.stop()
        running.thread.join(PATIENCE)
        took = time.monotonic() - started
    assert took < udskit.server.SHUTDOWN_GRACE / 2, f"stop() took {took:.1f} s"
    assert not any("still running" in record.getMessage() for record in caplog.records)


def test_sending_to_a_closed_connection_raises(path: Path) -> None:
    """A handler that answers another client (a chat room) learns that client has left."""
    room: dict[bytes, Connection] = {}
    left = threading.Event()
    errors: list[BaseException] = []

    def handler(conn: Connection, message: bytes) -> bytes:
        name, _, text = message.partition(b":")
        room[name] = conn
        for other in room.values():
            if other is not conn:
                try:
                    other.send(text)
                except ConnectionClosed as exc:
                    errors.append(exc)
        return b"ok"

    with Running(path, handler, max_frame=1024, on_close=lambda conn: left.set()) as running:
        with running.client() as alice:
            assert round_trip(alice, b"alice:hi") == b"ok"
            alice.socket.sendall(b"\xff" * 4)  # a header over max_frame: the server drops her
            assert left.wait(PATIENCE)
        with running.client() as bob:
            assert round_trip(bob, b"bob:anyone?") == b"ok"
    assert len(errors) == 1
    assert "closed" in str(errors[0])


@pytest.mark.parametrize("kind", CONNECTED)
def test_descriptors_stay_the_handlers_while_its_client_is_closed(
    path: Path, kind: str, fd_check: None
) -> None:
    """A worker's handler keeps the descriptors of its message open even when the loop
    closes that client meanwhile (here: a second message that brings more descriptors
    than max_fds on a stream, which cannot go on; one over max_frame on seqpacket)."""
    release = threading.Event()
    working = threading.Event()
    closed = threading.Event()
    seen: list[tuple[int, int] | str] = []

    def handler(conn: Connection, message: bytes) -> None:
        fd = conn.fds[0]
        before = os.fstat(fd)
        working.set()
        release.wait(PATIENCE)
        try:
            after = os.fstat(fd)
        except OSError as exc:
            seen.append(os.strerror(exc.errno or 0))
        else:
            seen.append((before.st_ino, after.st_ino))

    r, w = os.pipe()
    other_r, other_w = -1, -1
    try:
        with Running(
            path,
            handler,
            type=kind,
            workers=2,
            max_frame=1024,
            max_fds=1,
            on_close=lambda c: closed.set(),
        ) as running:
            with running.client() as client:
                client.send_fds(b"with a descriptor", [w])
                assert working.wait(PATIENCE)
                if kind == "seqpacket":
                    client.socket.sendall(b"x" * 4096)
                else:
                    socket.send_fds(client.socket, [struct.pack(">I", 1) + b"x"], [r, r])
                assert closed.wait(PATIENCE)
                # Descriptor numbers are reused lowest first: a pipe opened now takes the
                # numbers a premature close freed.
                other_r, other_w = os.pipe()
                release.set()
            wait_until(lambda: seen, "the handler to finish")
    finally:
        release.set()
        for fd in (r, w, other_r, other_w):
            if fd >= 0:
                os.close(fd)
    assert len(seen) == 1
    assert isinstance(seen[0], tuple), f"closed under the handler: {seen[0]}"
    assert seen[0][0] == seen[0][1], "the number now names another file"


def test_pooled_datagrams_leave_nothing_behind(path: Path) -> None:
    """Every datagram is a client of its own: the pool forgets each once it is answered."""
    with Running(path, echo, type="dgram", workers=2) as running, running.client() as client:
        for number in range(200):
            assert round_trip(client, b"%d" % number) == b"%d" % number
        server = running.server
        wait_until(lambda: not server._inboxes, "the pool's queues to be forgotten")


def test_datagrams_queued_for_a_busy_worker_at_stop_leave_no_descriptor(
    path: Path, fd_check: None
) -> None:
    """Datagrams waiting in a worker's lane when the server stops are dropped with their
    descriptors, even when that worker finishes only after the stop began."""
    working = threading.Event()
    release = threading.Event()

    def handler(conn: Connection, message: bytes) -> None:
        if message == b"slow":
            working.set()
            release.wait(PATIENCE)

    r, w = os.pipe()
    try:
        running = Running(path, handler, type="dgram", workers=1)
        server = running.server
        with running, running.client() as client:
            client.send(b"slow")
            assert working.wait(PATIENCE)
            client.send_fds(b"queued", [r, w])
            client.send_fds(b"queued", [r, w])
            wait_until(lambda: sum(map(len, server._inboxes.values())) == 2, "two datagrams queued")
            server.stop()
            # The worker ends only once the stop has handed it its end (then nothing
            # takes the lane any more).
            wait_until(lambda: server._pool.qsize() == 1, "the stop to reach the workers")
            release.set()
    finally:
        release.set()
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("kind", CONNECTED)
def test_messages_after_close_are_not_handled(
    path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """close() sends what was queued, then closes; messages already read after the one
    whose handler closed are dropped, not handed to a handler whose replies must fail."""
    # More than the socket takes at once, so that it waits in the outbox (a packet must
    # fit the send buffer: many of them).
    replies = [os.urandom(200_000)] if kind == "stream" else [os.urandom(20_000)] * 40
    handled: list[bytes] = []

    def handler(conn: Connection, message: bytes) -> bytes | None:
        handled.append(message)
        if message == b"last":
            for reply in replies:
                conn.send(reply)
            conn.close()
            return None
        return message

    with (
        Running(path, handler, type=kind, sndbuf=SMALL_BUFFER) as running,
        running.client() as client,
    ):
        client.send_many([b"first", b"last", b"after", b"more"])
        assert client.recv() == b"first"
        if kind == "seqpacket":
            # Closing a socket with unread packets resets it (net/unix/af_unix.c,
            # unix_release_sock): the client may read ECONNRESET before the replies.
            got = _recv_until_closed(client, len(replies) + 1)
            assert got == replies[: len(got)]
        else:
            assert client.recv() == replies[0], "what was queued before close() arrives whole"
            with pytest.raises(ConnectionClosed) as caught:
                client.recv()
            assert not caught.value.mid_message
    assert handled == [b"first", b"last"], "nothing handled after close()"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def _recv_until_closed(channel: udskit.Channel, most: int) -> list[bytes]:
    """What ``channel`` receives before ConnectionClosed (which must come within ``most``)."""
    got: list[bytes] = []
    for _ in range(most):
        try:
            got.append(channel.recv())
        except ConnectionClosed:
            return got
    raise AssertionError(f"the connection was still open after {most} messages")


@pytest.mark.parametrize("kind", CONNECTED)
def test_a_greeting_sent_from_on_connect_arrives_unasked(path: Path, kind: str) -> None:
    def greet(conn: Connection) -> None:
        conn.send(b"welcome")

    with (
        Running(path, echo, type=kind, on_connect=greet) as running,
        running.client() as client,
    ):
        assert client.recv() == b"welcome", "before the client said anything"
        assert round_trip(client, b"then") == b"then"


@pytest.mark.parametrize("kind", CONNECTED)
def test_a_message_for_another_client_arrives_before_that_client_speaks(
    path: Path, kind: str
) -> None:
    room: list[Connection] = []

    def handler(conn: Connection, message: bytes) -> None:
        for member in room:
            if member is not conn:
                member.send(message)

    with (
        Running(path, handler, type=kind, on_connect=room.append) as running,
        running.client() as listener,
        running.client() as speaker,
    ):
        wait_until(lambda: len(room) == 2, "both clients to join")
        speaker.send(b"hello, room")
        assert listener.recv() == b"hello, room", "the listener never spoke"
        speaker.send(b"x" * 100_000)  # a large one goes another way
        assert listener.recv() == b"x" * 100_000


@pytest.mark.parametrize("workers", WORKERS)
def test_an_empty_seqpacket_reply_is_refused_not_lost(
    path: Path, workers: int, caplog: pytest.LogCaptureFixture
) -> None:
    """The client would read an empty packet as the end of the connection; the server
    refuses to send one, as a Channel does, rather than drop it without a word."""
    with (
        Running(path, lambda conn, message: b"", type="seqpacket", workers=workers) as running,
        running.client() as client,
    ):
        client.send(b"anything")
        with pytest.raises(ConnectionClosed):
            client.recv()
    refusals = [r.getMessage() for r in caplog.records if "empty seqpacket" in r.getMessage()]
    assert len(refusals) == 1


def test_close_from_a_worker_sends_what_was_queued_first(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With a pool, messages after the closing one may be in a worker's hands already;
    their replies fail, but what was sent before close() still goes out whole."""
    big = os.urandom(300_000)
    tried = threading.Event()

    def handler(conn: Connection, message: bytes) -> bytes | None:
        if message == b"last":
            conn.send(big)
            conn.close()
            return None
        if message == b"after":
            # Once the loop has queued big (and, right after it, taken the close), a reply
            # finds the connection closing.
            wait_until(lambda: conn.outbox_size > 0, "the reply to be queued")
            try:
                conn.send(message)
            finally:
                tried.set()
            return None
        return message

    with (
        Running(path, handler, workers=2, sndbuf=SMALL_BUFFER) as running,
        running.client() as client,
    ):
        client.send_many([b"first", b"last", b"after"])
        assert tried.wait(PATIENCE), "the client reads only once the late reply was tried"
        assert client.recv() == b"first"
        assert client.recv() == big
        with pytest.raises(ConnectionClosed) as caught:
            client.recv()
        assert not caught.value.mid_message


def test_stop_after_the_server_ended_writes_to_no_descriptor(path: Path) -> None:
    """stop() and close() after serve_forever ended (serve_messages' finally, a with block
    around it, a second signal) must not write their wake-up to the closed wake-up pipe's
    number: whatever is opened next may have it."""
    with Running(path, echo) as running:
        wake_number = running.server._wakeup._write
    with _reused(wake_number) as written:
        running.server.stop()
        running.server.close()
        assert written() == b""


def test_a_worker_left_behind_writes_to_no_descriptor(
    path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler still running when stop() gives up on it finishes later; handing its
    connection back must not wake a server that is gone through a reused descriptor."""
    monkeypatch.setattr(udskit.messageserver, "SHUTDOWN_GRACE", 0.05)
    release = threading.Event()
    working = threading.Event()

    def handler(conn: Connection, message: bytes) -> bytes:
        working.set()
        release.wait(PATIENCE)
        return message

    with Running(path, handler, workers=1) as running, running.client() as client:
        wake_number = running.server._wakeup._write
        client.send(b"slow")
        assert working.wait(PATIENCE)
    assert any("still running" in record.getMessage() for record in caplog.records)
    (worker,) = running.server._threads
    with _reused(wake_number) as written:
        release.set()
        worker.join(PATIENCE)
        assert not worker.is_alive()
        assert written() == b""


@contextlib.contextmanager
def _reused(number: int) -> Iterator[Callable[[], bytes]]:
    """Open a file of ours at descriptor ``number`` (as the next open() in any thread may
    get it); yields a function returning what was written to it."""
    r, w = os.pipe()
    os.dup2(w, number)
    os.close(w)
    os.set_blocking(r, False)

    def written() -> bytes:
        try:
            return os.read(r, 64)
        except BlockingIOError:
            return b""

    try:
        yield written
    finally:
        os.close(number)
        os.close(r)


# -- lifecycle --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_closing_a_server_that_never_served(path: Path, kind: str, fd_check: None) -> None:
    with MessageServer(path, echo, type=kind, workers=2) as server:
        assert path.exists()
        assert server.active_clients == 0
    assert not path.exists()
    server.close()  # again: nothing to do


def test_serve_forever_runs_once(path: Path) -> None:
    with Running(path, echo) as running:
        with pytest.raises(RuntimeError, match="once"):
            running.server.serve_forever()
        with running.client() as client:
            assert round_trip(client, b"unharmed") == b"unharmed"


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("kind", KINDS)
def test_stop_from_a_handler(path: Path, kind: str, workers: int) -> None:
    running = Running(
        path, lambda conn, message: conn_stop(running, message), type=kind, workers=workers
    )
    with running, running.client() as client:
        assert round_trip(client, b"hello") == b"hello"
        client.send(b"stop")
        running.thread.join(PATIENCE)
        assert not running.thread.is_alive(), "the server stopped"
    assert not path.exists()


def conn_stop(running: Running, message: bytes) -> bytes:
    if message == b"stop":
        running.server.stop()
    return message


def test_serve_messages_outside_the_main_thread(path: Path) -> None:
    """Off the main thread it installs no signal handlers, and stop() ends it."""
    servers: list[MessageServer] = []
    real = MessageServer

    class Recorded(real):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            servers.append(self)

    before = signal.getsignal(signal.SIGTERM)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(udskit.messageserver, "MessageServer", Recorded)
        thread = threading.Thread(
            target=udskit.serve_messages, args=(path, echo), kwargs={"workers": 2}, daemon=True
        )
        thread.start()
        wait_until(lambda: servers, "the server to be made")
        wait_connectable(path)
        with udskit.connect(path, timeout=PATIENCE) as client:
            assert round_trip(client, b"ok") == b"ok"
        assert signal.getsignal(signal.SIGTERM) is before
        servers[0].stop()
        thread.join(PATIENCE)
        assert not thread.is_alive()
    assert not path.exists()


def test_a_wakeup_that_stops_accepting_leaves_queued_clients_alone(path: Path) -> None:
    """One epoll wake-up may report the wake-up pipe (which stops the server, or hands its
    listener over) before the listener: the clients queued then are not accepted (and cut
    when the server closes); they stay queued for whoever listens next."""
    server = MessageServer(path, lambda conn, message: message)
    try:
        server._watch_listener(True)
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(os.fspath(path))  # queued in the backlog, not accepted yet
            server._watch_listener(False)  # what stop() and a handover do first
            server._on_events([(server.listener.fileno(), select.EPOLLIN)])
            assert server.active_clients == 0
            server.listener.socket.settimeout(0)
            accepted, _ = server.listener.socket.accept()  # still queued
            accepted.close()
    finally:
        server.close()
