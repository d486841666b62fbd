"""Limits and malformed input: frames over max_frame, too many descriptors (sent, or forced
on us by a raw sender), foreign control data, truncated datagrams and EMSGSIZE.

Every test that receives descriptors counts /proc/self/fd before and after the error: a
refused message must leave none of its descriptors open.
"""

from __future__ import annotations

import array
import asyncio
import errno
import gc
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import udskit
import udskit.aio
from udskit import Channel, DatagramListener, FrameTooLarge, ProtocolError
from udskit.ancillary import MAX_FDS_PER_MESSAGE
from udskit.proto import HEADER

from ..conftest import open_fds

KIB = 1024

#: Above Linux's default datagram send buffer (net.core.wmem_default, 208 KiB).
OVERSIZED_DATAGRAM = 400 * KIB


@pytest.fixture(autouse=True)
def _no_leaks(no_fd_leak: None) -> None:
    """Every test here leaves no descriptor open, whatever error it provoked."""


@pytest.fixture
def pipes() -> Iterator[list[int]]:
    """Eight descriptors to pass around (both ends of four pipes)."""
    fds: list[int] = []
    for _ in range(4):
        fds.extend(os.pipe())
    yield fds
    for fd in fds:
        os.close(fd)


def _rights(fds: list[int]) -> list[tuple[int, int, bytes]]:
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def _received_fds_now() -> set[int]:
    return {fd for fd in open_fds() if os.path.exists(f"/proc/self/fd/{fd}")}


# -- frames over max_frame ----------------------------------------------------------------


def test_announced_frame_over_max_frame_is_refused_before_allocating() -> None:
    ours, theirs = udskit.pair()
    with ours, theirs:
        ours.socket.sendall(HEADER.pack(0xFFFFFFF0))  # 4 GiB announced, nothing behind it
        with pytest.raises(FrameTooLarge) as caught:
            theirs.recv()
    message = str(caught.value)
    assert f"peer announced a message of {0xFFFFFFF0} bytes" in message
    assert f"over max_frame ({16 * 1024 * 1024} bytes)" in message
    assert isinstance(caught.value, ProtocolError)


def test_custom_max_frame_on_receive() -> None:
    ours, theirs = udskit.pair(max_frame=100)
    with ours, theirs:
        ours.socket.sendall(HEADER.pack(101) + b"x" * 101)
        with pytest.raises(FrameTooLarge, match=r"101 bytes, over max_frame \(100 bytes\)"):
            theirs.recv()


def test_sending_over_max_frame_sends_nothing() -> None:
    ours, theirs = udskit.pair(max_frame=1000)
    with ours, theirs:
        for big in (b"x" * 1001, b"y" * 70 * KIB):  # the joined and the scatter-gather paths
            with pytest.raises(FrameTooLarge, match=f"message of {len(big)} bytes is over"):
                ours.send(big)
        with pytest.raises(FrameTooLarge):
            ours.send_many([b"fine", b"z" * 1001])  # checked before the batch is written
        ours.send(b"x" * 1000)
        assert theirs.recv() == b"x" * 1000  # no partial frame broke the stream


def test_line_over_max_line() -> None:
    ours, theirs = udskit.pair(framing="lines", max_frame=64)
    with ours, theirs:
        # Named as this caller set it: max_frame (it has no max_line to raise).
        with pytest.raises(FrameTooLarge, match=r"line of 65 bytes is over max_frame .*max_frame"):
            ours.send(b"x" * 65)
        with pytest.raises(ProtocolError, match="contains a newline"):
            ours.send(b"two\nlines")
        ours.socket.sendall(b"y" * 100)  # no newline, and more than a line may hold
        with pytest.raises(FrameTooLarge, match=r"without a newline \(max_frame\)"):
            theirs.recv()


def test_a_line_over_max_frame_received_names_max_frame_in_both_layers() -> None:
    # It said "max_line must be raised", a keyword that neither layer's channels take.
    expected = r"a line of 65 bytes, over max_frame \(64 bytes\).*or max_frame must be raised"
    ours, theirs = udskit.pair(framing="lines", max_frame=64)
    with ours, theirs:
        theirs.socket.sendall(b"y" * 65 + b"\n")
        with pytest.raises(FrameTooLarge, match=expected):
            ours.recv()

    async def aio() -> None:
        ours, theirs = udskit.aio.pair(framing="lines", max_frame=64)
        async with ours, theirs:
            theirs.socket.sendall(b"y" * 65 + b"\n")
            with pytest.raises(FrameTooLarge, match=expected):
                await ours.recv()

    asyncio.run(aio())


