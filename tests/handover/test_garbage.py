"""Garbage on the control socket, from either side: the serving process answers with an
error and keeps serving; a successor refuses what is not a listener of its type; every
descriptor that came with a bad message is closed, none leaks."""

from __future__ import annotations

import json
import os
import select
import socket
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import udskit
from udskit.ancillary import ancillary_size
from udskit.handover import MAX_CONVERSATIONS

from ..conftest import READY_TIMEOUT, open_fds
from ..integration.children import Talker
from .harness import Child, ask, control_path, raw_control, start_serving


@pytest.fixture(scope="module")
def serving(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Child, Path]]:
    """One server for all the garbage; the last test hands it over and checks its fds.

    Its callers may stay silent for as long as a test needs (not HELLO_TIMEOUT's 5 s): on a
    loaded machine the silent conversations of the too-many test were dropped before its
    last successor asked, and that successor took over."""
    directory = Path(os.path.realpath(tmp_path_factory.mktemp("g", numbered=True)))
    path = directory / "g.sock"
    with start_serving("server", path, "stream", "--hello-timeout", "600") as child:
        yield child, path


def answer(conv: socket.socket) -> dict[str, object] | None:
    """The serving process's answer (None: it hung up without one); it carries no fds."""
    data, ancdata, _, _ = conv.recvmsg(16384, ancillary_size(4))
    assert ancdata == []
    return json.loads(data) if data else None


def send(conv: socket.socket, packet: bytes, fds: list[int] | None = None) -> None:
    ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", fds))] if fds else []
    try:
        conv.sendmsg([packet], ancdata)
    except BrokenPipeError:
        pass  # it answered and hung up before reading: the answer is still there


def closed_by_peer(read_ends: list[int]) -> bool:
    """Whether every pipe's write end is closed everywhere (ours were closed after sending)."""
    for fd in read_ends:
        ready, _, _ = select.select([fd], [], [], READY_TIMEOUT)
        if not ready or os.read(fd, 1) != b"":
            return False
    return True


BAD = [
    (b"not json at all", "handover message is not JSON"),
    (b'{"op":"take","version":1,"ty', "handover message is not JSON"),
    (b"\xff\xfe{}", "handover message is not JSON"),
    (b"[1, 2]", "handover message is not an object with an op"),
    (b"[" * 4000, "handover message is not JSON"),  # nested deeper than json can parse
    (b'{"op": 7}', "handover message is not an object with an op"),
    (b'{"op":"launch"}', "unknown handover op 'launch'"),
    (b'{"op":"ready"}', "handover op 'ready' out of turn (expected take or upgrade)"),
    (b'{"op":"stopped","pid":1}', "handover op 'stopped' out of turn (expected take or upgrade)"),
    (b'{"op":"take","type":"stream"}', "handover 'take' message lacks a valid 'version'"),
    (b'{"op":"take","version":true,"type":"stream"}', "lacks a valid 'version'"),
    (b'{"op":"take","version":"1","type":"stream"}', "lacks a valid 'version'"),
    (b'{"op":"take","version":1,"type":null}', "lacks a valid 'type'"),
    (b'{"op":"take","version":2,"type":"stream"}', "handover protocol version 2"),
    (b'{"op":"take","version":1,"type":"dgram"}', "serves type=stream, not type=dgram"),
    (b'{"op":"upgrade"}', "cannot start its successor itself"),
    (b"x" * 9000, "handover message longer than 8192 bytes"),
]


@pytest.mark.parametrize(("packet", "reason"), BAD, ids=[r for _, r in BAD])
def test_a_bad_request_is_answered_and_the_server_serves_on(
    serving: tuple[Child, Path], packet: bytes, reason: str
) -> None:
    child, path = serving
    with raw_control(path) as conv:
        send(conv, packet)
        reply = answer(conv)
        assert reply is not None
        assert reply["op"] == "error"
        assert reason in str(reply["reason"])
        assert answer(conv) is None  # and it hung up
    assert ask(path, "stream", b"x") == f"{child.pid}:x".encode()


@pytest.mark.parametrize(
    ("packet", "count"),
    [
        (b'{"op":"take","version":1,"type":"stream"}', 1),  # a good request, but with an fd
        (b"garbage", 1),
        (b"", 1),  # a descriptor and no bytes at all
        (b'{"op":"take","version":1,"type":"stream"}', 3),  # more than any message carries
        (b"y" * 9000, 2),  # oversize, with descriptors
    ],
)
def test_descriptors_sent_to_the_server_are_closed(
    serving: tuple[Child, Path], packet: bytes, count: int
) -> None:
    child, path = serving
    pipes = [os.pipe() for _ in range(count)]
    try:
        with raw_control(path) as conv:
            send(conv, packet, [w for _, w in pipes])
            for _, w in pipes:
                os.close(w)
            reply = answer(conv)
            assert reply is None or reply["op"] == "error"
        assert closed_by_peer([r for r, _ in pipes]), "the server kept a descriptor it was sent"
    finally:
        for r, _ in pipes:
            os.close(r)
    assert ask(path, "stream", b"x") == f"{child.pid}:x".encode()


