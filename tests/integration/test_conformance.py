"""One contract, every transport: see conformance.py for the interface and the transports."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from udskit import ConnectionClosed, PeerCred, ProtocolError, Timeout

from ..conftest import open_fds
from .conformance import (
    ALL_SIZES,
    PACKET_SIZES,
    TRANSPORTS,
    Background,
    Transport,
    payload,
    receive_exactly,
)

#: Short enough to keep the suite quick, long enough that nothing else is measured.
SHORT_TIMEOUT = 0.05


@pytest.fixture(params=TRANSPORTS, ids=lambda make: make.__name__)
def transport(request: pytest.FixtureRequest, sockdir: Path) -> Iterator[Transport]:
    """A transport, checked for descriptor leaks: everything it opened is closed after."""
    make: Callable[[Path], Transport] = request.param
    before = open_fds()
    made = make(sockdir)
    try:
        yield made
    finally:
        made.teardown()
    leaked = {fd for fd in open_fds() - before if os.path.exists(f"/proc/self/fd/{fd}")}
    assert not leaked, f"{made.id}: descriptors leaked: {sorted(leaked)}"


@pytest.fixture
def ends(transport: Transport) -> tuple[Any, Any]:
    return transport.make_pair()


def _exchange(transport: Transport, sender: Any, receiver: Any, data: bytes) -> bytes:
    """Send ``data`` from a helper thread (big messages fill the socket buffer) and receive."""
    helper = Background(transport.send, sender, data)
    try:
        return receive_exactly(transport, receiver, len(data))
    finally:
        helper.join()


@pytest.mark.parametrize("size", ALL_SIZES)
def test_round_trip(transport: Transport, ends: tuple[Any, Any], size: int) -> None:
    if size not in transport.sizes:
        pytest.skip(f"{transport.kind} messages of {size} bytes belong on a stream")
    client, server = ends
    request = payload(size, binary=transport.binary, seed=1)
    reply = payload(size, binary=transport.binary, seed=2)
    assert _exchange(transport, client, server, request) == request
    assert _exchange(transport, server, client, reply) == reply


def test_empty_message(transport: Transport, ends: tuple[Any, Any]) -> None:
    client, server = ends
    if transport.empty == "nothing":
        transport.send(client, b"")  # sends no bytes at all
        transport.send(client, b"after")
        assert transport.recv(server) == b"after"
        return
    if transport.empty == "refused":
        with pytest.raises(ProtocolError, match="empty"):
            transport.send(client, b"")
    else:
        transport.send(client, b"")
        transport.send(server, b"")
    # Either way the framing is intact: the next message arrives whole, after the empty one.
    transport.send(client, b"next")
    transport.send(server, b"back")
    expected_first = b"" if transport.empty == "message" else b"next"
    assert transport.recv(server) == expected_first
    assert transport.recv(client) == (b"" if transport.empty == "message" else b"back")
    if transport.empty == "message":
        assert transport.recv(server) == b"next"
        assert transport.recv(client) == b"back"


def test_order_kept(transport: Transport, ends: tuple[Any, Any]) -> None:
    client, server = ends
    sent = [b"message %03d " % i + payload(i * 37, binary=transport.binary) for i in range(60)]
    for sender, receiver in ((client, server), (server, client)):
        # From a helper thread: a datagram receiver queues only a few (net.unix.max_dgram_qlen).
        helper = Background(_send_all, transport, sender, sent)
        try:
            if transport.boundaries:
                assert [transport.recv(receiver) for _ in sent] == sent
            else:
                expected = b"".join(sent)
                assert receive_exactly(transport, receiver, len(expected)) == expected
        finally:
            helper.join()


def _send_all(transport: Transport, sender: Any, messages: list[bytes]) -> None:
    for message in messages:
        transport.send(sender, message)


@pytest.mark.parametrize("closer", ["client", "server"])
def test_iteration_ends_at_clean_close(
    transport: Transport, ends: tuple[Any, Any], closer: str
) -> None:
    if not transport.eof:
        pytest.skip("datagram sockets have no end of stream")
    client, server = ends
    sender, receiver = (client, server) if closer == "client" else (server, client)
    sent = [b"one", b"two", b"three"]
    for message in sent:
        transport.send(sender, message)
    transport.close(sender)
    received = transport.messages(receiver)
    if transport.boundaries:
        assert received == sent
    else:
        assert b"".join(received) == b"".join(sent)


@pytest.mark.parametrize("closer", ["client", "server"])
def test_connection_closed_after_peer_closes(
    transport: Transport, ends: tuple[Any, Any], closer: str
) -> None:
    client, server = ends
    gone, left = (client, server) if closer == "client" else (server, client)
    transport.close(gone)
    with pytest.raises(ConnectionClosed) as sent:
        transport.send(left, b"anyone there?")
    assert isinstance(sent.value, ConnectionError)
    assert not sent.value.mid_message
    if transport.eof:
        with pytest.raises(ConnectionClosed, match="closed") as received:
            transport.recv(left)
        assert not received.value.mid_message
        with pytest.raises(ConnectionClosed, match="closed"):
            transport.recv_fds(left)


@pytest.mark.parametrize("side", ["client", "server"])
def test_timeout_after_settimeout(transport: Transport, ends: tuple[Any, Any], side: str) -> None:
    client, server = ends
    waiting, other = (client, server) if side == "client" else (server, client)
    transport.settimeout(waiting, SHORT_TIMEOUT)
    with pytest.raises(Timeout, match="timed out") as caught:
        transport.recv(waiting)
    assert isinstance(caught.value, TimeoutError)
    # A timeout loses nothing: the endpoint keeps working, with the timeout still set.
    transport.send(other, b"late")
    assert transport.recv(waiting) == b"late"
    transport.settimeout(waiting, None)
    transport.send(other, b"later")
    assert transport.recv(waiting) == b"later"


@pytest.mark.parametrize("count", [1, 16])
@pytest.mark.parametrize("direction", ["client->server", "server->client"])
def test_descriptors_passed(
    transport: Transport, ends: tuple[Any, Any], count: int, direction: str
) -> None:
    client, server = ends
    sender, receiver = (client, server) if direction == "client->server" else (server, client)
    pipes = [os.pipe() for _ in range(count)]
    try:
        transport.send_fds(sender, b"fds", [w for _, w in pipes])
        data, fds = transport.recv_fds(receiver)
        try:
            assert data == b"fds"
            assert len(fds) == count
            for i, (fd, (r, w)) in enumerate(zip(fds, pipes, strict=True)):
                assert fd != w, "the receiver gets its own descriptor"
                assert not os.get_inheritable(fd), "received descriptors are close-on-exec"
                assert os.path.samestat(os.fstat(fd), os.fstat(w))
                os.write(fd, b"%d" % i)  # usable: it reaches the sender's pipe
                assert os.read(r, 16) == b"%d" % i
        finally:
            for fd in fds:
                os.close(fd)
        # The sender's descriptors are untouched by the passing.
        for r, w in pipes:
            os.write(w, b"!")
            assert os.read(r, 1) == b"!"
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)


def test_peer_credentials_are_ours(transport: Transport, ends: tuple[Any, Any]) -> None:
    client, server = ends
    # A datagram endpoint learns its peer from what it receives: exchange one each way.
    transport.send(client, b"ping")
    assert transport.recv(server) == b"ping"
    transport.send(server, b"pong")
    assert transport.recv(client) == b"pong"
    me = PeerCred(os.getpid(), os.getuid(), os.getgid())
    for end in (client, server):
        peer = transport.peer(end)
        assert peer == me
        assert isinstance(peer, PeerCred)


def test_close_is_idempotent(transport: Transport, ends: tuple[Any, Any]) -> None:
    client, server = ends
    for end in (client, server):
        assert not transport.is_closed(end)
        transport.close(end)
        transport.close(end)
        assert transport.is_closed(end)
        with pytest.raises(ConnectionClosed, match="closed"):
            transport.send(end, b"after close")
        with pytest.raises(ConnectionClosed, match="closed"):
            transport.recv(end)
        with pytest.raises(ConnectionClosed, match="closed"):
            transport.recv_fds(end)


def test_context_manager_closes(transport: Transport, ends: tuple[Any, Any]) -> None:
    client, server = ends
    with transport.closing(client) as inside:
        transport.send(inside, b"inside")
        assert transport.recv(server) == b"inside"
    assert transport.is_closed(client)
    with pytest.raises(RuntimeError), transport.closing(server):
        raise RuntimeError("the body failed")
    assert transport.is_closed(server)


def test_recv_closes_descriptors_it_was_not_asked_for(
    transport: Transport, ends: tuple[Any, Any]
) -> None:
    client, server = ends
    read_end, write_end = os.pipe()
    try:
        before = open_fds()
        for sender, receiver in ((client, server), (server, client)):
            transport.send_fds(sender, b"unwanted", [read_end, write_end])
            assert transport.recv(receiver) == b"unwanted"
        assert open_fds() == before
    finally:
        os.close(read_end)
        os.close(write_end)


@pytest.mark.parametrize("with_timeout", [False, True], ids=["blocking", "timeout"])
def test_large_messages_in_lockstep(
    transport: Transport, ends: tuple[Any, Any], with_timeout: bool
) -> None:
    """Large messages one after another, each sent only once the last was read: the
    receiver then finds nothing buffered, the case a direct-read fast path takes."""
    size = max(transport.sizes)
    client, server = ends
    if with_timeout:
        for end in ends:
            transport.settimeout(end, 30.0)
    for sender, receiver in ((client, server), (server, client)):
        for round_number in range(3):
            data = payload(size, binary=transport.binary, seed=round_number)
            assert _exchange(transport, sender, receiver, data) == data
            transport.send(receiver, b"ack")
            assert transport.recv(sender) == b"ack"
    # A large message with a descriptor, then small ones: nothing is lost or mixed up.
    read_end, write_end = os.pipe()
    try:
        # Descriptors travel with a message through the socket, never the pool: on
        # seqpacket that is a packet's size.
        fd_size = size if transport.kind == "stream" else max(PACKET_SIZES)
        data = payload(fd_size, binary=transport.binary, seed=99)
        helper = Background(transport.send_fds, client, data, [write_end])
        try:
            received, fds = transport.recv_fds(server) if transport.boundaries else (b"", [])
        finally:
            helper.join()
        if transport.boundaries:
            assert received == data
            assert len(fds) == 1
            os.write(fds[0], b"!")
            os.close(fds[0])
            assert os.read(read_end, 1) == b"!"
        else:
            assert receive_exactly(transport, server, size) == data  # raw: fds closed by recv
    finally:
        os.close(read_end)
        os.close(write_end)
    transport.send(client, b"small")
    assert transport.recv(server) == b"small"
    if transport.eof:  # and after large ones, a clean close is still a clean close
        data = payload(size, binary=transport.binary)
        assert _exchange(transport, client, server, data) == data
        transport.close(client)
        with pytest.raises(ConnectionClosed) as caught:
            transport.recv(server)
        assert not caught.value.mid_message
