"""One echo contract, both servers: the thread-per-client ``Server`` and the event-loop
``MessageServer`` (inline and with a pool), on stream, seqpacket and datagram sockets.

conformance.py pairs two endpoints that the test drives alike from its own thread (send,
recv, settimeout on either end). A MessageServer has no such end: its side is a handler
the loop calls per message. So the servers meet here instead, as a client sees them: the
same requests, the same replies, whichever server answers.

The echo protocol: every message comes back as it was, with the descriptors it brought;
``?peer`` is answered with the peer's ``pid uid gid`` as the server saw them.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import udskit
from udskit import Channel, ConnectError, Connection, ConnectionClosed, MessageServer, Server

from ..conftest import open_fds

#: Upper bound of every wait in this file.
PATIENCE = 20.0

KINDS = ["stream", "seqpacket", "dgram"]

PEER_QUERY = b"?peer"


def _peer_reply(peer: udskit.PeerCred | None) -> bytes:
    assert peer is not None
    return b"%d %d %d" % (peer.pid, peer.uid, peer.gid)


def channel_echo(channel: Channel) -> None:
    """The contract for Server: one message at a time (one only, for a datagram)."""
    while True:
        data, fds = channel.recv_fds()  # ConnectionClosed at the end: Server logs it quietly
        try:
            if data == PEER_QUERY:
                channel.send(_peer_reply(channel.peer))
            elif fds:
                channel.send_fds(data, fds)
            else:
                channel.send(data)
        finally:
            for fd in fds:
                os.close(fd)
        if channel.type == "dgram":
            return


def message_echo(conn: Connection, message: bytes) -> bytes | None:
    """The contract for MessageServer."""
    if message == PEER_QUERY:
        return _peer_reply(conn.peer)
    if conn.fds:
        conn.send_fds(message, conn.fds)
        return None
    return message


@dataclass(frozen=True)
class Flavour:
    name: str
    make: Callable[[Path, str], Server | MessageServer]
    ordered_datagrams: bool = True  # a pool answers datagrams in any order


FLAVOURS = [
    Flavour("Server", lambda path, kind: Server(path, channel_echo, type=kind)),
    Flavour("MessageServer", lambda path, kind: MessageServer(path, message_echo, type=kind)),
    Flavour(
        "MessageServer-workers",
        lambda path, kind: MessageServer(path, message_echo, type=kind, workers=2),
        ordered_datagrams=False,
    ),
]


class Serving:
    """A server of one flavour, serving in a thread until the test ends."""

    def __init__(self, flavour: Flavour, path: Path, kind: str) -> None:
        self.flavour = flavour
        self.path = path
        self.kind = kind
        self.server = flavour.make(path, kind)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            self.server.serve_forever()
        except BaseException as exc:
            self.error = exc

    def client(self) -> Channel:
        return udskit.connect(self.path, type=self.kind, timeout=PATIENCE)

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(PATIENCE)
        assert not self.thread.is_alive(), f"{self.flavour.name} did not stop"
        self.server.close()
        if self.error is not None:
            raise self.error


@pytest.fixture(params=FLAVOURS, ids=lambda flavour: flavour.name)
def flavour(request: pytest.FixtureRequest) -> Flavour:
    chosen: Flavour = request.param
    return chosen


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    chosen: str = request.param
    return chosen


@pytest.fixture
def serving(flavour: Flavour, kind: str, sockdir: Path) -> Iterator[Serving]:
    """A server, checked for descriptor leaks: it runs in this process."""
    before = open_fds()
    running = Serving(flavour, sockdir / "contract.sock", kind)
    try:
        yield running
    finally:
        running.stop()
    leaked = {fd for fd in open_fds() - before if os.path.exists(f"/proc/self/fd/{fd}")}
    assert not leaked, f"{flavour.name} {kind}: descriptors leaked: {sorted(leaked)}"


def _payload(size: int, seed: int = 0) -> bytes:
    return bytes((i * 31 + seed) & 0xFF for i in range(size))


@pytest.mark.parametrize("size", [1, 64, 4096, 60_000])
def test_round_trip(serving: Serving, size: int) -> None:
    with serving.client() as client:
        for seed in range(3):
            data = _payload(size, seed)
            client.send(data)
            assert client.recv() == data


def test_empty_message(serving: Serving) -> None:
    if serving.kind == "seqpacket":
        pytest.skip("an empty seqpacket message reads as the end of the connection")
    with serving.client() as client:
        client.send(b"")
        assert client.recv() == b""
        client.send(b"after")
        assert client.recv() == b"after"


#: Datagrams in flight at once in the pipelining test: under net.unix.max_dgram_qlen (10 by
#: default), since Server drops a reply its client's full queue would not take at once.
DATAGRAM_WINDOW = 5


def test_pipelined_messages_in_order(serving: Serving) -> None:
    sent = [b"%03d " % i + _payload(i * 50) for i in range(100)]
    window = DATAGRAM_WINDOW if serving.kind == "dgram" else len(sent)
    received: list[bytes] = []
    with serving.client() as client:
        for start in range(0, len(sent), window):
            batch = sent[start : start + window]
            # From a helper: the replies fill the client's buffer while it still sends.
            sender = threading.Thread(target=client.send_many, args=(batch,), daemon=True)
            sender.start()
            received += [client.recv() for _ in batch]
            sender.join(PATIENCE)
            assert not sender.is_alive()
    if serving.kind == "dgram" and not serving.flavour.ordered_datagrams:
        assert sorted(received) == sent
    else:
        assert received == sent


@pytest.mark.parametrize("count", [1, 3])
def test_descriptors_come_back(serving: Serving, count: int) -> None:
    pipes = [os.pipe() for _ in range(count)]
    try:
        with serving.client() as client:
            client.send_fds(b"fds", [w for _, w in pipes])
            data, fds = client.recv_fds()
        try:
            assert data == b"fds"
            assert len(fds) == count
            for number, (fd, (r, _)) in enumerate(zip(fds, pipes, strict=True)):
                os.write(fd, b"%d" % number)
                assert os.read(r, 8) == b"%d" % number
        finally:
            for fd in fds:
                os.close(fd)
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)


def test_peer_credentials(serving: Serving) -> None:
    with serving.client() as client:
        client.send(PEER_QUERY)
        assert client.recv() == b"%d %d %d" % (os.getpid(), os.getuid(), os.getgid())


def test_clients_at_once(serving: Serving) -> None:
    errors: list[BaseException] = []

    def talk(number: int) -> None:
        try:
            with serving.client() as client:
                for turn in range(30):
                    message = b"%d-%d" % (number, turn)
                    client.send(message)
                    assert client.recv() == message
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=talk, args=(n,), daemon=True) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(PATIENCE)
        assert not thread.is_alive()
    assert not errors, errors


def test_a_client_that_leaves_is_forgotten(serving: Serving) -> None:
    if serving.kind == "dgram":
        pytest.skip("datagram clients never arrive or leave")
    with serving.client() as client:
        client.send(b"hi")
        assert client.recv() == b"hi"
        assert serving.server.active_clients == 1
    deadline = time.monotonic() + PATIENCE
    while serving.server.active_clients:  # bounded polling: the server notices the close
        assert time.monotonic() < deadline, "the client was never forgotten"
        time.sleep(0.001)


def test_stop_ends_clients_and_removes_the_socket_file(serving: Serving) -> None:
    client = serving.client()
    try:
        client.send(b"before")
        assert client.recv() == b"before"
        serving.stop()
        assert not serving.path.exists()
        if serving.kind != "dgram":
            with pytest.raises(ConnectionClosed):
                client.recv()
        with pytest.raises(ConnectError):
            serving.client()
    finally:
        client.close()


def test_the_contract_servers_are_the_two_servers() -> None:
    """Every server class the package exports is in FLAVOURS (a new one joins here)."""
    exported = {
        name
        for name in udskit.__all__
        if isinstance(getattr(udskit, name), type) and name.endswith("Server")
    }
    covered: set[Any] = {flavour.name.split("-")[0] for flavour in FLAVOURS}
    assert exported == covered


def test_stop_after_the_end_writes_to_no_descriptor(serving: Serving) -> None:
    """stop() and close() once the server has ended (a with block around serve_forever,
    a second signal) must not wake it through the closed wake-up pipe's number: the next
    open() in the process may have it."""
    wake_number = serving.server._wakeup._write
    serving.stop()
    r, w = os.pipe()
    os.dup2(w, wake_number)  # as another thread's next open() may
    os.close(w)
    try:
        serving.server.stop()
        serving.server.close()
        os.set_blocking(r, False)
        with pytest.raises(BlockingIOError):
            os.read(r, 16)
    finally:
        os.close(wake_number)
        os.close(r)