# -- too many descriptors -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["stream", "seqpacket", "dgram"])
def test_sending_more_fds_than_max_fds_is_refused(kind: str) -> None:
    ours, theirs = udskit.pair(kind)
    r, w = os.pipe()
    try:
        with ours, theirs:
            fds = [r] * (MAX_FDS_PER_MESSAGE + 1)
            with pytest.raises(ProtocolError) as caught:
                ours.send_fds(b"too many", fds)
            assert str(caught.value) == (
                f"cannot send {MAX_FDS_PER_MESSAGE + 1} descriptors in one message: the limit "
                f"is {MAX_FDS_PER_MESSAGE} (max_fds); send them in several messages"
            )
            with pytest.raises(ValueError, match="non-negative ints"):
                ours.send_fds(b"bad", [-1])
            ours.send_fds(b"just right", [r] * MAX_FDS_PER_MESSAGE)
            data, got = theirs.recv_fds()
            assert data == b"just right"  # nothing of the refused sends arrived first
            assert len(got) == MAX_FDS_PER_MESSAGE
            for fd in got:
                os.close(fd)
    finally:
        os.close(r)
        os.close(w)


def test_datagram_listener_refuses_too_many_fds(sockdir: Path) -> None:
    listener = udskit.listen(sockdir / "d.sock", type="dgram", max_fds=1)
    with listener, pytest.raises(ProtocolError, match="the limit is 1"):
        listener.send_to(sockdir / "anywhere", b"x", [0, 1])


