"""A message is whole, or the channel is broken (blocking layer).

A scripted socket drives short writes, timeouts, EAGAIN and exceptions that land mid-write
through every send path; real sockets show the same with a peer that stops reading, with
threads sharing one channel, and with more descriptors than the receiver takes.
"""

from __future__ import annotations

import array
import errno
import gc
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import udskit
import udskit.aio
from udskit import Channel, ConnectionClosed, ProtocolError, Timeout

from .scripted import WAIT, Drain, ScriptedSocket, Step, scripted_pair, tagged

Send = Callable[[Channel, int], list[bytes]]


def _send_small(ch: Channel, tag: int) -> list[bytes]:
    msg = tagged(tag, 1000)
    ch.send(msg)
    return [msg]


def _send_large(ch: Channel, tag: int) -> list[bytes]:
    msg = tagged(tag, 200_000)
    ch.send(msg)
    return [msg]


def _send_fds(ch: Channel, tag: int) -> list[bytes]:
    msg = tagged(tag, 3000)
    r, w = os.pipe()
    try:
        ch.send_fds(msg, [r])
    finally:
        os.close(r)
        os.close(w)
    return [msg]


def _send_many(ch: Channel, tag: int) -> list[bytes]:
    msgs = [tagged(tag * 1000 + i, 1000) for i in range(100)]  # two joined writes
    ch.send_many(msgs)
    return msgs


SENDS: dict[str, Send] = {
    "send": _send_small,
    "send-large": _send_large,
    "send_fds": _send_fds,
    "send_many": _send_many,
}


def _channels(kind: int, script: list[Step]) -> tuple[Channel, ScriptedSocket, Channel]:
    mine, theirs = scripted_pair(kind, script)
    sender = Channel(mine)
    receiver = Channel(theirs)
    receiver.settimeout(WAIT)
    return sender, mine, receiver


#: Faults after which the message still arrives whole and the channel goes on.
RECOVERED: dict[str, list[Step]] = {
    "short-writes": [("short", 7), ("short", 1), ("short", 4000)],
    # EAGAIN (a timeout is set, so the socket is non-blocking): wait until writable, go on
    "eagain": [
        ("short", 7),
        BlockingIOError(errno.EAGAIN, "busy"),
        ("short", 1),
        BlockingIOError(errno.EAGAIN, "busy"),
    ],
}

#: Faults raised before any byte of the message went out: the call fails, the channel goes
#: on. The channel's timeout is 0 for these, so EAGAIN is a timeout at once.
REFUSED: dict[str, tuple[list[Step], type[BaseException]]] = {
    "timeout": ([TimeoutError("timed out")], Timeout),
    "eagain": ([BlockingIOError(errno.EAGAIN, "busy")], Timeout),
    "error": ([OSError(errno.ENOBUFS, "no buffer space")], OSError),
}

#: Faults after part of the message went out: the channel must break. Each runs with the
#: timeout given (0: EAGAIN is a timeout at once).
CUT: dict[str, tuple[list[Step], type[BaseException], float]] = {
    "short-then-timeout": ([("short", 10), TimeoutError("timed out")], Timeout, WAIT),
    "short-then-eagain": ([("short", 10), BlockingIOError(errno.EAGAIN, "busy")], Timeout, 0),
    "short-then-reset": (
        [("short", 10), ConnectionResetError(errno.ECONNRESET, "reset")],
        ConnectionClosed,
        WAIT,
    ),
    "signal-after-write": ([("after", 10, KeyboardInterrupt())], KeyboardInterrupt, WAIT),
}


@pytest.mark.parametrize("fault", sorted(RECOVERED))
@pytest.mark.parametrize("path", sorted(SENDS))
def test_short_writes_still_deliver_whole_messages(path: str, fault: str) -> None:
    sender, sock, receiver = _channels(socket.SOCK_STREAM, RECOVERED[fault])
    sender.settimeout(WAIT)
    with sender, receiver:
        drain = Drain(receiver)
        sent = SENDS[path](sender, 1) + SENDS[path](sender, 2)
        assert sock.calls > len(sent) // 100 + 1  # the short writes really happened
        sender.close()
        assert drain.result() == sent


