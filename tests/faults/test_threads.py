"""Several threads on one object: what each object promises to threads that share it.

Real sockets throughout: N threads send messages of varied sizes (many larger than the
socket buffer, so that the kernel takes them in parts) on one channel while others receive
and check that every message is whole, from one sender, in that sender's order; close() and
shutdown_write() come from another thread while threads are inside send, recv or accept.
Every message says who sent it, its number and a checksum of its body, so that a spliced,
shortened or misattributed one is never taken for a good one. Fault injection (a socket
whose call waits at a chosen point) only where a race cannot be met on purpose otherwise.
"""

from __future__ import annotations

import http.server
import os
import random
import select
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, Final

import pytest

import udskit
import udskit.channel
import udskit.wakeup
from udskit import ConnectionClosed
from udskit.proto.shm import SHARED_THRESHOLD
from udskit.sockfile import Claim
from udskit.wakeup import WakeUp

from .scripted import WAIT

_HEAD = struct.Struct(">IIII")  # sender, number, body length, crc32 of the body


def message(sender: int, number: int, size: int) -> bytes:
    """``size`` bytes (at least the header) that say who sent them, which of theirs this is,
    and how to check that the rest is theirs."""
    body = random.Random(sender * 1_000_003 + number).randbytes(max(0, size - _HEAD.size))
    return _HEAD.pack(sender, number, len(body), zlib.crc32(body)) + body


def check(data: bytes | memoryview) -> tuple[int, int]:
    """(sender, number) of a message made by ``message``; fails on any other bytes."""
    data = bytes(data)
    assert len(data) >= _HEAD.size, f"a message of {len(data)} bytes: shorter than its header"
    sender, number, length, crc = _HEAD.unpack_from(data)
    body = data[_HEAD.size :]
    assert len(body) == length, f"message {sender}/{number}: {len(body)} of {length} bytes"
    assert zlib.crc32(body) == crc, f"message {sender}/{number}: its body is not its own"
    assert data == message(sender, number, len(data)), f"message {sender}/{number} differs"
    return sender, number


def inside(thread: threading.Thread, function: str) -> None:
    """Wait (bounded) until ``thread`` is running ``function`` (or has ended): the point a
    test needs it to have reached, seen from its stack rather than guessed with a sleep."""
    for _ in range(20_000):
        if not thread.is_alive():
            return
        frame: FrameType | None = sys._current_frames().get(thread.ident or 0)
        while frame is not None:
            if frame.f_code.co_name == function:
                return
            frame = frame.f_back
        threading.Event().wait(0.0005)
    pytest.fail(f"{thread.name} never reached {function}()")


class Outcome:
    """What a call in another thread returned or raised."""

    def __init__(self, call: Callable[[], object]) -> None:
        self.value: object = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self.thread.start()

    def _run(self, call: Callable[[], object]) -> None:
        try:
            self.value = call()
        except BaseException as exc:  # reported by the test
            self.error = exc

    def ended(self) -> BaseException | None:
        """Wait (bounded) for the call to end; what it raised, if anything."""
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "the call never returned"
        return self.error

    def result(self) -> object:
        error = self.ended()
        if error is not None:
            raise error
        return self.value


# -- many senders, many receivers -----------------------------------------------------------

#: Sizes the senders pick from: small, around a page, over the 64 KiB socket buffers the
#: tests ask for (the kernel takes those in parts), and over the shared-memory threshold.
_SIZES: Final = (16, 1000, 9000, 100_000, 300_000, 1_200_000)
#: A seqpacket message goes whole into the socket buffer, which holds about 200 KiB here.
_PACKET_SIZES: Final = (16, 1000, 9000, 40_000)
_SENDERS: Final = 4
_PER_SENDER: Final = 24
#: The number of a sender's last message: it has sent all the others.
_END: Final = 0xFFFF_FFFF


def _fd_tag(fd: int) -> tuple[int, int]:
    """What the pipe a descriptor reads from says: the (sender, number) it was sent with."""
    data = os.read(fd, 8)
    return struct.unpack(">II", data) if len(data) == 8 else (-1, -1)  # type: ignore[return-value]


