"""Faults in the middle of a large message read in place (blocking Channel): a timeout, a
signal, the peer leaving, descriptors late, other threads. Whole, or the channel says it
can deliver no more; never spliced. Real socketpairs, a hand-written peer."""

from __future__ import annotations

import array
import errno
import os
import resource
import signal
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import udskit
import udskit.channel
from udskit import Channel, ConnectionClosed, FrameTooLarge, ProtocolError, Timeout
from udskit.channel import DIRECT_READ_MIN
from udskit.freshbytes import FRESH_MIN
from udskit.proto import HEADER

from ..conftest import marked, vm_rss
from ..integration.children import run_in_child
from .scripted import ScriptedSocket

#: Bound on every wait, so that a regression fails instead of hanging.
PATIENCE = 20.0


class Interrupt(Exception):
    """What the test's signal handler raises."""


def sending(
    peer: socket.socket, *parts: bytes, go: threading.Event | None = None
) -> threading.Thread:
    """A thread that sends ``parts`` on ``peer`` (waiting for ``go`` before each after the
    first, if given), until the receiver goes; started."""

    def run() -> None:
        for i, part in enumerate(parts):
            if i and go is not None:
                assert go.wait(PATIENCE)
            try:
                peer.sendall(part)
            except (BrokenPipeError, ConnectionResetError):
                return

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def prime(peer: socket.socket, channel: Channel) -> None:
    """Send and receive one large message: the channel then reads the next header alone,
    and a large payload after it in place."""
    first = marked(DIRECT_READ_MIN, 1)
    sender = sending(peer, HEADER.pack(len(first)) + first)
    assert channel.recv() == first
    sender.join(PATIENCE)


@pytest.fixture
def alarm() -> Iterator[list[object]]:
    """SIGALRM's handler for the test: it calls what the list holds (if anything)."""
    todo: list[object] = []

    def handler(*_: object) -> None:
        if todo:
            action = todo.pop()
            action()  # type: ignore[operator]

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        yield todo
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_a_timeout_inside_a_large_message_resumes_it_whole() -> None:
    left, right = socket.socketpair()
    channel = Channel(right, max_frame=4 * DIRECT_READ_MIN)
    with left, channel:
        prime(left, channel)
        payload = marked(4 * DIRECT_READ_MIN, 2)
        frame = HEADER.pack(len(payload)) + payload
        go = threading.Event()
        sender = sending(left, frame[: len(frame) // 2], frame[len(frame) // 2 :], go=go)
        channel.settimeout(0.05)
        with pytest.raises(Timeout):
            channel.recv()
        channel.settimeout(PATIENCE)
        go.set()
        assert channel.recv() == payload
        sender.join(PATIENCE)


def test_a_signal_whose_handler_returns_leaves_the_message_whole(alarm: list[object]) -> None:
    left, right = socket.socketpair()
    channel = Channel(right, max_frame=4 * DIRECT_READ_MIN)
    with left, channel:
        prime(left, channel)
        payload = marked(4 * DIRECT_READ_MIN, 3)
        frame = HEADER.pack(len(payload)) + payload
        half = len(frame) // 2
        go = threading.Event()
        sender = sending(left, frame[:half], frame[half:], go=go)
        alarm.append(go.set)  # the handler lets the rest go: the read was interrupted
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        assert channel.recv() == payload
        sender.join(PATIENCE)


def _scripted(reads: list[Any]) -> tuple[socket.socket, ScriptedSocket, Channel]:
    """A raw peer, and a channel (primed) whose reads follow ``reads`` from now on."""
    left, right = socket.socketpair()
    scripted = ScriptedSocket(right, [])
    channel = Channel(scripted, max_frame=4 * DIRECT_READ_MIN)
    prime(left, channel)
    scripted.reads.extend(reads)
    return left, scripted, channel


def test_a_read_in_place_cut_short_by_a_signal_reads_on_into_the_same_object(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A signal handler that returns cuts a MSG_WAITALL read short: the rest goes into the
    # same bytes object. Made anew, it would copy all that came so far again, at every
    # signal (a 256 MiB message under a 1 kHz interval timer: 24 times as long).
    made: list[int] = []
    real = udskit.channel.fresh

    def fresh(size: int, **kwargs: bool) -> object:
        made.append(size)
        return real(size, **kwargs)

    monkeypatch.setattr(udskit.channel, "fresh", fresh)
    payload = marked(4 * DIRECT_READ_MIN, 12)
    left, scripted, channel = _scripted(["ok", ("short", 1000), ("short", 1), "ok"])
    with left, channel:
        sender = sending(left, HEADER.pack(len(payload)) + payload + HEADER.pack(1) + b"!")
        assert channel.recv() == payload
        assert channel.recv() == b"!"
        sender.join(PATIENCE)
    assert not scripted.reads  # every step of it really ran
    assert made == [len(payload)]


def test_an_error_after_part_of_a_read_in_place_loses_none_of_it() -> None:
    payload = marked(4 * DIRECT_READ_MIN, 13)
    frame = HEADER.pack(len(payload)) + payload
    again = BlockingIOError(errno.EAGAIN, "no more for now")
    left, scripted, channel = _scripted(["ok", ("short", 1000), again])
    with left, channel:
        sender = sending(left, frame)
        with pytest.raises(Timeout):
            channel.recv()
        assert channel.recv() == payload
        sender.join(PATIENCE)
    assert not scripted.reads


def test_descriptors_after_a_read_in_place_cut_short_go_with_the_bytes_before_them() -> None:
    # A signal cuts the read short, then descriptors end the next part of it: the bytes of
    # both parts go to the framing, in order, and the descriptors with the message.
    payload = marked(4 * DIRECT_READ_MIN, 15)
    head = HEADER.pack(len(payload)) + payload[:DIRECT_READ_MIN]
    rest = payload[DIRECT_READ_MIN:]
    left, scripted, channel = _scripted(["ok", ("short", 1000), "ok"])
    r, w = os.pipe()

    def send() -> None:
        left.sendall(head)
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]))]
        went = left.sendmsg([rest], rights)
        left.sendall(rest[went:])

    with left, channel:
        sender = threading.Thread(target=send)
        sender.start()
        try:
            message, fds = channel.recv_fds()
            sender.join(PATIENCE)
        finally:
            os.close(r)
            os.close(w)
        for fd in fds:
            os.close(fd)
        assert message == payload
        assert len(fds) == 1
    assert not scripted.reads