@pytest.mark.parametrize("fault", sorted(REFUSED))
@pytest.mark.parametrize("path", sorted(SENDS))
def test_a_send_that_wrote_nothing_leaves_the_channel_whole(path: str, fault: str) -> None:
    script, raised = REFUSED[fault]
    sender, _, receiver = _channels(socket.SOCK_STREAM, script)
    sender.settimeout(0)
    with sender, receiver:
        drain = Drain(receiver)
        with pytest.raises(raised):
            SENDS[path](sender, 1)
        sender.settimeout(WAIT)
        sent = SENDS[path](sender, 2)
        sender.close()
        assert drain.result() == sent


@pytest.mark.parametrize("fault", sorted(CUT))
@pytest.mark.parametrize("path", sorted(SENDS))
def test_a_send_cut_mid_message_breaks_the_channel(path: str, fault: str) -> None:
    script, raised, timeout = CUT[fault]
    if path == "send_many":
        script = ["ok", *script]  # the first joined write goes out; the second is cut
    sender, _, receiver = _channels(socket.SOCK_STREAM, script)
    sender.settimeout(timeout)
    with sender, receiver:
        drain = Drain(receiver)
        with pytest.raises(raised):
            SENDS[path](sender, 1)
        for later in (lambda: sender.send(b"hello"), sender.recv, lambda: sender.send_many([b"x"])):
            with pytest.raises(ConnectionClosed, match="this channel is broken"):
                later()
        # The peer gets whole messages only (send_many's first joined write), then the end.
        got = drain.result()
        assert len(got) == (66 if path == "send_many" else 0)
        assert got == [tagged(1000 + i, 1000) for i in range(len(got))]


@pytest.mark.parametrize("kind", [socket.SOCK_SEQPACKET, socket.SOCK_DGRAM])
@pytest.mark.parametrize(
    "script",
    [[TimeoutError("timed out")], [BlockingIOError(errno.EAGAIN, "busy")]],
    ids=["timeout", "eagain"],
)
def test_a_packet_that_failed_to_go_leaves_the_channel_whole(kind: int, script: list[Step]) -> None:
    sender, _, receiver = _channels(kind, script)
    sender.settimeout(0)
    with sender, receiver:
        with pytest.raises(Timeout):
            sender.send(b"first")
        sender.settimeout(WAIT)
        sender.send_many([b"second", b"third"])
        sender.send_fds(b"fourth", [0])
        assert receiver.recv() == b"second"
        assert receiver.recv() == b"third"
        assert receiver.recv() == b"fourth"


@pytest.mark.parametrize("kind", [socket.SOCK_SEQPACKET, socket.SOCK_DGRAM])
def test_a_packet_waits_out_eagain_within_its_timeout(kind: int) -> None:
    sender, sock, receiver = _channels(kind, [BlockingIOError(errno.EAGAIN, "busy")] * 3)
    sender.settimeout(WAIT)
    with sender, receiver:
        sender.send(b"first")
        assert not sock.script
        assert receiver.recv() == b"first"


@pytest.mark.parametrize("kind", [socket.SOCK_SEQPACKET, socket.SOCK_DGRAM])
def test_an_exception_after_a_packet_went_keeps_the_channel(kind: int) -> None:
    """A packet goes whole or not at all, so nothing can be spliced: the channel goes on."""
    sender, _, receiver = _channels(kind, [("after", 1 << 20, KeyboardInterrupt())])
    with sender, receiver:
        with pytest.raises(KeyboardInterrupt):
            sender.send(b"first")
        sender.send(b"second")
        assert receiver.recv() == b"first"
        assert receiver.recv() == b"second"


def test_text_is_refused_with_a_hint() -> None:
    left, right = udskit.pair()
    with left, right:
        for call in (
            lambda: left.send("text"),  # type: ignore[arg-type]
            lambda: left.send_many(["text"]),  # type: ignore[list-item]
            lambda: left.send_fds("text", []),  # type: ignore[arg-type]
        ):
            with pytest.raises(TypeError, match=r"messages are bytes, not str; encode text"):
                call()
        left.send(b"still fine")
        assert right.recv() == b"still fine"


# -- real sockets -------------------------------------------------------------------------