def _send_all(
    channel: udskit.Channel, sender: int, sizes: tuple[int, ...], ops: str, *, end: bool = False
) -> int:
    """Send _PER_SENDER messages (or a few more, a batch at a time) on ``channel``, by the
    ways ``ops`` names, then (``end``) a last message numbered _END; return how many
    before that. (Descriptors go through the socket, never the shared-memory pool: on
    seqpacket, with a message that fits a packet.)"""
    pick = random.Random(sender)
    number = 0
    while number < _PER_SENDER:
        how = pick.choice(ops.split(","))
        size = pick.choice(sizes)
        if how == "send_many":
            batch = [message(sender, number + i, pick.choice(sizes[:3])) for i in range(4)]
            channel.send_many(batch)
            number += len(batch)
            continue
        data = message(sender, number, size)
        if how == "send_fds":
            if channel.type == "seqpacket":
                data = message(sender, number, min(size, _PACKET_SIZES[-1]))
            read_end, write_end = os.pipe()
            try:
                os.write(write_end, struct.pack(">II", sender, number))
                channel.send_fds(data, [read_end])
            finally:
                os.close(read_end)
                os.close(write_end)
        elif how == "loan":
            loan = channel.loan(len(data))
            loan[:] = data
            channel.send(loan)
        else:
            channel.send(data)
        number += 1
    if end:
        channel.send(message(sender, _END, 16))
    return number


def _kinds() -> list[object]:
    return [
        pytest.param("stream", False, "send,send_many,send_fds", id="stream"),
        pytest.param("stream", True, "send,send_many,send_fds,loan", id="stream-shm"),
        pytest.param("seqpacket", False, "send,send_fds", id="seqpacket"),
        pytest.param("seqpacket", True, "send,send_fds,loan", id="seqpacket-shm"),
    ]


def _small_buffered_pair(
    kind: str, shared_memory: bool
) -> tuple[udskit.Channel, udskit.Channel, tuple[int, ...]]:
    """Two ends with 64 KiB socket buffers (so that large messages go in parts), and the
    sizes their messages may have (a seqpacket one goes whole into the buffer)."""
    left, right = udskit.pair(
        kind, sndbuf=64 * 1024, rcvbuf=64 * 1024, max_frame=2 * 1024 * 1024,
        shared_memory=shared_memory,
    )  # fmt: skip
    sizes = _PACKET_SIZES if kind == "seqpacket" and not shared_memory else _SIZES
    return left, right, sizes


@pytest.mark.parametrize(("kind", "shared_memory", "ops"), _kinds())
def test_threads_sending_on_one_channel_each_message_whole_and_with_its_descriptors(
    kind: str, shared_memory: bool, ops: str
) -> None:
    left, right, sizes = _small_buffered_pair(kind, shared_memory)
    with left, right:
        right.settimeout(WAIT)
        senders = [
            Outcome(lambda t=t: _send_all(left, t, sizes, ops, end=True)) for t in range(_SENDERS)
        ]
        last = [-1] * _SENDERS
        ended = 0
        while ended < _SENDERS:  # bounded: a message missing makes recv() time out
            data, fds = right.recv_fds()
            sender, number = check(data)
            try:
                if fds:  # only a send_fds() message brings one: its own
                    assert len(fds) == 1
                    assert _fd_tag(fds[0]) == (sender, number), "a descriptor changed message"
            finally:
                for fd in fds:
                    os.close(fd)
            if number == _END:
                ended += 1
                continue
            assert number > last[sender], f"sender {sender}: {number} after {last[sender]}"
            last[sender] = number
        counts = [o.result() for o in senders]
        assert [n + 1 for n in last] == counts


@pytest.mark.parametrize(("kind", "shared_memory", "ops"), _kinds())
def test_threads_receiving_on_one_channel_each_message_to_exactly_one(
    kind: str, shared_memory: bool, ops: str
) -> None:
    # Two senders and three or four receivers at once, each receiver by another call (recv,
    # recv_fds, recv_many; recv_view with shared memory): every message reaches exactly one
    # of them, whole; then the end reaches each.
    left, right, sizes = _small_buffered_pair(kind, shared_memory)
    lock = threading.Lock()
    got: list[tuple[int, int]] = []

    def receive(how: str) -> None:
        right.settimeout(WAIT)
        while True:
            try:
                if how == "recv_many":
                    batch = right.recv_many()
                elif how == "recv_fds":
                    data, fds = right.recv_fds()
                    for fd in fds:
                        os.close(fd)
                    batch = [data]
                elif how == "recv_view":
                    with right.recv_view() as view:
                        batch = [bytes(view)]
                else:
                    batch = [right.recv()]
            except ConnectionClosed as exc:
                if exc.mid_message:
                    raise
                return
            checked = [check(data) for data in batch]
            with lock:
                got.extend(checked)

    with left, right:
        calls = ["recv", "recv_fds", "recv_many"] + (["recv_view"] if shared_memory else [])
        receivers = [Outcome(lambda how=how: receive(how)) for how in calls]
        senders = [Outcome(lambda t=t: _send_all(left, t, sizes, ops)) for t in range(2)]
        counts = [o.result() for o in senders]
        left.shutdown_write()
        for o in receivers:
            o.result()
    assert sorted(got) == [(t, n) for t in range(2) for n in range(int(counts[t]))]  # type: ignore[call-overload]