def test_a_peer_that_hangs_up_at_once_is_forgotten(serving: tuple[Child, Path]) -> None:
    child, path = serving
    for _ in range(20):
        raw_control(path).close()
    assert ask(path, "stream", b"x") == f"{child.pid}:x".encode()


def test_too_many_conversations_at_once(serving: tuple[Child, Path]) -> None:
    child, path = serving
    silent = [raw_control(path) for _ in range(MAX_CONVERSATIONS)]
    try:
        with raw_control(path) as extra:
            assert answer(extra) == {
                "op": "error",
                "reason": "too many handover requests at once; try again",
            }
        for _ in range(3):  # a successor is told so too, however its request races the answer
            with pytest.raises(udskit.HandoverError) as caught:
                udskit.Upgrader(path)
            assert str(caught.value) == (
                f"cannot take over {path}: too many handover requests at once; try again"
            )
    finally:
        for conv in silent:
            conv.close()
    assert ask(path, "stream", b"x") == f"{child.pid}:x".encode()


def test_zz_after_all_that_it_hands_over_and_leaked_nothing(serving: tuple[Child, Path]) -> None:
    child, path = serving
    with Child("messageserver", path, "stream") as successor:
        successor.expect(f"took over from pid {child.pid}")
        assert child.finish() == 0
        assert child.leaked() == "leaked []"
        assert successor.terminate() == 0
        assert successor.leaked() == "leaked []"
    assert not os.path.lexists(path)


# -- the successor's side: what a serving process passes must be a listener of its type --


def fake_server(path: Path, passes: Callable[[], tuple[bytes, list[int]]]) -> Talker:
    """A process posing as the serving one: it answers the first request with ``passes()``."""

    def run(say: Callable[[str], None]) -> None:
        with udskit.listen(path), socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as ctl:
            ctl.bind(str(control_path(path)))
            ctl.listen()
            say("serving")
            conv, _ = ctl.accept()
            conv.recv(8192)
            packet, fds = passes()
            send(conv, packet, fds)
            say("sent")
            select.select([conv], [], [], READY_TIMEOUT)  # until the successor hangs up

    return Talker(run)


def listener_message(kind: str = "stream") -> bytes:
    return b'{"op":"listener","type":"%s","pid":%d}' % (kind.encode(), os.getpid())


def a_pipe() -> tuple[bytes, list[int]]:
    return listener_message(), [os.pipe()[1]]


#: Sockets the fake server passes, kept open until it has sent them (it exits after).
_kept: list[socket.socket] = []


def a_connected_socket() -> tuple[bytes, list[int]]:
    _kept.extend(socket.socketpair())
    return listener_message(), [_kept[-1].fileno()]


def a_datagram_socket() -> tuple[bytes, list[int]]:
    _kept.append(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
    return listener_message(), [_kept[-1].fileno()]


def a_tcp_listener() -> tuple[bytes, list[int]]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    _kept.append(sock)
    return listener_message(), [sock.fileno()]


def no_descriptor() -> tuple[bytes, list[int]]:
    return listener_message(), []


def two_descriptors() -> tuple[bytes, list[int]]:
    return listener_message(), [os.pipe()[1], os.pipe()[1]]


def garbage_with_a_descriptor() -> tuple[bytes, list[int]]:
    return b"\x00garbage", [os.pipe()[1]]


@pytest.mark.parametrize(
    ("passes", "error"),
    [
        (a_pipe, "the serving process passed a descriptor that is not a socket"),
        (a_connected_socket, "the serving process passed a socket that is not listening"),
        (a_datagram_socket, "the serving process passed a socket that is a dgram socket, not"),
        (a_tcp_listener, "the serving process passed a socket that is not a Unix socket"),
        (no_descriptor, "handover 'listener' message came with 0 descriptors, not 1"),
        (two_descriptors, "carried 2 descriptors, more than"),
        (garbage_with_a_descriptor, "handover message is not JSON"),
    ],
)
def test_a_successor_refuses_what_is_not_a_listener(
    sockdir: Path, passes: Callable[[], tuple[bytes, list[int]]], error: str
) -> None:
    path = sockdir / "app.sock"
    with fake_server(path, passes) as old:
        assert old.line() == "serving"
        before = open_fds()
        with pytest.raises(udskit.HandoverError) as caught:
            udskit.Upgrader(path)
        assert open_fds() == before, "the successor kept a descriptor"
        message = str(caught.value)
        assert message.startswith(f"cannot take over {path}: ")
        assert error in message
        assert "\n" not in message
        assert old.line() == "sent"


def test_a_silent_caller_is_dropped(sockdir: Path) -> None:
    path = sockdir / "s.sock"
    with start_serving("server", path, "stream", "--hello-timeout", "0.2") as child:
        with raw_control(path) as conv:
            assert answer(conv) == {"op": "error", "reason": "no request within 0.2 s"}
            assert answer(conv) is None
        assert ask(path, "stream", b"x") == f"{child.pid}:x".encode()
        assert child.terminate() == 0
        assert child.leaked() == "leaked []"