def test_timeout_mid_frame_to_a_peer_that_does_not_read() -> None:
    """A peer that stops reading: the send times out part-way, and nothing sent after it
    can ever be spliced into the half-sent frame."""
    left, right = udskit.pair(sndbuf=64 * 1024, rcvbuf=64 * 1024)
    with left, right:
        left.settimeout(0.2)
        with pytest.raises(Timeout):
            left.send(b"x" * 3_000_000)
        with pytest.raises(ConnectionClosed, match="this channel is broken"):
            left.send(b"hello")
        right.settimeout(WAIT)
        with pytest.raises(ConnectionClosed) as cut:
            right.recv()
        assert cut.value.mid_message


def test_threads_sending_on_one_channel_never_interleave() -> None:
    threads_n, per_thread, size = 4, 12, 300_000
    left, right = udskit.pair()
    with left, right:
        right.settimeout(WAIT)
        errors: list[BaseException] = []

        def sender(tag: int) -> None:
            try:
                for i in range(per_thread):
                    left.send(tagged(tag * 100 + i, size))
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=sender, args=(t,)) for t in range(threads_n)]
        for t in threads:
            t.start()
        got = [right.recv() for _ in range(threads_n * per_thread)]
        for t in threads:
            t.join(WAIT)
        assert not errors
        expected = {tagged(t * 100 + i, size) for t in range(threads_n) for i in range(per_thread)}
        assert set(got) == expected
        # each thread's own messages arrive in the order it sent them
        tags = [int(m[1 : m.index(b":")]) for m in got]
        for t in range(threads_n):
            mine = [tag % 100 for tag in tags if tag // 100 == t]
            assert mine == list(range(per_thread))


@pytest.mark.parametrize("how", ["recv", "recv_fds", "recv_many"])
def test_threads_receiving_on_one_channel_each_get_whole_messages(how: str) -> None:
    total = 400
    left, right = udskit.pair()
    with left, right:
        right.settimeout(WAIT)
        got: list[bytes] = []
        errors: list[BaseException] = []
        lock = threading.Lock()

        def receiver() -> None:
            try:
                while True:
                    if how == "recv_many":
                        batch = right.recv_many()
                    elif how == "recv_fds":
                        batch = [right.recv_fds()[0]]
                    else:
                        batch = [right.recv()]
                    with lock:
                        got.extend(batch)
            except ConnectionClosed as exc:  # the end: each reader sees it
                if exc.mid_message:
                    errors.append(exc)
            except BaseException as exc:
                errors.append(exc)

        readers = [threading.Thread(target=receiver) for _ in range(2)]
        for t in readers:
            t.start()
        sent = [tagged(i, 1000 + 977 * (i % 300)) for i in range(total)]
        for msg in sent:
            left.send(msg)
        # The end, not a STOP message each: one recv_many() may take both of those.
        left.shutdown_write()
        for t in readers:
            t.join(WAIT)
            assert not t.is_alive()
        assert not errors
        assert sorted(got) == sorted(sent)


@pytest.mark.parametrize("kind", ["stream", "seqpacket", "dgram"])
def test_more_descriptors_than_max_fds_never_builds_a_wrong_message(
    kind: str, no_fd_leak: None
) -> None:
    raw_left, raw_right = socket.socketpair(socket.AF_UNIX, udskit.options.socket_kind(kind))
    sender = Channel(raw_left, max_fds=253)
    receiver = Channel(raw_right, max_fds=2)
    receiver.settimeout(WAIT)
    pipes = [os.pipe() for _ in range(10)]
    fds = [fd for pipe in pipes for fd in pipe]
    big = 300 * 1024 if kind == "stream" else 100 * 1024
    sent = [tagged(1, big), tagged(2, 1000), tagged(3, 60_000 if kind == "stream" else 600)]
    with sender, receiver:

        def send_all() -> None:
            try:
                sender.send(sent[0])
                sender.send_fds(sent[1], fds)
                sender.send(sent[2])
            except ConnectionClosed:
                pass  # the receiver gave up on the stream and closed it

        sending = threading.Thread(target=send_all)
        sending.start()
        results: list[bytes | str] = []
        for _ in range(len(sent)):
            try:
                results.append(receiver.recv())
            except ProtocolError as exc:
                results.append(str(exc))
        receiver.close()
        sending.join(WAIT)
    for fd in fds:
        os.close(fd)
    for item in results:
        assert isinstance(item, str) or item in sent, "a message was built from wrong bytes"
    assert any(isinstance(item, str) and "max_fds" in item for item in results)
    if kind == "stream":
        # once reading has failed, it stays failed: nothing after it is made up
        first_error = next(i for i, item in enumerate(results) if isinstance(item, str))
        assert all(isinstance(item, str) for item in results[first_error:])
        assert "nothing more can be received" in str(results[-1])
    else:
        assert results == [sent[0], results[1], sent[2]]  # a packet's error is its own


def test_threads_sharing_a_datagram_listener(sockdir: Path) -> None:
    total = 300
    with udskit.listen(sockdir / "d.sock", type="dgram") as listener:
        listener.settimeout(WAIT)
        got: list[bytes] = []
        lock = threading.Lock()

        def reader() -> None:
            while True:
                data = listener.recv().data
                with lock:
                    got.append(data)
                if data == b"STOP":
                    return

        readers = [threading.Thread(target=reader) for _ in range(2)]
        for t in readers:
            t.start()
        sent = [tagged(i, 100 + 37 * i) for i in range(total)]
        with udskit.connect(sockdir / "d.sock", type="dgram") as client:
            for msg in [*sent, b"STOP", b"STOP"]:
                client.send(msg)
        for t in readers:
            t.join(WAIT)
        assert sorted(m for m in got if m != b"STOP") == sorted(sent)


@pytest.mark.parametrize("kind", ["stream", "seqpacket", "dgram"])
def test_close_wakes_a_thread_blocked_in_recv(kind: str) -> None:
    left, right = udskit.pair(kind)
    with right:
        outcome: list[BaseException] = []
        entered = threading.Event()

        def reader() -> None:
            entered.set()
            try:
                left.recv()
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=reader, daemon=True)  # a regression must not hang
        thread.start()
        entered.wait(WAIT)
        # The reader holds the read lock from before its system call until after it: wait
        # (bounded) until it has it, so that close() surely meets a blocked reader.
        for _ in range(10_000):
            if left._rlock.locked():
                break
            threading.Event().wait(0.001)
        left.close()
        thread.join(WAIT)
        assert not thread.is_alive()
        assert len(outcome) == 1
        assert isinstance(outcome[0], ConnectionClosed)
        assert "this channel is closed" in str(outcome[0])