@pytest.mark.parametrize("shared_memory", [False, True], ids=["socket", "shared-memory"])
def test_two_threads_talking_both_ways_on_one_channel_each(shared_memory: bool) -> None:
    # Both ends send and receive at once, from two threads each: each end's sender waits
    # for room while the other end's is busy too (with shared memory: for its pool, whose
    # releases come from the receiving thread of the other end).
    left, right, _ = _small_buffered_pair("stream", shared_memory)

    def drain(channel: udskit.Channel, sender: int) -> int:
        channel.settimeout(WAIT)
        count = 0
        while True:
            try:
                with channel.recv_view() as view:
                    assert check(view) == (sender, count)
            except ConnectionClosed:
                return count
            count += 1

    def send(channel: udskit.Channel, sender: int) -> None:
        _send_all(channel, sender, _SIZES, "send,loan" if shared_memory else "send")
        channel.shutdown_write()

    with left, right:
        work = [
            Outcome(lambda: drain(right, 0)),
            Outcome(lambda: drain(left, 1)),
            Outcome(lambda: send(left, 0)),
            Outcome(lambda: send(right, 1)),
        ]
        assert [o.result() for o in work] == [_PER_SENDER, _PER_SENDER, None, None]


@pytest.mark.parametrize(
    ("kind", "shared_memory"),
    [("stream", False), ("seqpacket", False), ("seqpacket", True), ("dgram", False)],
)
def test_a_batch_from_send_many_is_never_split_by_another_threads_messages(
    kind: str, shared_memory: bool
) -> None:
    # send_many() is one unit on every socket type: another thread's message (or batch)
    # goes before it or after it, never between two of its messages.
    left, right = udskit.pair(kind, max_frame=2 * 1024 * 1024, shared_memory=shared_memory)
    batches, size = 4, 60
    # With shared memory, one message in six goes through the pool.
    sizes = (16, 500, 16, 500, 16, SHARED_THRESHOLD) if shared_memory else (16, 500)

    def send(sender: int) -> None:
        for batch in range(batches):
            left.send_many(
                message(sender, batch * size + i, sizes[i % len(sizes)]) for i in range(size)
            )

    with left, right:
        right.settimeout(WAIT)
        senders = [Outcome(lambda t=t: send(t)) for t in range(3)]
        got = [check(right.recv()) for _ in range(3 * batches * size)]
        for sender in senders:
            sender.result()
    for start in range(0, len(got), size):
        batch = got[start : start + size]
        assert {sender for sender, _ in batch} == {batch[0][0]}, "a batch was split"
        assert [number for _, number in batch] == list(range(batch[0][1], batch[0][1] + size))


@pytest.mark.parametrize(("kind", "shared_memory", "ops"), _kinds())
def test_sends_timing_out_in_some_threads_never_splice_another_threads_message(
    kind: str, shared_memory: bool, ops: str
) -> None:
    # Three threads send on a channel with a short timeout to a peer that reads nothing
    # until they are done: some sends time out before any byte went (the channel stays
    # whole), some part-way (a stream is then broken: the peer sees it end there). Either
    # way the peer receives exactly the messages whose send returned, each whole, and
    # nothing of the others; then the end.
    left, right, sizes = _small_buffered_pair(kind, shared_memory)
    left.settimeout(0.02)
    done: list[tuple[int, int]] = []
    lock = threading.Lock()

    def send(sender: int) -> None:
        pick = random.Random(sender)
        for number in range(12):
            try:
                left.send(message(sender, number, pick.choice(sizes)))
            except udskit.Timeout:
                continue
            except ConnectionClosed as exc:  # broken by another thread's send
                if not exc.mid_message:
                    raise
                return
            with lock:
                done.append((sender, number))

    with left, right:
        for sender in [Outcome(lambda t=t: send(t)) for t in range(3)]:
            sender.result()
        try:
            left.shutdown_write()
        except ConnectionClosed as exc:  # broken: the peer sees the stream cut off instead
            if not exc.mid_message:
                raise
        right.settimeout(WAIT)
        received = []
        while True:
            try:
                received.append(check(right.recv()))
            except ConnectionClosed:
                break
    assert sorted(received) == sorted(done)


