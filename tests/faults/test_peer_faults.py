"""A peer that dies mid-message, and sending to a peer that has gone (EPIPE, never SIGPIPE)."""

from __future__ import annotations

import os
import select
import signal
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

import udskit
from udskit import ConnectionClosed, Listener
from udskit.proto import HEADER

from ..integration.children import Talker

KIB = 1024
MIB = 1024 * KIB

#: How long a killed-to-be child waits for its SIGKILL before giving up on its own.
CHILD_PATIENCE = 60.0


def _frame(payload: bytes) -> bytes:
    return HEADER.pack(len(payload)) + payload


def _half_sender(
    path: Path, whole: list[bytes], partial: bytes
) -> Callable[[Callable[[str], None]], None]:
    """A child's job: send whole frames, then the start of one more, then wait to be killed."""

    def run(say: Callable[[str], None]) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(os.fspath(path))
            say("connected")
            for payload in whole:
                sock.sendall(_frame(payload))
            sock.sendall(partial)
            say("sent")
            select.select([], [], [], CHILD_PATIENCE)  # until SIGKILL

    return run


CUTS = {
    # name: (whole frames before, the partial frame, bytes it announced in total)
    "inside-the-header": ([b"first"], HEADER.pack(100)[:2], None),
    "inside-the-payload": ([b"first"], HEADER.pack(200) + b"x" * 100, 204),
    "header-only": ([], HEADER.pack(10), 14),
    # (The partial frame fits the socket buffer: the child can finish sending it unread.)
    "inside-a-large-payload": ([b"L" * MIB], HEADER.pack(MIB) + b"y" * (100 * KIB), MIB + 4),
}


@pytest.mark.parametrize("cut", CUTS)
def test_peer_killed_mid_frame(sockdir: Path, cut: str, no_fd_leak: None) -> None:
    whole, partial, announced = CUTS[cut]
    path = sockdir / "app.sock"
    with udskit.listen(path) as listener, Talker(_half_sender(path, whole, partial)) as child:
        assert isinstance(listener, Listener)
        assert child.line() == "connected"
        with listener.accept() as channel:
            for payload in whole:
                assert channel.recv() == payload
            assert child.line() == "sent"
            os.kill(child.pid, signal.SIGKILL)
            assert child.finish() == -signal.SIGKILL
            with pytest.raises(ConnectionClosed) as caught:
                channel.recv()
    error = caught.value
    assert error.mid_message is True
    assert "mid-message" in str(error)
    assert f"{len(partial)}" in str(error)
    if announced is not None:
        assert f"of {announced} bytes" in str(error)


def _large_then_half(path: Path) -> Callable[[Callable[[str], None]], None]:
    """A child's job: one large frame; once the parent answers, half of another."""

    def run(say: Callable[[str], None]) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(os.fspath(path))
            sock.sendall(_frame(b"L" * MIB))
            assert sock.recv(len(_frame(b"go")), socket.MSG_WAITALL) == _frame(b"go")
            sock.sendall(HEADER.pack(MIB) + b"y" * (100 * KIB))
            say("sent")
            select.select([], [], [], CHILD_PATIENCE)  # until SIGKILL

    return run


def test_peer_killed_inside_a_large_payload_read_directly(sockdir: Path) -> None:
    # After a large message the channel reads the next large payload straight into the
    # message (nothing else buffered, so it waits for the whole payload in one call):
    # a peer dying inside it is reported like any other cut.
    path = sockdir / "app.sock"
    with udskit.listen(path) as listener, Talker(_large_then_half(path)) as child:
        assert isinstance(listener, Listener)
        with listener.accept() as channel:
            assert channel.recv() == b"L" * MIB
            channel.send(b"go")
            assert child.line() == "sent"
            os.kill(child.pid, signal.SIGKILL)
            assert child.finish() == -signal.SIGKILL
            with pytest.raises(ConnectionClosed) as caught:
                channel.recv()
    assert caught.value.mid_message is True
    assert f"mid-message: {100 * KIB + 4} of {MIB + 4} bytes received" in str(caught.value)


def test_iteration_raises_when_the_peer_dies_mid_frame(sockdir: Path) -> None:
    path = sockdir / "app.sock"
    sender = _half_sender(path, [b"a", b"b"], HEADER.pack(50) + b"half")
    with udskit.listen(path) as listener, Talker(sender) as child:
        assert isinstance(listener, Listener)
        assert child.line() == "connected"
        with listener.accept() as channel:
            assert child.line() == "sent"
            os.kill(child.pid, signal.SIGKILL)
            child.finish()
            received: list[bytes] = []
            with pytest.raises(ConnectionClosed, match="mid-message"):
                received.extend(channel)
    assert received == [b"a", b"b"]


def test_peer_killed_between_frames_is_a_clean_close(sockdir: Path) -> None:
    path = sockdir / "app.sock"
    with udskit.listen(path) as listener, Talker(_half_sender(path, [b"a"], b"")) as child:
        assert isinstance(listener, Listener)
        assert child.line() == "connected"
        with listener.accept() as channel:
            assert child.line() == "sent"
            os.kill(child.pid, signal.SIGKILL)
            child.finish()
            assert list(channel) == [b"a"]
            with pytest.raises(ConnectionClosed) as caught:
                channel.recv()
    assert caught.value.mid_message is False


SENDS: dict[str, Callable[[udskit.Channel, int], None]] = {
    "small": lambda channel, fd: channel.send(b"hello?"),
    "large": lambda channel, fd: channel.send(b"x" * (64 * KIB + 1)),
    "with-fds": lambda channel, fd: channel.send_fds(b"take this", [fd]),
    "many": lambda channel, fd: channel.send_many([b"one", b"two"]),
}


@pytest.mark.parametrize("kind", ["stream", "seqpacket"])
@pytest.mark.parametrize("how", SENDS)
def test_send_after_peer_closed_is_an_error_not_sigpipe(kind: str, how: str) -> None:
    ours, theirs = udskit.pair(kind)

    def child(say: Callable[[str], None]) -> None:
        # What an embedding C program or a shell pipeline leaves in place: SIGPIPE kills.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        ours.close()  # our copy of the parent's end
        try:
            theirs.recv()
        except ConnectionClosed:
            say("peer closed")
        read_end, _ = os.pipe()
        try:
            SENDS[how](theirs, read_end)
            say("sent without error")
        except ConnectionClosed as exc:
            say(f"ConnectionClosed: {exc}")
        say("alive")

    with Talker(child) as talker:
        theirs.close()
        ours.close()
        assert talker.line() == "peer closed"
        assert talker.line() == "ConnectionClosed: cannot send: the peer closed the connection"
        assert talker.line() == "alive"
    assert talker.finish() == 0, "the child died (SIGPIPE?) instead of getting an error"