@pytest.mark.parametrize(
    "script",
    [[TimeoutError("timed out")], [BlockingIOError(errno.EAGAIN, "busy")]],
    ids=["timeout", "eagain"],
)
def test_a_listener_reply_that_failed_to_go_leaves_the_listener_whole(
    sockdir: Path, script: list[Step]
) -> None:
    with udskit.listen(sockdir / "d.sock", type="dgram") as listener:
        listener._sock = ScriptedSocket(listener._sock, script)  # type: ignore[misc]
        listener.settimeout(WAIT)
        with udskit.connect(sockdir / "d.sock", type="dgram", timeout=WAIT) as client:
            client.send(b"ping")
            datagram = listener.recv()
            assert datagram.sender is not None
            with pytest.raises(Timeout):
                listener.send_to(datagram.sender, b"lost")
            with pytest.raises(TypeError, match="messages are bytes"):
                listener.send_to(datagram.sender, "text")  # type: ignore[arg-type]
            listener.send_to(datagram.sender, b"pong")
            listener.session(datagram).send(b"again")
            assert client.recv() == b"pong"
            assert client.recv() == b"again"


# -- exceptions that are not udskit's, landing anywhere ------------------------------------


class Interrupt(Exception):
    """What a signal handler raises in these tests."""


@pytest.mark.parametrize("max_fds", [16, 0], ids=["recvmsg", "no-descriptors"])
@pytest.mark.parametrize("how", ["recv", "recv_fds", "recv_many"])
def test_an_exception_after_a_read_ends_reading_instead_of_splicing(how: str, max_fds: int) -> None:
    """The read's bytes never reached the framing: later reads must not frame from the
    middle of a message. (max_fds=0: the read is recv_into() where the kernel refuses
    descriptors.)"""
    mine, theirs = socket.socketpair()
    receiver = Channel(
        ScriptedSocket(mine, [], reads=["ok", ("after", Interrupt())]), max_fds=max_fds
    )
    sender = Channel(theirs)
    with sender, receiver:
        receiver.settimeout(WAIT)
        sender.send(b"first")
        assert getattr(receiver, how)() in (b"first", (b"first", []), [b"first"])
        sender.send(b"x" * 100)
        sender.send(b"next")
        with pytest.raises(Interrupt):
            getattr(receiver, how)()
        for _ in range(2):
            with pytest.raises(ProtocolError, match="a receive was interrupted"):
                getattr(receiver, how)()


