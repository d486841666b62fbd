"""Faults injected under the blocking layer's I/O: a MessageServer whose client sockets are
real sockets with scripted system calls (short writes, EINTR, EAGAIN, ENOBUFS, a reset in
the middle of a reply that carries descriptors), and a receiver with no descriptor left.

What must hold: every reply arrives whole, with its own descriptors and no others; a
connection that fails is closed alone, in one log line, and the server goes on serving;
no descriptor is leaked; an error says what happened.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import threading
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

import udskit
from udskit import MessageServer, ProtocolError
from udskit.channel import DIRECT_READ_MIN, RECV_CHUNK

from ..conftest import no_descriptor_left, open_fds
from .scripted import ServingInThread

#: Upper bound of every wait here.
PATIENCE = 10.0

#: A step of a script: "ok" (the call goes through), ("short", n) (at most n bytes go), or
#: an exception raised before anything is sent or read (a signal, a full buffer).
Step = Any


class Faulty(socket.socket):
    """A real connected socket whose sends and reads follow scripts, then behave."""

    def __init__(self, real: socket.socket, sends: Iterable[Step], reads: Iterable[Step]) -> None:
        super().__init__(real.family, real.type, real.proto, fileno=real.detach())
        self.sends: deque[Step] = deque(sends)
        self.reads: deque[Step] = deque(reads)

    def _read_step(self) -> None:
        step = self.reads.popleft() if self.reads else "ok"
        if isinstance(step, BaseException):
            raise step

    def recv_into(self, *args: Any, **kwargs: Any) -> int:  # type: ignore[override]
        self._read_step()
        return super().recv_into(*args, **kwargs)

    def recvmsg_into(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        self._read_step()
        return super().recvmsg_into(*args, **kwargs)

    def send(self, data: Any, flags: int = 0) -> int:  # type: ignore[override]
        return self.sendmsg([data], [], flags)

    def sendmsg(self, buffers: Any, ancdata: Any = (), flags: int = 0, *rest: Any) -> int:  # type: ignore[override]
        step = self.sends.popleft() if self.sends else "ok"
        if isinstance(step, BaseException):
            raise step
        views = [memoryview(b).cast("B") for b in buffers]
        if step != "ok":
            left, cut = step[1], []
            for view in views:
                if left <= 0:
                    break
                cut.append(view[:left])
                left -= len(cut[-1])
            views = cut
        return super().sendmsg(views, list(ancdata), flags, *rest)


class FaultyListener(socket.socket):
    """The listener's own descriptor; each accepted client comes back as a Faulty socket
    with the next pair of scripts."""

    def __init__(self, sock: socket.socket, scripts: list[tuple[list[Step], list[Step]]]) -> None:
        super().__init__(sock.family, sock.type, sock.proto, fileno=sock.detach())
        self.scripts = scripts

    def accept(self) -> tuple[socket.socket, Any]:
        client, address = super().accept()
        sends, reads = self.scripts.pop(0) if self.scripts else ([], [])
        return Faulty(client, sends, reads), address


def _memfd(content: bytes) -> int:
    fd = os.memfd_create("reply", os.MFD_CLOEXEC)
    os.write(fd, content)
    return fd


def _content(fd: int) -> bytes:
    return os.pread(fd, os.fstat(fd).st_size, 0)


def reply_with_a_descriptor(conn: udskit.Connection, message: bytes) -> None:
    """Answers each message with itself reversed, and a memfd holding the same bytes: a
    descriptor that went with the wrong reply shows."""
    reply = message[::-1]
    fd = _memfd(reply)
    try:
        conn.send_fds(reply, [fd])
    finally:
        os.close(fd)


class Serving(ServingInThread):
    """A MessageServer in a thread over a FaultyListener."""

    def __init__(self, path: Path, scripts: list[tuple[list[Step], list[Step]]]) -> None:
        server = MessageServer(str(path), reply_with_a_descriptor, max_fds=4)
        listener = server.listener
        listener._sock = FaultyListener(listener.socket, scripts)  # type: ignore[union-attr]  # the fault injection
        super().__init__(server)
        assert self.error is None, f"the server failed: {self.error!r}"


def _exchange(path: Path, messages: list[bytes]) -> None:
    """Pipeline ``messages``, then check each reply and its one descriptor."""
    with udskit.connect(str(path), framing="length", max_fds=4, timeout=PATIENCE) as client:
        for message in messages:
            client.send(message)
        for message in messages:
            reply, fds = client.recv_fds()
            try:
                assert reply == message[::-1]
                assert len(fds) == 1, f"{len(fds)} descriptors with {reply!r}"
                assert _content(fds[0]) == reply, "a descriptor went with the wrong reply"
            finally:
                for fd in fds:
                    os.close(fd)


_MESSAGES = [b"first", b"x" * 3000, b"third one", b"", b"y" * 70_000, b"last"]

_INTERRUPTED = InterruptedError(errno.EINTR, "interrupted")
_FULL = BlockingIOError(errno.EAGAIN, "would block")


@pytest.mark.parametrize(
    ("sends", "reads"),
    [
        pytest.param([("short", 1), ("short", 3), ("short", 2)] * 6, [], id="short-writes"),
        pytest.param([("short", 4), _FULL, ("short", 5), _INTERRUPTED] * 4, [], id="eagain-eintr"),
        pytest.param([], [_INTERRUPTED, _FULL, _INTERRUPTED] * 3, id="interrupted-reads"),
    ],
)
def test_replies_with_descriptors_come_whole_and_with_their_own(
    sockdir: Path, sends: list[Step], reads: list[Step]
) -> None:
    path = sockdir / "s"
    before = open_fds()
    with Serving(path, [(sends, reads)]):
        _exchange(path, _MESSAGES)
        _exchange(path, [b"and the next client"])
    assert not open_fds() - before, "descriptors leaked"


@pytest.mark.parametrize(
    "failure",
    [
        ConnectionResetError(errno.ECONNRESET, "reset"),
        BrokenPipeError(errno.EPIPE, "broken pipe"),
        OSError(errno.ENOBUFS, "no buffer space"),
    ],
    ids=["reset", "pipe", "enobufs"],
)
def test_a_send_failing_mid_reply_closes_that_client_alone(
    sockdir: Path, failure: OSError, caplog: pytest.LogCaptureFixture
) -> None:
    path = sockdir / "s"
    before = open_fds()
    with caplog.at_level(logging.DEBUG, "udskit"), Serving(path, [([("short", 6), failure], [])]):
        with udskit.connect(str(path), framing="length", max_fds=4, timeout=PATIENCE) as client:
            client.send(b"abcdefghij")
            # Six bytes of the reply went, then the failure: the client must see the
            # connection end inside that reply, never a message made of the wrong bytes.
            with pytest.raises(udskit.ConnectionClosed) as cut:
                client.recv_fds()
            assert cut.value.mid_message
        _exchange(path, [b"the server goes on"])
    assert not open_fds() - before, "descriptors leaked"
    for record in caplog.records:
        assert "\n" not in record.getMessage()


def test_descriptors_refused_for_want_of_room_blame_the_limit_not_the_peer(
    no_fd_leak: None,
) -> None:
    left, right = socket.socketpair()
    r, w = os.pipe()
    with (
        udskit.Channel(left, framing="length") as receiver,
        udskit.Channel(right, framing="length") as sender,
    ):
        try:
            sender.send_fds(b"two", [r, w])
        finally:
            os.close(r)
            os.close(w)
        with no_descriptor_left(), pytest.raises(ProtocolError) as refused:
            receiver.recv_fds()
    text = str(refused.value)
    assert "open-file limit" in text
    assert "max_fds" not in text
    assert "\n" not in text


@pytest.mark.parametrize("timeout", [None, PATIENCE], ids=["direct-read", "buffered-read"])
@pytest.mark.parametrize("how", ["recv_fds", "recv"])
def test_descriptors_sent_inside_a_large_payload_are_never_dropped_unseen(
    timeout: float | None, how: str, no_fd_leak: None
) -> None:
    """A relay (or a peer that is not udskit) sends descriptors with the second half of a
    large payload. No read that starts at the message can reach them (the first half is
    larger than a read). Whatever path the read takes (a large message with no timeout is
    read straight into its own object), they come with that message (recv_fds) or are
    closed (recv), and never go with a later one."""
    size = DIRECT_READ_MIN * 2
    assert size // 2 > RECV_CHUNK - 4
    ours, theirs = socket.socketpair()
    r, w = os.pipe()
    first_read = threading.Event()

    def peer() -> None:
        with theirs:
            theirs.sendall(struct.pack(">I", size) + b"a" * size)  # a large one first
            # the next only once that one is read: its read starts at a message boundary
            assert first_read.wait(PATIENCE)
            theirs.sendall(struct.pack(">I", size) + b"b" * (size // 2))
            theirs.sendmsg([b"b" * (size - size // 2)], [rights_of(r)])
            theirs.sendall(struct.pack(">I", 5) + b"after")

    sender = threading.Thread(target=peer)
    with udskit.Channel(ours, framing="length", max_fds=2) as channel:
        channel.settimeout(timeout)
        sender.start()
        try:
            assert channel.recv() == b"a" * size
            first_read.set()
            if how == "recv_fds":
                data, fds = channel.recv_fds()
                assert data == b"b" * size
                assert len(fds) == 1
                assert os.path.samestat(os.fstat(fds[0]), os.fstat(r))
                os.close(fds[0])
            else:
                assert channel.recv() == b"b" * size
            assert channel.recv_fds() == (b"after", [])  # not the earlier message's
        finally:
            sender.join(PATIENCE)
            os.close(r)
            os.close(w)


def test_a_message_cannot_gather_descriptors_read_by_read(no_fd_leak: None) -> None:
    """One descriptor with each byte of a message, each its own read: max_fds bounds what
    a message brings, and what a peer makes us hold."""
    ours, theirs = socket.socketpair()
    r, w = os.pipe()
    with udskit.Channel(ours, framing="length", max_fds=2) as channel, theirs:
        theirs.sendall(struct.pack(">I", 100))
        for _ in range(100):
            theirs.sendmsg([b"x"], [rights_of(r)])
        os.close(r)
        os.close(w)
        with pytest.raises(ProtocolError, match="two parts of one message"):
            channel.recv_fds()


def rights_of(fd: int) -> tuple[int, int, bytes]:
    return (socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))


@pytest.mark.parametrize("framing", ["length", "lines"])
def test_a_receive_timing_out_mid_message_resumes_it_whole(framing: str, no_fd_leak: None) -> None:
    """The peer stops inside a message: recv() times out, and the part already read stays
    with the framing, so the next recv() returns the message whole, never its second half
    as a message of its own, nor the halves of two messages spliced."""
    ours, theirs = socket.socketpair()
    wire = (struct.pack(">I", 10) + b"0123456789") if framing == "length" else b"0123456789\n"
    with udskit.Channel(ours, framing=framing) as channel, theirs:
        channel.settimeout(0.01)
        for cut in range(1, len(wire)):
            theirs.sendall(wire[:cut])
            with pytest.raises(udskit.Timeout):
                channel.recv()
            theirs.sendall(wire[cut:] + wire)
            assert channel.recv() == b"0123456789"
            assert channel.recv() == b"0123456789"