def _raw_send(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    sent = sock.sendmsg([data], _rights(fds))
    assert sent == len(data)


@pytest.mark.parametrize("kind", ["stream", "seqpacket", "dgram"])
def test_raw_sender_forcing_more_fds_than_max_fds(kind: str, pipes: list[int]) -> None:
    ours, theirs = udskit.pair(kind, max_fds=2)
    with ours, theirs:
        payload = HEADER.pack(3) + b"fds" if kind == "stream" else b"fds"
        before = _received_fds_now()
        _raw_send(ours.socket, payload, pipes[:5])
        with pytest.raises(ProtocolError) as caught:
            theirs.recv_fds()
        # The kernel truncates (MSG_CTRUNC), or delivers a few more than max_fds into the
        # buffer's alignment slack: refused either way.
        assert re.search(r"MSG_CTRUNC|5 descriptors, more than max_fds \(2\)", str(caught.value))
        assert "all received descriptors closed" in str(caught.value)
        assert _received_fds_now() == before, "every descriptor that arrived was closed"
        if kind != "stream":  # packet sockets lose just that one message
            ours.send_fds(b"next", pipes[:2])
            data, fds = theirs.recv_fds()
            assert (data, len(fds)) == (b"next", 2)
            for fd in fds:
                os.close(fd)


def test_raw_sender_forcing_fds_on_a_datagram_listener(sockdir: Path, pipes: list[int]) -> None:
    path = sockdir / "d.sock"
    with udskit.listen(path, type="dgram", max_fds=2) as listener:
        assert isinstance(listener, DatagramListener)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as raw:
            raw.connect(os.fspath(path))
            before = _received_fds_now()
            _raw_send(raw, b"too many", pipes[:6])
            with pytest.raises(ProtocolError, match="MSG_CTRUNC"):
                listener.recv()
            assert _received_fds_now() == before
            raw.send(b"next")
            assert listener.recv().data == b"next"


def test_recv_closes_descriptors_nobody_asked_for(pipes: list[int]) -> None:
    ours, theirs = udskit.pair("seqpacket")
    with ours, theirs:
        before = _received_fds_now()
        ours.send_fds(b"unwanted", pipes[:3])
        assert theirs.recv() == b"unwanted"
        assert _received_fds_now() == before


def test_a_channel_dropped_without_close_closes_descriptors_it_never_delivered(
    pipes: list[int],
) -> None:
    left, right = socket.socketpair()
    with left, right:
        channel = Channel(right)
        before = _received_fds_now()
        # One write, two messages: the descriptors belong to the second, which stays unread.
        _raw_send(left, HEADER.pack(2) + b"hi" + HEADER.pack(3) + b"you", pipes[:3])
        assert channel.recv() == b"hi"
        assert len(_received_fds_now() - before) == 3
        del channel
        gc.collect()
        assert _received_fds_now() == before
        # The socket was the caller's: still open, and nothing else was closed twice.
        left.send(HEADER.pack(1) + b"x")
        assert Channel(right).recv() == b"x"


def test_a_datagram_session_dropped_unread_closes_its_descriptors(
    sockdir: Path, pipes: list[int]
) -> None:
    path = sockdir / "d.sock"
    with (
        udskit.listen(path, type="dgram") as listener,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as raw,
    ):
        assert isinstance(listener, DatagramListener)
        raw.connect(os.fspath(path))
        before = _received_fds_now()
        _raw_send(raw, b"with fds", pipes[:2])
        session = listener.session(listener.recv())
        assert len(_received_fds_now() - before) == 2
        del session
        gc.collect()
        assert _received_fds_now() == before


class ForeignControlData(socket.socket):
    """A real socket whose next receive also reports control data of an unknown kind,
    alongside real descriptors (the scripted fault: AF_UNIX peers cannot send that)."""

    def __init__(self, sock: socket.socket, extra: list[tuple[int, int, bytes]]) -> None:
        super().__init__(sock.family, sock.type, fileno=sock.detach())
        self.extra = extra

    def recvmsg_into(self, *args: Any, **kwargs: Any) -> Any:
        size, ancdata, flags, address = super().recvmsg_into(*args, **kwargs)
        ancdata = [*ancdata, *self.extra]
        self.extra = []
        return size, ancdata, flags, address


@pytest.mark.parametrize("kind", ["stream", "seqpacket"])
def test_foreign_control_data_closes_every_fd(kind: str, pipes: list[int]) -> None:
    left, right = socket.socketpair(socket.AF_UNIX, udskit.options.socket_kind(kind))
    scripted = ForeignControlData(right, [(socket.IPPROTO_IP, 8, b"\0" * 4)])
    with left, Channel(scripted) as channel:
        before = _received_fds_now()
        _raw_send(left, HEADER.pack(2) + b"hi" if kind == "stream" else b"hi", pipes[:3])
        with pytest.raises(ProtocolError, match="unexpected control data") as caught:
            channel.recv_fds()
        assert f"level {socket.IPPROTO_IP}, type 8" in str(caught.value)
        assert _received_fds_now() == before


# -- truncated datagrams and EMSGSIZE ----------------------------------------------------


@pytest.mark.parametrize("kind", ["seqpacket", "dgram"])
def test_truncated_message_is_an_error_not_a_short_message(kind: str, pipes: list[int]) -> None:
    ours, theirs = udskit.pair(kind, max_frame=1000)
    with ours, theirs:
        before = _received_fds_now()
        ours.send_fds(b"x" * 1001, pipes[:2])
        with pytest.raises(ProtocolError) as caught:
            theirs.recv()
        assert "larger than max_frame (1000 bytes) and arrived truncated" in str(caught.value)
        assert _received_fds_now() == before
        ours.send(b"y" * 1000)
        assert theirs.recv() == b"y" * 1000  # the next message is whole


def test_truncated_datagram_at_a_listener(sockdir: Path, pipes: list[int]) -> None:
    path = sockdir / "d.sock"
    with (
        udskit.listen(path, type="dgram", max_frame=100) as listener,
        udskit.connect(path, type="dgram") as client,
    ):
        before = _received_fds_now()
        client.send_fds(b"z" * 101, pipes[:1])
        with pytest.raises(ProtocolError) as caught:
            listener.recv()
        assert "larger than max_frame (100 bytes) and arrived truncated" in str(caught.value)
        assert str(path) in str(caught.value)
        assert _received_fds_now() == before
        client.send(b"ok")
        assert listener.recv().data == b"ok"


@pytest.mark.parametrize("kind", ["seqpacket", "dgram"])
def test_emsgsize_is_frame_too_large_suggesting_stream(kind: str) -> None:
    ours, theirs = udskit.pair(kind)
    with ours, theirs:
        with pytest.raises(FrameTooLarge) as caught:
            ours.send(b"x" * OVERSIZED_DATAGRAM)
        message = str(caught.value)
        assert message.startswith("message is larger than the socket's send buffer allows")
        assert "EMSGSIZE" in message
        assert "type='stream'" in message
        assert caught.value.__cause__ is not None
        assert caught.value.__cause__.errno == errno.EMSGSIZE  # type: ignore[attr-defined]
        ours.send(b"small")  # still usable
        assert theirs.recv() == b"small"


def test_emsgsize_from_a_datagram_listener(sockdir: Path) -> None:
    path = sockdir / "d.sock"
    with (
        udskit.listen(path, type="dgram") as listener,
        udskit.connect(path, type="dgram") as client,
    ):
        client.send(b"hi")
        sender = listener.recv().sender
        assert sender is not None
        with pytest.raises(FrameTooLarge, match=f"message to {sender} is larger") as caught:
            listener.send_to(sender, b"x" * OVERSIZED_DATAGRAM)
        assert "type='stream'" in str(caught.value)


def test_buffer_slack_does_not_admit_an_extra_fd(pipes: list[int]) -> None:
    # With max_fds=1 the control buffer (CMSG_SPACE, 8-byte aligned) has room for two.
    ours, theirs = udskit.pair(max_fds=1)
    with ours, theirs:
        before = _received_fds_now()
        _raw_send(ours.socket, HEADER.pack(3) + b"two", pipes[:2])
        with pytest.raises(ProtocolError, match=r"2 descriptors, more than max_fds \(1\)"):
            theirs.recv_fds()
        assert _received_fds_now() == before