def test_a_packet_channel_goes_on_after_an_interrupted_read() -> None:
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    receiver = Channel(ScriptedSocket(mine, [], reads=[("after", Interrupt())]))
    sender = Channel(theirs)
    with sender, receiver:
        sender.send(b"lost")
        sender.send(b"next")
        with pytest.raises(Interrupt):
            receiver.recv()
        assert receiver.recv() == b"next"


def test_signal_handler_exceptions_never_leave_a_lock_taken() -> None:
    """A handler raising at random points of send() and recv(): whatever it interrupted,
    no lock stays taken (the next call would wait for ever), and no message is spliced."""
    import signal

    armed = [False]

    def handler(*_: object) -> None:
        if armed[0]:
            raise Interrupt

    # Finalizers of other tests' garbage, run by a collection during the loop, would get the
    # Interrupt too, as an exception nobody can catch: collect first, none meanwhile.
    gc.collect()
    gc.disable()
    previous = signal.signal(signal.SIGALRM, handler)
    left, right = udskit.pair()
    interrupted = 0
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.0001, 0.0001)
        for i in range(3000):
            try:
                armed[0] = True
                left.send(b"m%d" % i)
                data = right.recv()
                armed[0] = False
                assert data.startswith(b"m")
            except (Interrupt, udskit.UdsError):
                armed[0] = False
                interrupted += 1
                assert not left._wlock.locked()
                assert not right._rlock.locked()
                left.close()
                right.close()
                left, right = udskit.pair()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        gc.enable()
        left.close()
        right.close()
    assert interrupted  # the handler really did land


def test_memoryviews_of_wide_items_are_framed_by_their_bytes() -> None:
    import array

    words = memoryview(array.array("I", [1, 0x41414141]))  # 8 bytes, len() 2
    left, right = udskit.pair()
    with left, right:
        left.send(words)
        left.send_many([words])
        left.send(b"next")
        assert right.recv() == words.tobytes()
        assert right.recv() == words.tobytes()
        assert right.recv() == b"next"


def test_send_refuses_what_is_not_bytes_with_a_hint() -> None:
    left, right = udskit.pair()
    with left, right:
        with pytest.raises(TypeError, match=r"messages are bytes-like .* not NoneType"):
            left.send(None)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="not int"):
            left.send_many([b"ok", 7])  # type: ignore[list-item]
        left.send(b"fine")
        assert right.recv() == b"fine"  # nothing of the refused batch went out


def test_send_many_broken_when_its_messages_fail_after_part_went_out() -> None:
    def messages() -> Iterator[bytes]:
        for i in range(100):
            yield tagged(i, 1000)  # 66 of these fill the first joined write
        raise Interrupt

    left, right = udskit.pair()
    with left, right:
        drain = Drain(right)
        with pytest.raises(Interrupt):
            left.send_many(messages())
        with pytest.raises(ConnectionClosed, match="this channel is broken"):
            left.send(b"more")
        left.close()
        assert drain.result() == [tagged(i, 1000) for i in range(66)]


def test_close_wakes_a_thread_blocked_in_send() -> None:
    left, right = udskit.pair(sndbuf=64 * 1024, rcvbuf=64 * 1024)
    with right:
        outcome = _closed_while_sending(left, b"x" * 8_000_000)  # the peer never reads
        assert isinstance(outcome, ConnectionClosed)
        assert "closed" in str(outcome)


def _until_locked(lock: threading.Lock) -> None:
    for _ in range(10_000):  # bounded: until the other thread is inside the call
        if lock.locked():
            return
        threading.Event().wait(0.001)


def _closed_while_sending(channel: Channel, data: bytes) -> BaseException | None:
    """Close ``channel`` while another thread is inside ``send(data)``; what it raised."""
    outcome: list[BaseException | None] = []

    def sender() -> None:
        try:
            channel.send(data)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=sender, daemon=True)  # a regression must not hang
    thread.start()
    _until_locked(channel._wlock)
    channel.close()
    thread.join(WAIT)  # well within any send timeout: close() woke it
    assert not thread.is_alive()
    return outcome[0]


