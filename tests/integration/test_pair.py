"""``udskit.pair()`` between processes (S4): across ``os.fork()``, across
``multiprocessing`` with the 'fork' and 'spawn' start methods, with descriptors passed."""

from __future__ import annotations

import multiprocessing
import os
import socket
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import udskit
from udskit import Channel, PeerCred, ProtocolError

from ..conftest import open_fds
from .children import Talker

#: How long the parent waits for a child's answer or exit.
PATIENCE = 30.0

TYPES = ["stream", "seqpacket", "dgram"]


@pytest.mark.parametrize("kind", TYPES)
def test_pair_across_fork(kind: str) -> None:
    parent_end, child_end = udskit.pair(kind)

    def child(say: Callable[[str], None]) -> None:
        parent_end.close()  # each side closes the end it does not use
        child_end.send(b"hello from %d" % os.getpid())
        reply = child_end.recv()
        child_end.send(b"child got: " + reply)
        peer = child_end.peer
        say(f"peer {peer.pid if peer else None}")

    with Talker(child) as talker:
        child_end.close()
        parent_end.settimeout(PATIENCE)
        assert parent_end.recv() == b"hello from %d" % talker.pid
        parent_end.send(b"hello from the parent")
        assert parent_end.recv() == b"child got: hello from the parent"
        # socketpair() records its creator (the parent) as the peer of both ends.
        assert talker.line() == f"peer {os.getpid()}"
        assert talker.finish() == 0
        if kind != "dgram":
            with pytest.raises(udskit.ConnectionClosed):
                parent_end.recv()  # the child exited: its end is gone
        parent_end.close()


@pytest.mark.parametrize("kind", TYPES)
def test_fds_over_a_pair_across_fork(kind: str) -> None:
    parent_end, child_end = udskit.pair(kind)
    read_end, write_end = os.pipe()

    def child(say: Callable[[str], None]) -> None:
        parent_end.close()
        os.close(read_end)
        os.close(write_end)
        data, fds = child_end.recv_fds()
        (fd,) = fds
        os.write(fd, data.upper())
        os.close(fd)
        say("written")

    with Talker(child) as talker:
        child_end.close()
        try:
            parent_end.send_fds(b"through the passed pipe", [write_end])
            os.close(write_end)
            assert talker.line() == "written"
            assert talker.finish() == 0
            # The child's copy is closed and so is ours: the pipe ends after the message.
            assert os.read(read_end, 100) == b"THROUGH THE PASSED PIPE"
            assert os.read(read_end, 100) == b""
        finally:
            os.close(read_end)
            parent_end.close()


# -- multiprocessing ------------------------------------------------------------------------


def _start(process: multiprocessing.process.BaseProcess) -> None:
    with warnings.catch_warnings():
        # A forked child inherits our warning filters, which the test run sets to "error":
        # a warning from the child's own machinery (a coverage plugin saving its data, say)
        # must not become its exit status.
        warnings.simplefilter("default")
        # Python 3.12+ warns about fork() while other threads run (a test's leftover
        # daemon thread, say); the children here only use their own channel.
        warnings.simplefilter("ignore", DeprecationWarning)
        process.start()


def _answer(channel: Channel) -> None:
    """Child process body: answer one question with our pid and what we know of the peer."""
    with channel:
        question = channel.recv()
        peer = channel.peer
        channel.send(b"%s pid=%d peer=%d" % (question, os.getpid(), peer.pid if peer else -1))


def _write_through(channel: Channel) -> None:
    """Child process body: receive a descriptor and write the message through it."""
    with channel:
        data, fds = channel.recv_fds()
        for fd in fds:
            os.write(fd, data)
            os.close(fd)
        channel.send(b"done")


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_pair_across_multiprocessing(method: str, kind: str) -> None:
    context: Any = multiprocessing.get_context(method)
    ours, theirs = udskit.pair(kind)
    with ours:
        process = context.Process(target=_answer, args=(theirs,))
        _start(process)
        theirs.close()
        ours.settimeout(PATIENCE)
        ours.send(b"who?")
        reply = ours.recv()
        process.join(PATIENCE)
        assert process.exitcode == 0
    assert reply == b"who? pid=%d peer=%d" % (process.pid, os.getpid())


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_fds_over_a_pair_across_multiprocessing(method: str) -> None:
    context: Any = multiprocessing.get_context(method)
    ours, theirs = udskit.pair("seqpacket")
    read_end, write_end = os.pipe()
    try:
        with ours:
            process = context.Process(target=_write_through, args=(theirs,))
            _start(process)
            theirs.close()
            ours.settimeout(PATIENCE)
            ours.send_fds(b"via %s" % method.encode(), [write_end])
            os.close(write_end)
            write_end = -1
            assert ours.recv() == b"done"
            process.join(PATIENCE)
            assert process.exitcode == 0
        assert os.read(read_end, 100) == b"via %s" % method.encode()
    finally:
        os.close(read_end)
        if write_end != -1:
            os.close(write_end)


