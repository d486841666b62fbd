"""The blocking Channel's receive path: recv_into() on a stream that takes no descriptors,
a receive buffer that is small while messages are, and datagram sessions that cost little.
Real sockets throughout."""

from __future__ import annotations

import array
import os
import socket
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

import udskit
from udskit import Channel, ConnectionClosed, ProtocolError
from udskit.ancillary import refuse_descriptors
from udskit.channel import DIRECT_READ_MIN, RECV_CHUNK, RECV_SHRINK_AFTER, RECV_START
from udskit.freshbytes import FRESH_MIN
from udskit.listening import Datagram
from udskit.proto import HEADER

#: Bound on every wait, so that a regression fails instead of hanging.
PATIENCE = 20.0

#: Sizes around every boundary of the receive path: the first buffer, the largest read,
#: and the direct read of a large payload.
SIZES = [
    1,
    RECV_START - 4,
    RECV_START - 3,
    RECV_START,
    3,
    RECV_START * 2 + 1,
    70_000,
    RECV_CHUNK + 5,
    0,
    DIRECT_READ_MIN * 2,
    2,
]


def _refuses(sock: socket.socket) -> bool:
    """Whether this kernel lets a socket refuse descriptors (Linux 6.16's SO_PASSRIGHTS)."""
    with socket.socket(sock.family, sock.type) as probe:
        return refuse_descriptors(probe)


@pytest.fixture
def raw_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    left, right = socket.socketpair()
    yield left, right
    left.close()
    right.close()


@pytest.mark.parametrize("timeout", [None, 5.0], ids=["blocking", "timeout"])
@pytest.mark.parametrize("max_fds", [0, 16], ids=["no-descriptors", "descriptors"])
def test_every_size_arrives_whole(max_fds: int, timeout: float | None) -> None:
    messages = [bytes([i % 251]) * size for i, size in enumerate(SIZES * 3)]
    left, right = udskit.pair(max_fds=max_fds)
    with left, right:
        right.settimeout(timeout)
        sender = threading.Thread(target=lambda: [left.send(m) for m in messages])
        sender.start()
        received = [right.recv() for _ in messages]
        sender.join(PATIENCE)
    assert [len(m) for m in received] == [len(m) for m in messages]
    assert received == messages


def test_a_stream_that_takes_no_descriptors_has_the_kernel_refuse_them(
    raw_pair: tuple[socket.socket, socket.socket],
) -> None:
    mine, theirs = raw_pair
    receiver = Channel(mine, max_fds=0)
    r, w = os.pipe()
    try:
        fds = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]).tobytes())]
        if _refuses(mine):
            # The sender is told, and the receiving channel goes on with whole messages.
            with pytest.raises(PermissionError):
                theirs.sendmsg([b"\0\0\0\x02hi"], fds)
            theirs.sendall(b"\0\0\0\x05after")
            assert receiver.recv() == b"after"
        else:
            # An older kernel delivers them: they are reported, never silently dropped.
            theirs.sendmsg([b"\0\0\0\x02hi"], fds)
            with pytest.raises(ProtocolError, match="max_fds"):
                receiver.recv()
    finally:
        receiver.close()
        os.close(r)
        os.close(w)


def test_a_listener_that_takes_no_descriptors_refuses_them_before_accept(
    sockdir: Path,
) -> None:
    path = sockdir / "nofds.sock"
    with udskit.listen(path, max_fds=0) as listener:
        if not _refuses(listener.socket):
            pytest.skip("this kernel cannot refuse descriptors (SO_PASSRIGHTS: Linux 6.16)")
        r, w = os.pipe()
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            client.connect(os.fspath(path))
            # Queued before accept(): the accepted socket inherits the listener's refusal.
            with pytest.raises(PermissionError):
                client.sendmsg(
                    [b"\0\0\0\x01x"],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]).tobytes())],
                )
            client.sendall(b"\0\0\0\x02ok")
            with listener.accept() as channel:
                assert channel.recv() == b"ok"
        finally:
            client.close()
            os.close(r)
            os.close(w)


def test_descriptors_still_arrive_where_max_fds_allows_them() -> None:
    left, right = udskit.pair()
    r, w = os.pipe()
    with left, right:
        try:
            left.send_fds(b"pipe", [r])
            data, fds = right.recv_fds()
            assert data == b"pipe"
            assert len(fds) == 1
            os.close(fds[0])
        finally:
            os.close(r)
            os.close(w)