def test_a_signal_handler_exception_inside_a_read_in_place_ends_reading(
    alarm: list[object],
) -> None:
    left, right = socket.socketpair()
    channel = Channel(right, max_frame=4 * DIRECT_READ_MIN)
    with left, channel:
        prime(left, channel)
        payload = marked(4 * DIRECT_READ_MIN, 4)
        frame = HEADER.pack(len(payload)) + payload
        half = len(frame) // 2
        go = threading.Event()
        sender = sending(left, frame[:half], frame[half:] + HEADER.pack(5) + b"after", go=go)

        def interrupt() -> None:
            raise Interrupt

        alarm.append(interrupt)
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(Interrupt):
            channel.recv()
        go.set()
        for _ in range(2):
            with pytest.raises(ProtocolError, match="receive was interrupted"):
                channel.recv()
        left.shutdown(socket.SHUT_RDWR)
        sender.join(PATIENCE)


def test_large_small_large_back_to_back() -> None:
    left, right = socket.socketpair()
    channel = Channel(right, max_frame=FRESH_MIN + 1)
    big = [
        marked(DIRECT_READ_MIN, 5),
        b"s",
        marked(3 * DIRECT_READ_MIN + 1, 6),
        b"",
        marked(FRESH_MIN + 1, 7),
        marked(DIRECT_READ_MIN - 1, 8),
        b"end",
    ]
    data = b"".join(HEADER.pack(len(m)) + m for m in big)
    with left, channel:
        sender = sending(left, data)
        got = [channel.recv() for _ in big]
        sender.join(PATIENCE)
        assert [len(m) for m in got] == [len(m) for m in big]
        assert got == big