@pytest.mark.parametrize("timeout", [None, 60.0], ids=["blocking", "timeout"])
@pytest.mark.parametrize("kind", ["seqpacket", "dgram"])
def test_close_wakes_a_thread_blocked_sending_a_packet(kind: str, timeout: float | None) -> None:
    # The sender waits for room (in send(), or in poll() with a timeout): close() must wake
    # it at once, and it raises what a call on a closed channel raises, not the EPIPE or
    # EBADF that the closed socket gave it.
    left, right = udskit.pair(kind, sndbuf=64 * 1024, rcvbuf=64 * 1024)
    with right:
        left.settimeout(0)
        for _ in range(10_000):  # bounded: until the socket is full
            try:
                left.send(b"x" * 4000)
            except Timeout:
                break
        else:
            pytest.fail("the socket never filled")
        left.settimeout(timeout)
        outcome = _closed_while_sending(left, b"x" * 4000)  # the peer never reads
        assert isinstance(outcome, ConnectionClosed)
        assert "this channel is closed" in str(outcome)


class _ClosedWhenFull(ScriptedSocket):
    """Finds the socket full, and meanwhile another thread has closed the channel: close()
    is done before the sender begins to wait for room."""

    channel: Channel

    def sendmsg(self, *args: Any, **kwargs: Any) -> int:  # type: ignore[override]
        self.channel.close()
        raise BlockingIOError(errno.EAGAIN, "full")


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_SEQPACKET])
def test_a_send_that_finds_its_channel_closed_before_it_waits_says_so(
    kind: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # close() runs in the sending thread here: it cannot wait for that send to leave.
    monkeypatch.setattr(udskit.channel, "CLOSE_WAIT", 0.001)
    raw, other = socket.socketpair(socket.AF_UNIX, kind)
    sock = _ClosedWhenFull(raw, [])
    with other:
        sock.channel = channel = Channel(sock)
        channel.settimeout(WAIT)
        with pytest.raises(ConnectionClosed, match="this channel is closed"):
            channel.send(b"x" * 100)


class _ClosedBeforeShutdown(ScriptedSocket):
    """Another thread closes the channel just before shutdown_write() reaches the socket."""

    channel: Channel

    def shutdown(self, how: int) -> None:
        self.channel.close()
        super().shutdown(how)


def test_a_half_close_that_finds_its_channel_closed_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # close() runs in the half-closing thread here: it cannot wait for it to leave.
    monkeypatch.setattr(udskit.channel, "CLOSE_WAIT", 0.001)
    raw, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    sock = _ClosedBeforeShutdown(raw, [])
    with other:
        sock.channel = channel = Channel(sock)
        with pytest.raises(ConnectionClosed, match="this channel is closed"):
            channel.shutdown_write()  # not the closed socket's EBADF


@pytest.mark.parametrize("kind", ["stream", "seqpacket", "dgram"])
def test_close_wakes_a_thread_waiting_to_receive_within_a_timeout(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With a timeout the reader waits in poll(). A shut-down datagram socket is readable but
    # yields EAGAIN: the reader must see that the channel is closed, not poll again (it
    # spun until close() gave up waiting for it and closed the socket under it).
    monkeypatch.setattr(udskit.channel, "CLOSE_WAIT", 3600.0)
    left, right = udskit.pair(kind)
    with right:
        left.settimeout(60.0)
        outcome: list[BaseException] = []

        def reader() -> None:
            try:
                left.recv()
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=reader, daemon=True)  # a regression must not hang
        thread.start()
        _until_locked(left._rlock)
        closer = threading.Thread(target=left.close, daemon=True)
        closer.start()
        closer.join(WAIT)
        thread.join(WAIT)
        assert not closer.is_alive()
        assert not thread.is_alive()
        assert isinstance(outcome[0], ConnectionClosed)
        assert "this channel is closed" in str(outcome[0])


class _ClosedAsItArrives(ScriptedSocket):
    """Brings a datagram just as another thread's close() runs (and, not to wait here for
    ever, gives up waiting for this reader at once)."""

    channel: Channel

    def recvmsg_into(self, *args: Any, **kwargs: Any) -> Any:
        got = super().recvmsg_into(*args, **kwargs)
        self.channel.close()
        return got


def test_an_empty_datagram_read_as_the_channel_closes_leaves_no_descriptor(
    monkeypatch: pytest.MonkeyPatch, no_fd_leak: None
) -> None:
    monkeypatch.setattr(udskit.channel, "CLOSE_WAIT", 0.001)
    raw, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock = _ClosedAsItArrives(raw, [])
    read_end, write_end = os.pipe()
    try:
        sock.channel = channel = Channel(sock)
        rights = array.array("i", [read_end]).tobytes()
        other.sendmsg([b""], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
        with pytest.raises(ConnectionClosed, match="this channel is closed"):
            channel.recv()
    finally:
        other.close()
        os.close(read_end)
        os.close(write_end)


def test_close_racing_readers_leaks_no_descriptor(no_fd_leak: None) -> None:
    r, w = os.pipe()
    try:
        for size in (10, 5000, 300_000) * 10:
            left, right = udskit.pair()
            stop = threading.Event()

            def sender(ch: Channel = left, n: int = size, stop: threading.Event = stop) -> None:
                try:
                    while not stop.is_set():
                        ch.send_fds(b"m" * n, [r, w])
                except udskit.UdsError:
                    pass

            def reader(ch: Channel = right) -> None:
                try:
                    while True:
                        _, fds = ch.recv_fds()
                        for fd in fds:
                            os.close(fd)
                except udskit.UdsError:
                    pass

            threads = [threading.Thread(target=sender), threading.Thread(target=reader)]
            for t in threads:
                t.start()
            right.close()
            stop.set()
            left.close()
            for t in threads:
                t.join(WAIT)
                assert not t.is_alive()
    finally:
        os.close(r)
        os.close(w)


def test_a_broken_channel_cannot_be_handed_to_another_process() -> None:
    import pickle

    mine, theirs = scripted_pair(socket.SOCK_STREAM, [("after", 10, Interrupt())])
    sender = Channel(mine)
    with sender, Channel(theirs):
        with pytest.raises(Interrupt):
            sender.send(b"x" * 1000)
        with pytest.raises(ConnectionClosed, match="this channel is broken"):
            pickle.dumps(sender)  # the check comes before pickle's refusal of sockets


def test_a_channel_keeps_its_timeout_across_processes() -> None:
    import multiprocessing

    left, right = udskit.pair()
    with left, right:
        right.settimeout(2.5)
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(1) as pool:
            assert pool.apply(_timeout_of, (right,)) == 2.5


def _timeout_of(channel: Channel) -> float | None:
    return channel.gettimeout()


@pytest.mark.parametrize("layer", ["blocking", "asyncio"])
def test_a_sender_the_policy_refuses_never_makes_recv_raise(sockdir: Path, layer: str) -> None:
    """Too many descriptors, or a datagram over max_frame, from a sender the policy refuses:
    dropped like any of its datagrams, not raised in the server (a refused sender must not
    be able to break a receive loop). From an allowed sender they are still errors."""
    path = sockdir / "d.sock"
    pipes = [os.pipe() for _ in range(5)]
    fds = [fd for pipe in pipes for fd in pipe]
    too_many = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]

    def send_bad() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as raw:
            raw.sendmsg([b"fds"], too_many, 0, os.fspath(path))
            raw.sendto(b"x" * 2048, os.fspath(path))  # over max_frame
            raw.sendto(b"last", os.fspath(path))

    refuse_me = udskit.Policy(uids={os.getuid() + 12345})
    try:
        if layer == "blocking":
            with udskit.listen(path, type="dgram", allow=refuse_me, max_frame=1024) as listener:
                listener.settimeout(0.5)
                send_bad()
                with pytest.raises(Timeout):
                    listener.recv()  # all three dropped, nothing raised
            with udskit.listen(path, type="dgram", max_fds=2, max_frame=1024) as listener:
                listener.settimeout(WAIT)
                send_bad()
                with pytest.raises(ProtocolError, match="max_fds"):
                    listener.recv()
        else:

            async def main() -> None:
                async with await udskit.aio.listen(
                    path, type="dgram", allow=refuse_me, max_frame=1024
                ) as listener:
                    listener.settimeout(0.5)
                    send_bad()
                    with pytest.raises(Timeout):
                        await listener.recv()

            udskit.aio.run(main())
    finally:
        for fd in fds:
            os.close(fd)