# -- shutdown_write() from another thread ---------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "shared_memory"),
    [("stream", False), ("stream", True), ("seqpacket", False), ("seqpacket", True)],
)
def test_shutdown_write_lets_another_threads_send_finish_whole(
    kind: str, shared_memory: bool
) -> None:
    # A sender is still putting its message on the wire (larger than both socket buffers,
    # or a packet waiting for room) when another thread half-closes. The half-close waits
    # for it: the peer gets the message whole, then the end; the sender is not told that
    # the peer closed, nor is the channel broken under it.
    left, right = udskit.pair(kind, sndbuf=64 * 1024, rcvbuf=64 * 1024, shared_memory=shared_memory)
    with left, right:
        queued: list[bytes] = []
        if kind == "stream":
            # With shared memory, one under the pool's threshold: it goes through the socket.
            big = message(1, 0, 200_000 if shared_memory else 3_000_000)
        else:
            big = message(1, 0, 4000)
            left.settimeout(0)
            for number in range(1, 10_000):  # bounded: until the socket is full
                try:
                    left.send(message(0, number, 4000))
                except udskit.Timeout:
                    break
                queued.append(message(0, number, 4000))
            left.settimeout(None)
        sending = Outcome(lambda: left.send(big))
        inside(sending.thread, "_write" if kind == "stream" else "_send_packet")
        shutting = Outcome(left.shutdown_write)
        inside(shutting.thread, "shutdown_write")
        late = Outcome(lambda: left.send(message(2, 0, 100)))  # after the half-close, or before
        inside(late.thread, "send")
        right.settimeout(WAIT)
        assert [right.recv() for _ in queued] == queued
        assert right.recv() == big
        sending.result()
        shutting.result()
        error = late.ended()
        if error is None:  # it went before the half-close
            assert check(right.recv()) == (2, 0)
        else:  # the half-close came first: this one says so
            assert isinstance(error, ConnectionClosed)
            assert "sending side was shut down" in str(error)
        with pytest.raises(ConnectionClosed) as end:
            right.recv()
        assert not end.value.mid_message


# -- descriptor numbers reused after close() ------------------------------------------------


class _WriteHeldUp:
    """``os`` for udskit.wakeup, whose write() stops between taking the descriptor number
    and the system call (where a thread may lose the CPU) until ``go`` is set, or briefly
    (the fixed code holds close() back meanwhile, so the test must not wait for it)."""

    def __init__(self) -> None:
        self.writing = threading.Event()
        self.go = threading.Event()

    def __getattr__(self, name: str) -> object:
        return getattr(os, name)

    def write(self, fd: int, data: bytes) -> int:
        self.writing.set()
        self.go.wait(0.2)
        return os.write(fd, data)


def test_a_wake_up_racing_close_never_writes_to_a_reused_descriptor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Server.stop() (any thread, a signal handler) wakes the serving thread through a pipe
    # that the end of serve_forever() closes. A wake() that took the pipe's number just
    # before close() must not write after it: the next open() gets that number.
    wakeup = WakeUp()
    held = _WriteHeldUp()
    monkeypatch.setattr(udskit.wakeup, "os", held)
    waking = Outcome(wakeup.wake)
    assert held.writing.wait(WAIT)
    old = (wakeup.fd, wakeup.write_fd)

    def close_and_reopen() -> tuple[int, int]:
        wakeup.close()
        reused = os.pipe()  # what another thread opens next
        held.go.set()
        return reused

    reopened = Outcome(close_and_reopen)
    waking.result()
    read_end, write_end = reopened.result()  # type: ignore[misc]
    try:
        assert (read_end, write_end) == old, "the numbers were not reused: nothing tested"
        os.set_blocking(read_end, False)
        with pytest.raises(BlockingIOError):
            os.read(read_end, 1)  # the wake-up's byte did not land in the new pipe
    finally:
        os.close(read_end)
        os.close(write_end)


class _PollHeldUp:
    """``select`` for udskit.channel, whose first wait for room to write stops after the
    socket's number is registered and before poll() (where a thread may lose the CPU),
    until ``go`` is set, or briefly (the fixed close() waits for the writer meanwhile)."""

    def __init__(self) -> None:
        self.waiting = threading.Event()
        self.go = threading.Event()

    def __getattr__(self, name: str) -> object:
        return getattr(select, name)

    def poll(self) -> object:
        real = select.poll()
        held = self

        class Poll:
            def register(self, fd: object, events: int) -> None:
                real.register(fd, events)  # type: ignore[arg-type]
                self.writing = events == select.POLLOUT

            def poll(self, timeout: float | None = None) -> list[tuple[int, int]]:
                if self.writing and not held.waiting.is_set():
                    held.waiting.set()
                    held.go.wait(0.2)
                return real.poll(timeout)

        return Poll()


def test_close_wakes_a_writer_whose_descriptor_number_was_reused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A sender found the socket full and registered its number to wait for room; before it
    # waits, another thread closes the channel, and a third opens a listening socket, which
    # gets that number and is never writable. close() must not give the number up while a
    # sender may still wait on it: the sender would sleep out its whole timeout there.
    held = _PollHeldUp()
    monkeypatch.setattr(udskit.channel, "select", held)
    left, right = udskit.pair(sndbuf=64 * 1024, rcvbuf=64 * 1024)
    left.settimeout(600.0)
    number = left.fileno()
    sending = Outcome(lambda: left.send(message(1, 0, 3_000_000)))  # the peer never reads
    assert held.waiting.wait(WAIT)

    def close_and_reopen() -> socket.socket:
        left.close()
        reused = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # what another thread opens
        reused.bind("")  # autobind: an abstract name of its own
        reused.listen()
        held.go.set()
        return reused

    reopening = Outcome(close_and_reopen)
    with right, reopening.result() as reused:  # type: ignore[attr-defined]
        assert reused.fileno() == number, "the number was not reused: nothing tested"
        error = sending.ended()
        assert isinstance(error, ConnectionClosed)
        assert "this channel is closed" in str(error)