@pytest.mark.parametrize("extra", [0, 1], ids=["max_frame", "over"])
def test_max_frame_exactly_and_one_over(extra: int) -> None:
    size = 2 * DIRECT_READ_MIN
    left, right = socket.socketpair()
    channel = Channel(right, max_frame=size)
    with left, channel:
        prime(left, channel)
        payload = marked(size + extra, 9)
        sender = sending(left, HEADER.pack(len(payload)) + payload)
        if extra:
            with pytest.raises(FrameTooLarge):
                channel.recv()
            left.shutdown(socket.SHUT_RDWR)
        else:
            assert channel.recv() == payload
        sender.join(PATIENCE)


def test_two_threads_receiving_large_messages_each_get_whole_ones() -> None:
    left, right = udskit.pair(max_frame=5 * DIRECT_READ_MIN)
    messages = [marked(DIRECT_READ_MIN * (1 + i % 4) + i, i % 250 + 1) for i in range(24)]
    got: list[bytes] = []
    lock = threading.Lock()

    def reader() -> None:
        for _ in range(12):
            message = right.recv()
            with lock:
                got.append(message)

    with left, right:
        readers = [threading.Thread(target=reader) for _ in range(2)]
        for thread in readers:
            thread.start()
        left.send_many(messages)
        for thread in readers:
            thread.join(PATIENCE)
    assert sorted(got) == sorted(messages)


def test_a_peer_announcing_a_huge_message_and_sending_a_byte_costs_no_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    size = 1024 * 1024 * 1024
    left, right = socket.socketpair()
    rss: list[int] = []

    class Measured(socket.socket):
        def recvmsg_into(self, *args, **kwargs):  # type: ignore[no-untyped-def,override]
            got = super().recvmsg_into(*args, **kwargs)
            rss.append(vm_rss())
            return got

    measured = Measured(right.family, right.type, fileno=right.detach())
    channel = Channel(measured, max_frame=size)
    with left, channel:
        prime(left, channel)
        before = vm_rss()
        left.sendall(HEADER.pack(size) + b"x")
        left.shutdown(socket.SHUT_WR)
        with pytest.raises(ConnectionClosed):
            channel.recv()
    assert max(rss) - before < 64 * 1024 * 1024, (before, rss)


def test_a_message_received_in_place_is_not_written_by_later_reads() -> None:
    left, right = udskit.pair(max_frame=FRESH_MIN)
    first = marked(FRESH_MIN, 10)
    with left, right:
        prime(left.socket, right)
        sender = threading.Thread(target=left.send_many, args=([first, marked(FRESH_MIN, 11)],))
        sender.start()
        got = right.recv()
        copy = bytes(bytearray(got))
        assert right.recv() == marked(FRESH_MIN, 11)
        sender.join(PATIENCE)
        assert got == copy == first


def limit_address_space(headroom: int) -> None:
    """Let this process map at most ``headroom`` bytes more (as a container's limit, or
    strict overcommit, would): for a child process only."""
    with open("/proc/self/status") as status:
        size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (size + headroom, resource.RLIM_INFINITY))


@pytest.mark.parametrize("ahead", [False, True], ids=["header-alone", "read-ahead"])
def test_a_huge_announced_size_there_is_no_room_for_is_received_as_it_comes(
    ahead: bool,
) -> None:
    # The peer's word alone (a header) must not fail the receive where the process cannot
    # map that much: the message goes through the buffer, which holds what came.
    size = 1024 * 1024 * 1024

    def child() -> str:
        limit_address_space(256 * 1024 * 1024)
        left, right = socket.socketpair()
        channel = Channel(right, max_frame=size)
        first = marked(DIRECT_READ_MIN, 14)
        lie = HEADER.pack(size) + b"x"
        sender = sending(left, HEADER.pack(len(first)) + first + (lie if ahead else b""))
        assert channel.recv() == first
        sender.join(PATIENCE)
        if not ahead:
            left.sendall(lie)
        left.shutdown(socket.SHUT_WR)
        with pytest.raises(ConnectionClosed) as caught:
            channel.recv()
        return str(caught.value)

    assert f"mid-message: 5 of {size + 4} bytes received" in run_in_child(child)