def test_a_channel_holding_unread_data_cannot_be_handed_over() -> None:
    ours, theirs = udskit.pair()
    with ours, theirs:
        ours.send_many([b"one", b"two"])  # one write: both frames arrive in one read
        assert theirs.recv() == b"one"
        context = multiprocessing.get_context("spawn")
        process = context.Process(target=_answer, args=(theirs,))
        with pytest.raises(ProtocolError, match="holds received, unread data"):
            _start(process)
        assert theirs.recv() == b"two"


def test_pair_peer_credentials() -> None:
    me = PeerCred(os.getpid(), os.getuid(), os.getgid())
    for kind in TYPES:
        left, right = udskit.pair(kind)
        with left, right:
            assert left.peer == me
            assert right.peer == me
            assert left.type == kind
            assert left.address is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"type": "raw"}, "unknown socket type 'raw'"),
        ({"framing": "json"}, "unknown framing 'json'"),
        ({"max_fds": -1}, "max_fds must be from 0 to 253"),
        ({"max_frame": -5}, "max_frame must be a positive number"),
    ],
)
def test_pair_refuses_bad_options(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        udskit.pair(**options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        # the socket module's constants name the word to write, never in their repr
        (socket.SOCK_DGRAM, "type= takes a name, not socket.SOCK_DGRAM: write type='dgram'"),
        (5, "type= takes a name, not the number 5: write type='seqpacket'"),
        (socket.SOCK_RAW, "unknown socket type socket.SOCK_RAW: choose type='stream', "),
        (
            "datagram",
            (
                "unknown socket type 'datagram': choose type='stream', 'seqpacket' or "
                "'dgram' (did you mean type='dgram'?)"
            ),
        ),
        ("bogus", "unknown socket type 'bogus': choose type='stream', 'seqpacket' or 'dgram'"),
        (None, "type= takes a name, not a NoneType: choose type="),
        (True, "type= takes a name, not a bool: choose type="),
    ],
)
def test_a_type_that_is_not_a_name_says_which_name_to_write(kind: object, message: str) -> None:
    with pytest.raises(ValueError) as raised:
        udskit.pair(type=kind)  # type: ignore[arg-type]
    assert str(raised.value).startswith(message), str(raised.value)
    assert "<" not in str(raised.value)


@pytest.mark.parametrize("kind", ["stream", "seqpacket"])
def test_descriptors_that_are_not_a_sequence_or_not_open_are_named(
    kind: str, tmp_path: Path
) -> None:
    """As udskit.aio names them: not "object is not iterable", nor the socket's EBADF for a
    descriptor that is not open. Nothing is sent meanwhile: the next message comes alone."""
    not_open = max(open_fds()) + 1000  # far above anything this test opens
    left, right = udskit.pair(kind)
    with left, right:
        right.settimeout(10.0)
        with pytest.raises(TypeError, match=r"send_fds: fds is a sequence .* not int"):
            left.send_fds(b"x", 5)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=f"send_fds: descriptor {not_open} is not open"):
            left.send_fds(b"x", [not_open])
        left.send_fds(b"one", iter([0]))  # an iterator of descriptors is taken as given
        message, fds = right.recv_fds()
        assert message == b"one"
        assert len(fds) == 1
        os.close(fds[0])
        left.send(b"alone")
        assert right.recv() == b"alone"
    path = tmp_path / "d.sock"
    refused = f"send_to: descriptor {not_open} is not open"
    with udskit.listen(path, type="dgram") as listener, pytest.raises(ValueError, match=refused):
        listener.send_to(path, b"x", [not_open])