def _meet(barrier: threading.Barrier | None) -> None:
    """Wait for the other thread at ``barrier``; alone (it never comes), go on."""
    if barrier is not None:
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            pass


class _SeenOpenByTwo(udskit.Channel):
    """A channel whose ``_closed`` flag, while still False, two threads read at once (each
    waits for the other at ``racing``): the moment between a close()'s look at the flag
    and its setting of it, held open."""

    __slots__ = ()
    racing: threading.Barrier | None = None

    @property  # type: ignore[override]
    def _closed(self) -> bool:
        value: bool = udskit.Channel._closed.__get__(self)  # type: ignore[attr-defined]
        if not value:
            _meet(_SeenOpenByTwo.racing)
        return value

    @_closed.setter
    def _closed(self, value: bool) -> None:
        udskit.Channel._closed.__set__(self, value)  # type: ignore[attr-defined]


class _ReleasedByTwo(Claim):
    """A claim whose release() two threads enter at once, as _SeenOpenByTwo's close()s."""

    __slots__ = ()
    racing: threading.Barrier | None = None

    @property  # type: ignore[override]
    def _directory(self) -> object:
        value = Claim._directory.__get__(self)  # type: ignore[attr-defined]
        if value is not None:
            _meet(_ReleasedByTwo.racing)
        return value

    @_directory.setter
    def _directory(self, value: object) -> None:
        Claim._directory.__set__(self, value)  # type: ignore[attr-defined]