def test_the_receive_buffer_is_a_page_while_messages_are_short_and_grows_for_a_burst() -> None:
    left, right = udskit.pair()
    with left, right:
        left.settimeout(PATIENCE)  # the burst fits the socket buffer; never hang if not
        for _ in range(50):
            left.send(b"ping")
            assert right.recv() == b"ping"
        assert len(right._rbuf) == RECV_START
        burst = [b"m%06d" % i for i in range(20_000)]  # ~220 KiB queued before any read
        left.send_many(burst)
        assert right.recv() == burst[0]
        assert len(right._rbuf) == RECV_CHUNK  # the first read filled a page
        rest = [right.recv() for _ in burst[1:]]
        assert rest == burst[1:]
        left.send(b"one short read")
        assert right.recv() == b"one short read"
        assert len(right._rbuf) == RECV_CHUNK  # not given back for one short read
        for _ in range(RECV_SHRINK_AFTER):  # one short read each
            left.send(b"quiet again")
            assert right.recv() == b"quiet again"
        assert len(right._rbuf) == RECV_START  # short reads give the memory back


def test_a_datagram_session_is_small_and_answers_its_sender(sockdir: Path) -> None:
    path = sockdir / "dgram.sock"
    with (
        udskit.listen(path, type="dgram") as listener,
        udskit.connect(path, type="dgram", timeout=PATIENCE) as client,
    ):
        listener.settimeout(PATIENCE)
        client.send(b"question")
        datagram = listener.recv()
        tracemalloc.start()
        try:
            session = listener.session(datagram)
            held, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        with session:
            assert held < RECV_START  # no max_frame-sized buffer for a session that never reads
            assert session.recv() == b"question"
            session.send(b"answer")
        assert client.recv() == b"answer"
        assert listener.socket.gettimeout() == PATIENCE  # the session left its mode alone
        # A session made from a Datagram by hand works the same.
        manual = Datagram(b"again", datagram.sender, datagram.peer)
        with listener.session(manual) as again:
            assert again.recv() == b"again"


def _after_a_large_one(size: int, part: int) -> tuple[Channel, Channel, bytes]:
    """A pair whose receiver got one large message with its last read going on into the
    next: ``part`` bytes of a ``size``-byte payload are buffered. Returns the pair and the
    payload (its first and last bytes differ from the rest)."""
    left, right = udskit.pair(max_frame=max(size, DIRECT_READ_MIN))
    first = b"F" * DIRECT_READ_MIN
    payload = b"<" + b"y" * (size - 2) + b">"
    left.send(first)
    left.socket.sendall(HEADER.pack(size) + payload[:part])  # queued behind the first
    assert right.recv() == first
    assert right._framing is not None
    assert right._framing.buffered == HEADER.size + part
    return left, right, payload


@pytest.mark.parametrize("size", [DIRECT_READ_MIN, FRESH_MIN + 12345], ids=["large", "fresh"])
def test_a_large_message_partly_read_ahead_is_completed_in_place(
    size: int, rests: list[int]
) -> None:
    left, right, payload = _after_a_large_one(size, 1000)
    with left, right:
        sender = threading.Thread(target=left.socket.sendall, args=(payload[1000:],))
        sender.start()
        assert right.recv() == payload
        sender.join(PATIENCE)
        assert rests == [size]
        left.send(b"after")  # the stream goes on in step
        assert right.recv() == b"after"


def test_a_peer_that_leaves_inside_a_message_read_in_place_is_a_cut(rests: list[int]) -> None:
    left, right, payload = _after_a_large_one(DIRECT_READ_MIN, 1000)
    with right:
        left.socket.sendall(payload[1000:5000])
        left.close()
        with pytest.raises(ConnectionClosed) as caught:
            right.recv()
    assert caught.value.mid_message is True
    assert f"mid-message: {5004} of {DIRECT_READ_MIN + 4} bytes received" in str(caught.value)
    assert rests == []


def test_descriptors_in_a_message_read_in_place_go_to_the_framing() -> None:
    # A peer that is not udskit sends descriptors with a later part of a message: the read
    # in place stops there, and the framing judges them as it judges any read's.
    left, right, payload = _after_a_large_one(DIRECT_READ_MIN, 1000)
    with left, right:
        fds = array.array("i", [os.dup(0)])
        try:
            left.socket.sendmsg(
                [payload[1000:]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())]
            )
        finally:
            os.close(fds[0])
        message, received = right.recv_fds()
        for fd in received:
            os.close(fd)
        assert message == payload
        assert len(received) == 1


def test_a_close_in_another_thread_ends_a_read_in_place_as_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    left, right, _ = _after_a_large_one(DIRECT_READ_MIN, 1000)
    entered = threading.Event()
    real = Channel._read_rest

    def read_rest(self: Channel, *args: object) -> object:
        entered.set()
        return real(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(Channel, "_read_rest", read_rest)
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            right.recv()
        except ConnectionClosed as exc:
            errors.append(exc)

    with left:
        thread = threading.Thread(target=reader)
        thread.start()
        assert entered.wait(PATIENCE)
        right.close()  # wakes the read; returns once the reader has left
        thread.join(PATIENCE)
    assert len(errors) == 1
    assert "this channel is closed" in str(errors[0])
    assert not errors[0].mid_message