def test_two_threads_closing_one_channel_close_each_descriptor_once(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A datagram client holds its socket, its reply path's directory and socket file (its
    # claim's descriptors). Two threads closing it at once must close each once: a second
    # close of a number that another thread's open() got meanwhile closes that file.
    closed: list[int] = []
    real_close = os.close

    def recording(fd: int) -> None:
        closed.append(fd)
        real_close(fd)

    with udskit.listen(sockdir / "dg.sock", type="dgram"):
        channel = udskit.connect(sockdir / "dg.sock", type="dgram")
        claim = channel._claim  # type: ignore[attr-defined]
        assert claim is not None, "a datagram client claims its reply path"
        channel.__class__ = _SeenOpenByTwo
        claim.__class__ = _ReleasedByTwo
        monkeypatch.setattr(_SeenOpenByTwo, "racing", threading.Barrier(2, timeout=0.5))
        monkeypatch.setattr(_ReleasedByTwo, "racing", threading.Barrier(2, timeout=0.5))
        monkeypatch.setattr(os, "close", recording)
        closers = [Outcome(channel.close) for _ in range(2)]
        errors = [closer.ended() for closer in closers]
        monkeypatch.undo()
    assert errors == [None, None], errors
    assert channel.closed
    assert closed, "nothing was closed: nothing tested"
    assert len(closed) == len(set(closed)), f"closed more than once: {sorted(closed)}"


@pytest.mark.parametrize("kind", ["stream", "seqpacket"])
def test_close_wakes_a_sender_waiting_for_room_in_its_shared_memory_pool(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One thread reads, another waits for the peer (which never releases) to free a slot of
    # the pool. close() from a third waits for the sender to leave before it closes the
    # socket: the sender must see the close, not wait on for room that cannot come.
    monkeypatch.setattr(udskit.channel, "CLOSE_WAIT", 3600.0)  # a sender that stays hangs
    left, right = udskit.pair(kind, shared_memory=SHARED_THRESHOLD)
    with right:
        reading = Outcome(left.recv)
        inside(reading.thread, "_read")
        left.send(message(1, 0, SHARED_THRESHOLD))  # fills the pool: the peer holds it
        waiting = Outcome(lambda: left.send(message(1, 1, SHARED_THRESHOLD)))
        inside(waiting.thread, "wait_for_space")
        Outcome(left.close).result()
        for call in (reading, waiting):
            error = call.ended()
            assert isinstance(error, ConnectionClosed)
            assert "this channel is closed" in str(error)


# -- servers stopped from other threads ------------------------------------------------------


def _server(
    kind: str, path: Path, reply: Callable[[bytes], bytes]
) -> udskit.Server | udskit.MessageServer:
    """A server of ``kind`` whose handler answers each message with ``reply(message)``."""
    if kind == "Server":
        return udskit.Server(path, lambda ch: [ch.send(reply(m)) for m in ch])
    workers = 1 if kind == "MessageServer-workers" else 0
    return udskit.MessageServer(path, lambda c, m: reply(m), workers=workers)


@pytest.mark.parametrize("kind", ["Server", "MessageServer", "MessageServer-workers"])
def test_close_from_another_thread_returns_once_the_server_has_stopped(
    kind: str, sockdir: Path
) -> None:
    # A handler is still at work when another thread closes the server. serve_forever()
    # ends only after it (or its grace) is over, and so does close(): when it returns, the
    # listener is closed, the socket file gone, and no handler of that server still runs.
    path = sockdir / "s.sock"
    handling, release, handled = threading.Event(), threading.Event(), threading.Event()

    def reply(data: bytes) -> bytes:
        handling.set()
        release.wait(WAIT)
        handled.set()
        return data

    server = _server(kind, path, reply)
    serving = Outcome(server.serve_forever)
    with udskit.connect(path, timeout=WAIT) as client:
        client.send(b"hello")
        assert handling.wait(WAIT)
        closing = Outcome(server.close)
        inside(closing.thread, "wait")  # waiting for serve_forever(), or returned already
        assert closing.thread.is_alive(), "close() returned while a handler still ran"
        release.set()
        closing.result()
        assert handled.is_set()
        assert server.listener.closed
        assert not path.exists()
        with udskit.listen(path):  # the path is free for the next server at once
            pass
        closing = Outcome(server.close)  # and again, from two threads: both return
        server.close()
        closing.result()
    serving.result()


@pytest.mark.parametrize("kind", ["Server", "MessageServer", "MessageServer-workers"])
def test_stop_from_several_threads_at_once_and_again_after_the_end(
    kind: str, sockdir: Path
) -> None:
    path = sockdir / "s.sock"
    server = _server(kind, path, lambda data: data)
    serving = Outcome(server.serve_forever)
    with udskit.connect(path, timeout=WAIT) as client:
        client.send(b"hello")
        assert client.recv() == b"hello"
        stoppers = [Outcome(server.stop) for _ in range(4)]
        for stopper in stoppers:
            stopper.result()
        serving.result()
        assert not path.exists()
        server.stop()  # after the end: nothing to wake, nothing written anywhere
        server.close()


@pytest.mark.parametrize("kind", ["Server", "MessageServer", "MessageServer-workers"])
def test_close_from_a_handler_stops_the_server_without_waiting_for_itself(
    kind: str, sockdir: Path
) -> None:
    path = sockdir / "s.sock"
    made: list[udskit.Server | udskit.MessageServer] = []

    def reply(data: bytes) -> bytes:
        made[0].close()  # returns at once: serve_forever() ends after this handler
        return data

    made.append(_server(kind, path, reply))
    serving = Outcome(made[0].serve_forever)
    with udskit.connect(path, timeout=WAIT) as client:
        client.send(b"hello")
        serving.result()
        assert not path.exists()


# -- listeners shared by threads ------------------------------------------------------------


def test_threads_accepting_on_one_listener_each_client_to_exactly_one(sockdir: Path) -> None:
    path = sockdir / "l.sock"
    clients_n = 24
    with udskit.listen(path) as listener:
        lock = threading.Lock()
        accepted: list[bytes] = []
        errors: list[BaseException] = []

        def accept() -> None:
            while True:
                try:
                    channel = listener.accept()
                except ConnectionClosed:
                    return  # close() woke us
                except BaseException as exc:  # reported below
                    errors.append(exc)
                    return
                with channel:
                    channel.settimeout(WAIT)
                    hello = channel.recv()
                    channel.send(hello)
                with lock:
                    accepted.append(hello)

        acceptors = [Outcome(accept) for _ in range(4)]
        for number in range(clients_n):
            with udskit.connect(path, timeout=WAIT) as client:
                client.send(message(number, 0, 100))
                assert client.recv() == message(number, 0, 100)
        for acceptor in acceptors:
            inside(acceptor.thread, "accept")
        listener.close()  # wakes the four, blocked in accept()
        for acceptor in acceptors:
            acceptor.result()
    assert not errors
    assert sorted(check(m) for m in accepted) == [(n, 0) for n in range(clients_n)]


class _AcceptHeldUp(socket.socket):
    """A listening socket whose accept() takes its descriptor number, then stops (where a
    thread may lose the CPU between the socket module's read of the number and the system
    call) until ``go`` is set, or briefly (the fixed close() waits for it meanwhile)."""

    def __init__(self, real: socket.socket) -> None:
        super().__init__(real.family, real.type, fileno=real.detach())
        self.accepting = threading.Event()
        self.go = threading.Event()

    def accept(self) -> tuple[socket.socket, object]:
        number = self.fileno()
        self.accepting.set()
        self.go.wait(0.2)
        borrowed = socket.socket(self.family, self.type, fileno=number)
        try:
            return borrowed.accept()
        finally:
            borrowed.detach()


def test_close_never_lets_an_accept_in_another_thread_take_a_reused_descriptor(
    sockdir: Path,
) -> None:
    # A thread in accept() has the listener's number; before its system call, another
    # thread closes the listener and a third listens on a new socket, which gets that
    # number, and a client connects there. close() must not give the number up while an
    # accept() may still use it: that accept() would take (and, seeing its listener
    # closed, hang up on) the other listener's client.
    listener = udskit.listen(sockdir / "l.sock")
    sock = _AcceptHeldUp(listener.socket)
    listener._sock = sock
    number = sock.fileno()
    accepting = Outcome(listener.accept)
    assert sock.accepting.wait(WAIT)
    other_path = os.fspath(sockdir / "other.sock")

    def close_and_reopen() -> tuple[socket.socket, socket.socket]:
        listener.close()
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # another thread's
        other.bind(other_path)
        other.listen()
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(other_path)
        sock.go.set()
        return other, client

    other, client = Outcome(close_and_reopen).result()  # type: ignore[misc]
    with other, client:
        assert other.fileno() == number, "the number was not reused: nothing tested"
        error = accepting.ended()
        assert isinstance(error, ConnectionClosed)
        assert "is closed" in str(error)
        other.settimeout(WAIT)
        served, _ = other.accept()  # the other listener's client is still its own
        with served:
            client.sendall(b"hello")
            assert served.recv(5) == b"hello"


class _RecvHeldUp(socket.socket):
    """A datagram socket whose recvmsg_into() takes its descriptor number, then stops
    (as _AcceptHeldUp's accept() does)."""

    def __init__(self, real: socket.socket) -> None:
        super().__init__(real.family, real.type, fileno=real.detach())
        self.receiving = threading.Event()
        self.go = threading.Event()

    def recvmsg_into(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        number = self.fileno()
        self.receiving.set()
        self.go.wait(0.2)
        borrowed = socket.socket(self.family, self.type, fileno=number)
        try:
            return borrowed.recvmsg_into(*args, **kwargs)
        finally:
            borrowed.detach()


def test_close_never_lets_a_recv_in_another_thread_take_a_reused_descriptor(
    sockdir: Path,
) -> None:
    # As above, for a datagram listener: the held-up recv() must not read the datagram
    # that a client sent to the socket that got the listener's number.
    listener = udskit.listen(sockdir / "d.sock", type="dgram")
    sock = _RecvHeldUp(listener.socket)
    listener._sock = sock
    number = sock.fileno()
    receiving = Outcome(listener.recv)
    assert sock.receiving.wait(WAIT)
    other_path = os.fspath(sockdir / "other.sock")

    def close_and_reopen() -> tuple[socket.socket, socket.socket]:
        listener.close()
        other = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # another thread's
        other.bind(other_path)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        client.sendto(b"hello", other_path)
        sock.go.set()
        return other, client

    other, client = Outcome(close_and_reopen).result()  # type: ignore[misc]
    with other, client:
        assert other.fileno() == number, "the number was not reused: nothing tested"
        error = receiving.ended()
        assert isinstance(error, ConnectionClosed)
        assert "is closed" in str(error)
        other.settimeout(WAIT)
        assert other.recv(100) == b"hello"  # the other socket's datagram is still its own


@pytest.mark.parametrize("kind", ["stream", "dgram"])
def test_close_from_a_signal_handler_ends_the_accept_or_recv_it_interrupted(
    kind: str, sockdir: Path
) -> None:
    # The common way out of `for channel in listener:` on SIGTERM. close() waits for other
    # threads inside a call to leave, never for the thread whose call the handler
    # interrupted: that one can leave only after the handler returns.
    listener = udskit.listen(sockdir / "l.sock", type=kind)  # type: ignore[call-overload]
    main = threading.main_thread()
    assert threading.current_thread() is main
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: listener.close())
    try:
        done = threading.Event()

        def interrupt() -> None:
            inside(main, "accept" if kind == "stream" else "_recv")
            # Again until the call has ended (bounded): a signal that comes just before the
            # blocking system call starts is handled only once that call returns.
            for _ in range(1000):
                signal.pthread_kill(main.ident or 0, signal.SIGUSR1)
                if done.wait(0.01):
                    return

        interrupting = Outcome(interrupt)
        wait = listener.accept if kind == "stream" else listener.recv
        try:
            with pytest.raises(ConnectionClosed, match="is closed"):
                wait()
        finally:
            done.set()
        interrupting.result()
        assert listener.closed
        assert not (sockdir / "l.sock").exists()
    finally:
        signal.signal(signal.SIGUSR1, previous)
        listener.close()


class _SignalledAfterRecv:
    """A datagram listener's socket whose first recvmsg_into() raises SIGUSR1 once the
    datagram is in the buffer: the handler runs just where a real signal's may, between
    the system call and the copy out of the buffer."""

    def __init__(self, sock: socket.socket) -> None:
        self._real = sock
        self._fired = False

    def recvmsg_into(self, *args: Any) -> Any:
        got = self._real.recvmsg_into(*args)
        if not self._fired:
            self._fired = True
            signal.raise_signal(signal.SIGUSR1)
        return got

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def test_a_recv_from_a_signal_handler_never_overwrites_the_datagram_it_interrupted(
    sockdir: Path,
) -> None:
    listener = udskit.listen(sockdir / "d.sock", type="dgram")
    said: list[str] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        try:
            said.append(listener.recv().data.decode())
        except RuntimeError as exc:
            said.append(str(exc))

    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        with udskit.connect(sockdir / "d.sock", type="dgram") as client:
            client.send(b"the first, longer one")
            client.send(b"second")
            listener._sock = _SignalledAfterRecv(listener.socket)  # type: ignore[assignment]
            first = listener.recv()
            assert first.data == b"the first, longer one"
            (refusal,) = said
            assert "\n" not in refusal
            assert "called inside another recv() of the same thread" in refusal
            assert listener.recv().data == b"second"  # still there, for the next recv()
    finally:
        signal.signal(signal.SIGUSR1, previous)
        listener.close()


# -- the HTTP client -------------------------------------------------------------------------


class _EchoPath(http.server.BaseHTTPRequestHandler):
    """Answers each GET with its path, many times over (a body of some kilobytes)."""

    protocol_version = "HTTP/1.1"  # keep-alive: the client's pool reuses connections

    def do_GET(self) -> None:
        body = self.path.encode() * 300
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        conn, _ = self.socket.accept()
        return conn, ("unix", 0)  # http.server logs a (host, port) client address


def test_threads_sharing_one_http_client_each_get_their_own_answer(sockdir: Path) -> None:
    pytest.importorskip("httpx")
    import udskit.http

    path = os.fspath(sockdir / "h.sock")
    with _UnixHTTPServer(path, _EchoPath) as server:
        serving = Outcome(server.serve_forever)

        def get_all(client: object, thread: int) -> None:
            for number in range(40):
                target = f"/{thread}/{number}"
                if client is None:
                    answer = udskit.http.request(path, target, timeout=WAIT)
                    status, body = answer.head.status, answer.body
                else:
                    response = client.get(target)  # type: ignore[attr-defined]
                    status, body = response.status_code, response.content
                assert status == 200
                assert body == target.encode() * 300, "an answer to another request"

        with udskit.http.client(path, timeout=WAIT) as client:
            users = [Outcome(lambda t=t: get_all(client, t)) for t in range(6)]
            users += [Outcome(lambda t=t: get_all(None, t)) for t in range(6, 8)]
            for user in users:
                user.result()
        server.shutdown()
        serving.result()


#: A threaded program that forks while another thread is inside accept() (or recv()) on
#: its listener; the child closes its copy (as a child that serves one client does) and
#: prints how long that took. CLOSE_WAIT is made long, so that a wait for the parent's
#: thread, which the child does not have, cannot pass unseen.
FORKED_CLOSE = """
import os, sys, threading
import udskit, udskit.listening

path, kind = sys.argv[1], sys.argv[2]
udskit.listening.CLOSE_WAIT = 20.0
listener = udskit.listen(path, type=kind)

def wait():
    try:
        listener.accept() if kind != "dgram" else listener.recv()
    except udskit.ConnectionClosed:
        pass

thread = threading.Thread(target=wait)
thread.start()
for _ in range(10_000):  # bounded: until the thread sleeps in the call (or its lock)
    with open(f"/proc/self/task/{thread.native_id}/stat") as stat:
        if stat.read().rsplit(")", 1)[1].split()[0] == "S":
            break
pid = os.fork()
if pid == 0:
    started = udskit.listening.time.monotonic()
    listener.close()
    print(f"{udskit.listening.time.monotonic() - started:.3f}", flush=True)
    os._exit(0)
os.waitpid(pid, 0)
listener.close()
thread.join()
"""


@pytest.mark.parametrize("kind", ["stream", "dgram"])
def test_a_forked_childs_close_does_not_wait_for_the_parents_threads(
    sockdir: Path, kind: str
) -> None:
    program = [sys.executable, "-W", "ignore::DeprecationWarning", "-c", FORKED_CLOSE]
    done = subprocess.run(
        [*program, os.fspath(sockdir / "s"), kind],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    took = float(done.stdout)
    assert took < 10.0, f"the child's close() waited {took} s for a thread it does not have"
    assert not os.path.exists(sockdir / "s")
