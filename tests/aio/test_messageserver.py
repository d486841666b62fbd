"""``udskit.aio.MessageServer``, ``start_message_server`` and ``serve_messages``: a handler
per message, called from the reader callback; a handler that returns an awaitable pauses its
client only. Real sockets of each type, on asyncio's loop and on uvloop, no timing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

import udskit
import udskit.aio
import udskit.connection
import udskit.serving
from udskit import Connection, ConnectionClosed

from ..conftest import READY_TIMEOUT, no_descriptor_left, wait_connectable
from .helpers import idle_turns, turns_until

pytestmark = pytest.mark.usefixtures("no_fd_leak")

Run = Callable[[Coroutine[Any, Any, Any]], Any]

KINDS = ["stream", "seqpacket", "dgram"]
CONNECTED = ["stream", "seqpacket"]

#: Upper bound on one awaited step (a reply, the server's end): a hang fails in this time.
WAIT = 10.0


@contextlib.asynccontextmanager
async def running(
    path: Path, handler: Any, **options: Any
) -> AsyncIterator[udskit.aio.MessageServer]:
    """A message server on ``path``, serving in a task until the block ends."""
    server = await udskit.aio.start_message_server(path, handler, **options)
    serving = asyncio.ensure_future(server.serve_forever())
    try:
        yield server
    finally:
        server.stop()
        await asyncio.wait_for(serving, WAIT)
    assert not path.exists()


async def connect(path: Path, kind: str, **options: Any) -> udskit.aio.Channel:
    return await udskit.aio.connect(path, type=kind, **options)


async def reply(channel: udskit.aio.Channel) -> bytes:
    return await asyncio.wait_for(channel.recv(), WAIT)


async def assert_ended(channel: udskit.aio.Channel) -> None:
    """The server closed ``channel``'s connection: it reads the end of the stream."""
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(channel.recv(), WAIT)


# -- handlers -----------------------------------------------------------------------------
def upper_return(conn: Connection, message: bytes) -> bytes:
    return message.upper()


def upper_send(conn: Connection, message: bytes) -> None:
    conn.send(message.upper())


async def upper_async_return(conn: Connection, message: bytes) -> bytes:
    await asyncio.sleep(0)
    return message.upper()


async def upper_async_send(conn: Connection, message: bytes) -> None:
    await asyncio.sleep(0)
    conn.send(message.upper())


UPPERS = {
    "plain-return": upper_return,
    "plain-send": upper_send,
    "async-return": upper_async_return,
    "async-send": upper_async_send,
}


# -- echo ---------------------------------------------------------------------------------
@pytest.mark.parametrize("style", UPPERS)
@pytest.mark.parametrize("kind", KINDS)
def test_echo(arun: Run, sockdir: Path, kind: str, style: str) -> None:
    path = sockdir / "echo.sock"

    async def main() -> None:
        async with running(path, UPPERS[style], type=kind) as server:

            async def client(number: int) -> bytes:
                async with await connect(path, kind) as channel:
                    await channel.send(b"client %d" % number)
                    return await reply(channel)

            replies = await asyncio.gather(*(client(n) for n in range(5)))
            assert replies == [b"CLIENT %d" % n for n in range(5)]
            await turns_until(lambda: server.active_clients == 0)

    arun(main())


def _sizes(kind: str) -> list[int]:
    """Message sizes to pipeline: tiny, around the join limit, and (stream) over the 256 KiB
    read chunk, so that messages arrive in pieces."""
    if kind == "stream":
        return [0, 1, 100, 5000, 70_000, 300_000]
    return [0, 1, 100, 5000, 30_000]


def _message(index: int, size: int) -> bytes:
    stamp = b"%05d" % index
    return (stamp * (size // 5 + 1))[: max(size, 5)]


def _turns_for(message: bytes) -> int:
    """How many loop turns the async handler waits for this message: differs per message, so
    a later message would overtake an earlier one if order were not kept."""
    return (int(message[:5]) * 7) % 11


async def reverse_later(conn: Connection, message: bytes) -> bytes:
    for _ in range(_turns_for(message)):
        await asyncio.sleep(0)
    return message[::-1]


def reverse_now(conn: Connection, message: bytes) -> bytes:
    return message[::-1]


def reverse_sometimes_later(conn: Connection, message: bytes) -> Any:
    """A plain function returning an awaitable for some messages, the reply for others."""
    if int(message[:5]) % 3 == 0:
        return reverse_later(conn, message)
    return message[::-1]


REVERSERS = {
    "plain": reverse_now,
    "async": reverse_later,
    "mixed": reverse_sometimes_later,
}


@pytest.mark.parametrize("style", REVERSERS)
@pytest.mark.parametrize("kind", CONNECTED)
def test_pipelined_messages_come_back_whole_and_in_order(
    arun: Run, sockdir: Path, kind: str, style: str
) -> None:
    path = sockdir / "pipe.sock"
    sizes = _sizes(kind)

    async def main() -> None:
        async with running(path, REVERSERS[style], type=kind):

            async def client(number: int) -> None:
                messages = [_message(i, sizes[(i + number) % len(sizes)]) for i in range(120)]
                async with await connect(path, kind) as channel:
                    sending = asyncio.ensure_future(channel.send_many(messages))
                    replies = [await reply(channel) for _ in messages]
                    await sending
                assert replies == [m[::-1] for m in messages]

            await asyncio.gather(*(client(n) for n in range(3)))

    arun(main())


@pytest.mark.parametrize("style", ["plain", "mixed"])
def test_datagrams_are_answered_in_order_when_handled_at_once(
    arun: Run, sockdir: Path, style: str
) -> None:
    path = sockdir / "dgrams.sock"
    # Fewer than the kernel's smallest datagram queue (net.unix.max_dgram_qlen, 10 at least
    # in practice): the replies must fit the client's queue.
    messages = [_message(i, 100) for i in range(8)]

    async def main() -> None:
        handler = reverse_now if style == "plain" else reverse_sometimes_later
        async with running(path, handler, type="dgram"), await connect(path, "dgram") as channel:
            await channel.send_many(messages)
            replies = [await reply(channel) for _ in messages]
        if style == "plain":
            assert replies == [m[::-1] for m in messages]
        else:  # each datagram is a client of its own: only the set is promised
            assert sorted(replies) == sorted(m[::-1] for m in messages)

    arun(main())


@pytest.mark.parametrize("kind", CONNECTED)
def test_a_reply_goes_out_while_the_next_message_is_awaited(
    arun: Run, sockdir: Path, kind: str
) -> None:
    """The first message's reply must not wait for the second message's handler."""
    path = sockdir / "early.sock"
    release = asyncio.Event()

    async def handler(conn: Connection, message: bytes) -> bytes:
        if message == b"second":
            await release.wait()
        return b"re: " + message

    async def main() -> None:
        async with running(path, handler, type=kind), await connect(path, kind) as channel:
            await channel.send_many([b"first", b"second", b"third"])
            assert await reply(channel) == b"re: first"
            release.set()
            assert await reply(channel) == b"re: second"
            assert await reply(channel) == b"re: third"

    arun(main())


# -- descriptors and credentials ------------------------------------------------------------
@pytest.mark.parametrize("take", [False, True], ids=["look", "take"])
@pytest.mark.parametrize("asynchronous", [False, True], ids=["plain", "async"])
@pytest.mark.parametrize("kind", KINDS)
def test_descriptors_both_ways(
    arun: Run, sockdir: Path, kind: str, asynchronous: bool, take: bool
) -> None:
    """The handler reads the pipe the client passed, and passes one back: fds it does not
    take are closed by the server (no_fd_leak), those it takes are its own."""
    path = sockdir / "fds.sock"
    taken: list[int] = []

    def answer(conn: Connection, message: bytes) -> None:
        assert len(conn.fds) == 1
        fd = conn.take_fds()[0] if take else conn.fds[0]
        if take:
            taken.append(fd)
            assert conn.fds == ()
        got = os.read(fd, 100)
        back_r, back_w = os.pipe()
        try:
            os.write(back_w, b"from the server")
            conn.send_fds(message + b" " + got, [back_r])
        finally:
            os.close(back_r)  # send_fds duplicated it
            os.close(back_w)

    def plain(conn: Connection, message: bytes) -> None:
        answer(conn, message)

    async def awaiting(conn: Connection, message: bytes) -> None:
        await asyncio.sleep(0)
        answer(conn, message)

    async def main() -> None:
        handler = awaiting if asynchronous else plain
        async with running(path, handler, type=kind), await connect(path, kind) as channel:
            for round_ in range(3):
                r, w = os.pipe()
                os.write(w, b"pipe %d" % round_)
                os.close(w)
                await channel.send_fds(b"round %d" % round_, [r])
                os.close(r)
                data, fds = await asyncio.wait_for(channel.recv_fds(), WAIT)
                assert data == b"round %d pipe %d" % (round_, round_)
                assert len(fds) == 1
                assert os.read(fds[0], 100) == b"from the server"
                os.close(fds[0])
        assert len(taken) == (3 if take else 0)
        for fd in taken:
            os.close(fd)

    arun(main())


@pytest.mark.parametrize("kind", KINDS)
def test_the_handler_sees_who_sent(arun: Run, sockdir: Path, kind: str) -> None:
    path = sockdir / "who.sock"
    seen: list[udskit.PeerCred | None] = []

    def handler(conn: Connection, message: bytes) -> bytes:
        seen.append(conn.peer)
        return b"%d" % conn.id

    async def main() -> None:
        async with running(path, handler, type=kind), await connect(path, kind) as channel:
            await channel.send(b"who am I?")
            await reply(channel)
        assert seen == [udskit.PeerCred(os.getpid(), os.getuid(), os.getgid())]

    arun(main())


class RefuseFirst(udskit.Policy):
    """Refuses the first peer it judges, allows every later one."""

    def __init__(self) -> None:
        super().__init__(same_user=True)
        object.__setattr__(self, "refusals", 1)

    def allows(self, peer: udskit.PeerCred) -> bool:
        if self.refusals:
            object.__setattr__(self, "refusals", self.refusals - 1)
            return False
        return super().allows(peer)


@pytest.mark.parametrize("kind", KINDS)
def test_a_refused_peer_is_never_handled_and_serving_goes_on(
    arun: Run, sockdir: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = sockdir / "policy.sock"
    handled: list[bytes] = []
    connected: list[int] = []

    def handler(conn: Connection, message: bytes) -> bytes:
        handled.append(message)
        return b"welcome " + message

    async def main() -> None:
        async with running(
            path,
            handler,
            type=kind,
            allow=RefuseFirst(),
            on_connect=lambda c: connected.append(c.id),
        ) as server:
            refused = await connect(path, kind)
            await refused.send(b"refused")
            if kind != "dgram":
                await assert_ended(refused)  # shut down unread: no message, no reply
                await turns_until(lambda: server.active_clients == 0)
                refused.close()
                allowed = await connect(path, kind)
            else:
                allowed = refused  # the next datagram from the same socket is judged anew
            async with allowed:
                await allowed.send(b"allowed")
                assert await reply(allowed) == b"welcome allowed"
        assert handled == [b"allowed"]
        assert len(connected) == (0 if kind == "dgram" else 1)
        assert caplog.text.count("refused peer") == 1

    with caplog.at_level(logging.WARNING, logger="udskit"):
        arun(main())


@pytest.mark.parametrize("kind", CONNECTED)
def test_hooks_see_each_client_arrive_and_leave(arun: Run, sockdir: Path, kind: str) -> None:
    path = sockdir / "hooks.sock"
    events: list[tuple[str, int]] = []

    def on_connect(conn: Connection) -> None:
        assert conn.peer is not None
        assert conn.peer.pid == os.getpid()
        events.append(("connect", conn.id))
        conn.state["name"] = b"client %d" % conn.id
        conn.send(b"hello " + conn.state["name"])  # the server speaks first

    def on_close(conn: Connection) -> None:
        assert conn.closed
        events.append(("close", conn.id))

    def handler(conn: Connection, message: bytes) -> bytes:
        return conn.state["name"] + b": " + message

    async def main() -> None:
        async with running(
            path, handler, type=kind, on_connect=on_connect, on_close=on_close
        ) as server:
            first = await connect(path, kind)
            assert await reply(first) == b"hello client 1"
            second = await connect(path, kind)
            assert await reply(second) == b"hello client 2"
            await first.send(b"one")
            assert await reply(first) == b"client 1: one"
            first.close()
            await turns_until(lambda: ("close", 1) in events)
            assert server.active_clients == 1
            await second.send(b"two")
            assert await reply(second) == b"client 2: two"
        # stop() closed the second client: its hook ran, and it reads the end
        await assert_ended(second)
        second.close()
        assert events == [("connect", 1), ("connect", 2), ("close", 1), ("close", 2)]

    arun(main())


# -- stopping -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_stop_removes_the_socket_file_and_ends_every_client(
    arun: Run, sockdir: Path, kind: str
) -> None:
    path = sockdir / "stop.sock"
    closed: list[int] = []

    async def main() -> None:
        server = await udskit.aio.start_message_server(
            path, upper_return, type=kind, on_close=lambda c: closed.append(c.id)
        )
        assert path.exists()
        serving = asyncio.ensure_future(server.serve_forever())
        clients = [await connect(path, kind) for _ in range(3)]
        for channel in clients:
            await channel.send(b"hi")
            assert await reply(channel) == b"HI"
        server.stop()
        await asyncio.wait_for(serving, WAIT)
        assert not path.exists()
        assert server.active_clients == 0
        for channel in clients:
            if kind != "dgram":  # a datagram client has no connection to end
                await assert_ended(channel)
            channel.close()
        assert sorted(closed) == ([] if kind == "dgram" else [1, 2, 3])
        with pytest.raises(RuntimeError, match="once per MessageServer"):
            await server.serve_forever()
        await server.aclose()  # again: nothing left to do

    arun(main())


def test_stop_before_serving_and_close_without_serving(arun: Run, sockdir: Path) -> None:
    path = sockdir / "early.sock"

    async def main() -> None:
        server = await udskit.aio.start_message_server(path, upper_return)
        server.stop()
        await asyncio.wait_for(server.serve_forever(), WAIT)  # returns at once
        assert not path.exists()
        async with await udskit.aio.start_message_server(path, upper_return) as unused:
            assert path.exists()
            assert unused.active_clients == 0
        assert not path.exists()

    arun(main())


def test_leaving_the_async_with_block_releases_the_server(arun: Run, sockdir: Path) -> None:
    path = sockdir / "block.sock"

    async def main() -> None:
        async with await udskit.aio.start_message_server(path, upper_return) as server:
            serving = asyncio.ensure_future(server.serve_forever())
            async with await connect(path, "stream") as channel:
                await channel.send(b"hi")
                assert await reply(channel) == b"HI"
                client = await connect(path, "stream")
        assert not path.exists()
        assert server.active_clients == 0
        await assert_ended(client)
        client.close()
        await asyncio.wait_for(serving, WAIT)

    arun(main())


# -- bad arguments ------------------------------------------------------------------------
BAD_ARGUMENTS = [
    ({"handler": "not callable"}, TypeError, "handler must be a function of"),
    ({"max_outbox": 0}, ValueError, "max_outbox must be a positive number of bytes, not 0"),
    ({"max_outbox": True}, ValueError, "max_outbox must be a positive"),
    ({"max_clients": 0}, ValueError, "max_clients must be a positive"),
    ({"on_close": 42}, TypeError, "on_close must be a function of a connection, not 42"),
    ({"on_connect": "x"}, TypeError, "on_connect must be a function"),
    ({"type": "carrier-pigeon"}, ValueError, "unknown socket type"),
]


@pytest.mark.parametrize("serve", [False, True], ids=["start", "serve"])
@pytest.mark.parametrize(
    ("options", "error", "says"), BAD_ARGUMENTS, ids=[next(iter(b[0])) for b in BAD_ARGUMENTS]
)
def test_bad_arguments_are_refused_before_anything_is_claimed(
    arun: Run,
    sockdir: Path,
    options: dict[str, Any],
    error: type[Exception],
    says: str,
    serve: bool,
) -> None:
    path = sockdir / "bad.sock"
    options = dict(options)
    handler = options.pop("handler", upper_return)

    async def main() -> None:
        if serve:
            await udskit.aio.serve_messages(path, handler, **options)
        else:
            await udskit.aio.start_message_server(path, handler, **options)

    with pytest.raises(error, match=re.escape(says)) as caught:
        arun(main())
    assert "\n" not in str(caught.value)
    assert not path.exists()


def test_an_aio_listener_is_refused_with_what_to_pass(
    arun: Run, sockdir: Path, no_fd_leak: None
) -> None:
    """MessageServer takes udskit.listen()'s listener: given udskit.aio.listen()'s, it was
    made without a word, then failed in the loop's callback with AttributeError, dropping
    every client."""

    async def main() -> None:
        async with await udskit.aio.listen(sockdir / "aio.sock") as listener:
            with pytest.raises(TypeError, match=r"endpoint must be a listener from udskit\.listen"):
                udskit.aio.MessageServer(listener, upper_return)  # type: ignore[arg-type]
            with pytest.raises(TypeError, match="not None"):
                udskit.aio.MessageServer(None, upper_return)  # type: ignore[arg-type]

    arun(main())


# -- faults -------------------------------------------------------------------------------
def _request(kind: str, payload: bytes) -> bytes:
    """``payload`` as a client puts it on the wire: length-framed on a stream."""
    return struct.pack(">I", len(payload)) + payload if kind == "stream" else payload


async def raw_client(path: Path, kind: str) -> socket.socket:
    """A plain non-blocking socket connected to ``path``: a client that misbehaves."""
    sock = socket.socket(socket.AF_UNIX, SOCKET_TYPES[kind])
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, os.fspath(path))
    return sock


async def assert_raw_ended(sock: socket.socket) -> None:
    """The server closed ``sock``'s connection (what it sent before is read and dropped)."""
    loop = asyncio.get_running_loop()
    for _ in range(10_000):
        try:
            data = await asyncio.wait_for(loop.sock_recv(sock, 1 << 16), WAIT)
        except ConnectionResetError:
            return  # closed with our data unread: also an end
        if not data:
            return
    pytest.fail("the connection never ended")


SOCKET_TYPES = {
    "stream": socket.SOCK_STREAM,
    "seqpacket": socket.SOCK_SEQPACKET,
    "dgram": socket.SOCK_DGRAM,
}


@pytest.mark.parametrize("style", ["plain", "mixed"])
@pytest.mark.parametrize("batch", [False, True], ids=["one-by-one", "at-once"])
@pytest.mark.parametrize("kind", CONNECTED)
def test_a_client_that_never_reads_holds_a_bounded_outbox(
    arun: Run, sockdir: Path, kind: str, batch: bool, style: str
) -> None:
    """However its requests arrive (one per read, or thousands in one), the replies held
    for a client that never reads pass max_outbox by one reply at most: the server stops
    handling its messages, then reading it, and its requests back up in the kernel."""
    path = sockdir / "greedy.sock"
    max_outbox = 32 * 1024
    reply_size = 4096
    conns: dict[int, Connection] = {}

    def handler(conn: Connection, message: bytes) -> bytes:
        return bytes(reply_size) if message == b"more" else b"re: " + message

    async def handler_later(conn: Connection, message: bytes) -> bytes:
        await asyncio.sleep(0)
        return handler(conn, message)

    def sometimes_later(conn: Connection, message: bytes) -> Any:
        """Awaits for every tenth message: the others queue up behind it meanwhile."""
        count = conn.state["count"] = conn.state.get("count", 0) + 1
        return handler_later(conn, message) if count % 10 == 1 else handler(conn, message)

    async def main() -> None:
        async with running(
            path,
            handler if style == "plain" else sometimes_later,
            type=kind,
            max_outbox=max_outbox,
            sndbuf=4096,
            rcvbuf=4096,
            on_connect=lambda c: conns.setdefault(c.id, c),
        ) as server:
            greedy = await raw_client(path, kind)
            greedy.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            await turns_until(lambda: 1 in conns)
            outbox = conns[1]
            limit = max_outbox + len(_request(kind, bytes(reply_size)))  # one reply over
            # Thousands of requests per write, or one (then each read brings one), with
            # loop passes in between, until the server has taken nothing for a while.
            request = _request(kind, b"more")
            writes = [request]
            if batch:
                writes = [request * 2000] if kind == "stream" else [request] * 200
            unsent = b""
            refused = 0
            for _ in range(10_000):
                taken = 0
                for data in [unsent] if unsent else writes:  # a partial write first
                    try:
                        sent = greedy.send(data)
                    except BlockingIOError:
                        break
                    taken += sent
                    unsent = data[sent:]
                    if unsent:
                        break
                refused = 0 if taken else refused + 1
                if refused == 3:
                    break
                await idle_turns(20)
                assert outbox.outbox_size <= limit
            else:
                pytest.fail("the server never stopped reading a client that does not read")
            await idle_turns()
            assert outbox.outbox_size <= limit
            assert outbox.outbox_size > max_outbox // 2
            held = outbox.outbox_size
            async with await connect(path, kind) as polite:
                for number in range(3):
                    await polite.send(b"polite %d" % number)
                    assert await reply(polite) == b"re: polite %d" % number
            assert outbox.outbox_size == held
            assert server.active_clients == 2
        await assert_raw_ended(greedy)
        greedy.close()

    arun(main())


def test_half_a_frame_then_silence_holds_up_no_one(arun: Run, sockdir: Path) -> None:
    path = sockdir / "stall.sock"

    async def main() -> None:
        async with running(path, upper_return) as server:
            staller = await raw_client(path, "stream")
            staller.send(struct.pack(">I", 100) + b"only ten..")
            await turns_until(lambda: server.active_clients == 1)
            for number in range(3):
                async with await connect(path, "stream") as client:
                    await client.send(b"client %d" % number)
                    assert await reply(client) == b"CLIENT %d" % number
            await turns_until(lambda: server.active_clients == 1)
        await assert_raw_ended(staller)
        staller.close()

    arun(main())


@pytest.mark.parametrize("kind", KINDS)
def test_a_message_over_max_frame_ends_its_client_only(
    arun: Run, sockdir: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = sockdir / "big.sock"
    handled: list[bytes] = []

    def handler(conn: Connection, message: bytes) -> bytes:
        handled.append(message)
        return message.upper()

    async def main() -> None:
        async with running(path, handler, type=kind, max_frame=1024) as server:
            if kind == "dgram":
                oversized = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                oversized.sendto(bytes(2048), os.fspath(path))
            else:
                oversized = await raw_client(path, kind)
                if kind == "stream":  # the header alone: the server need not read further
                    oversized.send(struct.pack(">I", 1 << 20))
                else:
                    oversized.send(bytes(2048))
                await assert_raw_ended(oversized)
            oversized.close()
            await turns_until(lambda: "max_frame" in caplog.text)
            async with await connect(path, kind, max_frame=1024) as client:
                await client.send(b"fits")
                assert await reply(client) == b"FITS"
            await turns_until(lambda: server.active_clients == 0)
        assert handled == [b"fits"]

    with caplog.at_level(logging.WARNING, logger="udskit"):
        arun(main())


def crash_plain(conn: Connection, message: bytes) -> bytes:
    if message == b"crash":
        raise ValueError("handler bug")
    return message.upper()


async def crash_async(conn: Connection, message: bytes) -> bytes:
    await asyncio.sleep(0)
    if message == b"crash":
        raise ValueError("handler bug")
    return message.upper()


def bad_reply(conn: Connection, message: bytes) -> Any:
    """Returns what cannot be sent: as if the handler had raised."""
    return "a str" if message == b"crash" else message.upper()


CRASHERS = {"plain": crash_plain, "async": crash_async, "bad-reply": bad_reply}


@pytest.mark.parametrize("style", CRASHERS)
@pytest.mark.parametrize("kind", KINDS)
def test_a_failing_handler_ends_its_client_and_serving_goes_on(
    arun: Run, sockdir: Path, kind: str, style: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = sockdir / "crash.sock"
    closed: list[int] = []

    async def main() -> None:
        async with running(
            path, CRASHERS[style], type=kind, on_close=lambda c: closed.append(c.id)
        ) as server:
            crasher = await connect(path, kind)
            await crasher.send(b"crash")
            if kind != "dgram":
                await assert_ended(crasher)
                await turns_until(lambda: closed == [1])
            else:
                await turns_until(lambda: "handler failed" in caplog.text)
            crasher.close()
            async with await connect(path, kind) as client:
                await client.send(b"still here")
                assert await reply(client) == b"STILL HERE"
            await turns_until(lambda: server.active_clients == 0)
        assert "handler failed" in caplog.text
        if style == "bad-reply":
            assert "TypeError" in caplog.text
        else:
            assert "ValueError: handler bug" in caplog.text

    with caplog.at_level(logging.ERROR, logger="udskit"):
        arun(main())


@pytest.mark.parametrize("kind", KINDS)
def test_a_handler_awaiting_forever_is_cancelled_after_the_grace(
    arun: Run,
    sockdir: Path,
    kind: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = sockdir / "forever.sock"
    monkeypatch.setattr(udskit.aio.messageserver, "SHUTDOWN_GRACE", 0.05)
    waiting = asyncio.Event()
    ended: list[str] = []

    async def handler(conn: Connection, message: bytes) -> bytes:
        if message == b"wait":
            waiting.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                ended.append("cancelled")
                raise
        return message.upper()

    async def main() -> None:
        server = await udskit.aio.start_message_server(path, handler, type=kind)
        serving = asyncio.ensure_future(server.serve_forever())
        stuck = await connect(path, kind)
        await stuck.send(b"wait")
        await asyncio.wait_for(waiting.wait(), WAIT)
        for number in range(3):
            async with await connect(path, kind) as client:
                await client.send(b"client %d" % number)
                assert await reply(client) == b"CLIENT %d" % number
        server.stop()
        await asyncio.wait_for(serving, WAIT)
        assert ended == ["cancelled"]
        assert not path.exists()
        assert server.active_clients == 0
        if kind != "dgram":
            await assert_ended(stuck)
        stuck.close()

    with caplog.at_level(logging.WARNING, logger="udskit"):
        arun(main())
    assert "1 handler(s) still awaiting 0.05 s after stop; cancelled them" in caplog.text


@pytest.mark.parametrize("kind", CONNECTED)
def test_max_clients_holds_the_third_back_until_one_leaves(
    arun: Run, sockdir: Path, kind: str
) -> None:
    path = sockdir / "two.sock"
    handled: list[bytes] = []

    def handler(conn: Connection, message: bytes) -> bytes:
        handled.append(message)
        return message.upper()

    async def main() -> None:
        async with running(path, handler, type=kind, max_clients=2) as server:
            first = await connect(path, kind)
            second = await connect(path, kind)
            for channel, name in ((first, b"first"), (second, b"second")):
                await channel.send(name)
                assert await reply(channel) == name.upper()
            third = await connect(path, kind)  # waits in the kernel's backlog
            await third.send(b"third")
            await idle_turns()
            assert handled == [b"first", b"second"]
            assert server.active_clients == 2
            first.close()
            assert await reply(third) == b"THIRD"
            assert server.active_clients == 2
            second.close()
            third.close()
            await turns_until(lambda: server.active_clients == 0)

    arun(main())


@pytest.mark.parametrize("kind", CONNECTED)
def test_a_thousand_clients_arrive_and_vanish_at_once(arun: Run, sockdir: Path, kind: str) -> None:
    path = sockdir / "burst.sock"
    counts = {"connect": 0, "close": 0}

    def count(event: str) -> Callable[[Connection], None]:
        def hook(conn: Connection) -> None:
            counts[event] += 1

        return hook

    async def main() -> None:
        async with running(
            path,
            upper_return,
            type=kind,
            backlog=1024,
            on_connect=count("connect"),
            on_close=count("close"),
        ) as server:
            clients = []
            for number in range(1000):
                sock = socket.socket(socket.AF_UNIX, SOCKET_TYPES[kind])
                sock.connect(os.fspath(path))  # the backlog has room: no wait
                if number % 2:
                    sock.send(_request(kind, b"gone before the reply"))
                clients.append(sock)
            for sock in clients:
                sock.close()
            await turns_until(lambda: counts["close"] == 1000)
            assert counts["connect"] == 1000
            assert server.active_clients == 0
            async with await connect(path, kind) as survivor:
                await survivor.send(b"still serving")
                assert await reply(survivor) == b"STILL SERVING"

    arun(main())


SERVE_SCRIPT = textwrap.dedent(
    """
    import signal, sys
    import udskit.aio

    async def upper(conn, message):
        return message.upper()

    main = udskit.aio.serve_messages(sys.argv[1], upper)
    udskit.aio.run(main, use_uvloop=sys.argv[2] == "uvloop")
    print("default SIGTERM again:", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
    """
)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_messages_stops_cleanly_on_a_signal(
    loop_name: str, sockdir: Path, signum: signal.Signals
) -> None:
    path = sockdir / "served.sock"
    child = subprocess.Popen(
        [sys.executable, "-c", SERVE_SCRIPT, str(path), loop_name],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_connectable(path)
        with udskit.connect(path) as client:
            client.send(b"hello")
            assert client.recv() == b"HELLO"
            child.send_signal(signum)
            with pytest.raises(ConnectionClosed):
                client.recv()  # the server closed our connection
        out, err = child.communicate(timeout=READY_TIMEOUT)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert child.returncode == 0, err
    assert err == ""
    assert out == "default SIGTERM again: True\n"
    assert not path.exists()


# -- more of the contract -------------------------------------------------------------------
@pytest.mark.parametrize("kind", CONNECTED)
def test_a_client_that_half_closes_gets_every_reply(arun: Run, sockdir: Path, kind: str) -> None:
    """The end of the stream comes behind the messages: the awaited replies go out first."""
    path = sockdir / "half.sock"
    messages = [_message(i, 50) for i in range(20)]

    async def main() -> None:
        async with running(path, reverse_later, type=kind) as server:
            async with await connect(path, kind) as channel:
                await channel.send_many(messages)
                await channel.shutdown_write()
                replies = [message async for message in channel]
            assert replies == [m[::-1] for m in messages]
            await turns_until(lambda: server.active_clients == 0)

    arun(main())


@pytest.mark.parametrize("kind", KINDS)
def test_replies_may_come_from_another_thread(arun: Run, sockdir: Path, kind: str) -> None:
    path = sockdir / "thread.sock"

    async def handler(conn: Connection, message: bytes) -> None:
        await asyncio.to_thread(conn.send, b"from a thread: " + message)

    async def main() -> None:
        async with running(path, handler, type=kind), await connect(path, kind) as channel:
            for number in range(3):
                await channel.send(b"%d" % number)
                assert await reply(channel) == b"from a thread: %d" % number

    arun(main())


def test_a_reply_finished_within_the_grace_still_goes_out(arun: Run, sockdir: Path) -> None:
    path = sockdir / "grace.sock"
    waiting = asyncio.Event()
    release = asyncio.Event()

    async def handler(conn: Connection, message: bytes) -> bytes:
        waiting.set()
        await release.wait()
        return b"late but sent"

    async def main() -> None:
        server = await udskit.aio.start_message_server(path, handler)
        serving = asyncio.ensure_future(server.serve_forever())
        async with await connect(path, "stream") as channel:
            await channel.send(b"take your time")
            await asyncio.wait_for(waiting.wait(), WAIT)
            server.stop()
            release.set()  # before the grace even starts: the handler finishes within it
            await asyncio.wait_for(serving, WAIT)
            assert not path.exists()
            assert await reply(channel) == b"late but sent"
            await assert_ended(channel)

    arun(main())


def test_cancelling_serve_forever_releases_everything(arun: Run, sockdir: Path) -> None:
    path = sockdir / "cancel.sock"

    async def main() -> None:
        server = await udskit.aio.start_message_server(path, upper_async_return)
        serving = asyncio.ensure_future(server.serve_forever())
        async with await connect(path, "stream") as channel:
            await channel.send(b"hi")
            assert await reply(channel) == b"HI"
            serving.cancel()
            with pytest.raises(asyncio.CancelledError):
                await serving
            assert not path.exists()
            assert server.active_clients == 0
            await assert_ended(channel)
        await server.aclose()

    arun(main())


@pytest.mark.parametrize("kind", CONNECTED)
def test_failing_hooks_are_logged(
    arun: Run, sockdir: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """on_connect failing ends that client, as a handler's failure would; on_close failing
    is only logged."""
    path = sockdir / "hooks.sock"
    closed: list[int] = []

    def on_connect(conn: Connection) -> None:
        if conn.id == 1:
            raise ValueError("on_connect bug")

    def on_close(conn: Connection) -> None:
        closed.append(conn.id)
        raise ValueError("on_close bug")

    async def main() -> None:
        async with running(
            path, upper_return, type=kind, on_connect=on_connect, on_close=on_close
        ) as server:
            refused = await connect(path, kind)
            await assert_ended(refused)
            refused.close()
            async with await connect(path, kind) as client:
                await client.send(b"fine")
                assert await reply(client) == b"FINE"
            await turns_until(lambda: server.active_clients == 0)
        assert closed == [1, 2]
        assert "ValueError: on_connect bug" in caplog.text
        assert caplog.text.count("ValueError: on_close bug") == 2

    with caplog.at_level(logging.ERROR, logger="udskit"):
        arun(main())


def test_a_datagram_reply_finished_within_the_grace_still_goes_out(
    arun: Run, sockdir: Path
) -> None:
    """The socket file goes at once; the socket the replies leave through, after them."""
    path = sockdir / "dgrace.sock"
    waiting = asyncio.Event()
    release = asyncio.Event()

    async def handler(conn: Connection, message: bytes) -> bytes:
        waiting.set()
        await release.wait()
        assert not path.exists()
        return b"late but sent"

    async def main() -> None:
        server = await udskit.aio.start_message_server(path, handler, type="dgram")
        serving = asyncio.ensure_future(server.serve_forever())
        async with await connect(path, "dgram") as channel:
            await channel.send(b"take your time")
            await asyncio.wait_for(waiting.wait(), WAIT)
            server.stop()
            release.set()
            await asyncio.wait_for(serving, WAIT)
            assert not path.exists()
            assert await reply(channel) == b"late but sent"

    arun(main())


@pytest.mark.parametrize("shut", [False, True], ids=["open", "half-closed"])
@pytest.mark.parametrize("style", ["plain", "mixed"])
@pytest.mark.parametrize("kind", CONNECTED)
def test_replies_larger_than_the_outbox_all_come_in_order(
    arun: Run, sockdir: Path, kind: str, style: str, shut: bool
) -> None:
    """Thousands of requests in a few writes, each reply a good part of max_outbox: the
    server handles them as the client reads the replies, none lost, none out of order."""
    path = sockdir / "flood.sock"
    reply_size = 3000

    def padded(conn: Connection, message: bytes) -> bytes:
        return message.ljust(reply_size, b".")

    async def padded_later(conn: Connection, message: bytes) -> bytes:
        await asyncio.sleep(0)
        return padded(conn, message)

    def sometimes_later(conn: Connection, message: bytes) -> Any:
        return padded_later(conn, message) if int(message) % 5 == 0 else padded(conn, message)

    handler = padded if style == "plain" else sometimes_later
    messages = [b"%06d" % i for i in range(3000)]

    async def main() -> None:
        async with running(path, handler, type=kind, max_outbox=16 * 1024) as server:
            async with await connect(path, kind) as channel:

                async def send_all() -> None:
                    await channel.send_many(messages)
                    if shut:
                        await channel.shutdown_write()

                sending = asyncio.ensure_future(send_all())  # read meanwhile: no deadlock
                if shut:
                    replies = [message async for message in channel]
                else:
                    replies = [await reply(channel) for _ in messages]
                await sending
            assert replies == [m.ljust(reply_size, b".") for m in messages]
            await turns_until(lambda: server.active_clients == 0)

    arun(main())


def test_out_of_descriptors_the_server_backs_off_then_serves(
    arun: Run, sockdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A real EMFILE from accept(): the client stays queued, the server logs, pauses (never
    spins), and takes the client once a descriptor is free."""
    path = sockdir / "emfile.sock"
    arrived = asyncio.Event()

    async def main() -> None:
        async with running(path, upper_return, on_connect=lambda c: arrived.set()):
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # its fd first
            with no_descriptor_left():  # the server's accept() gets EMFILE
                client.connect(os.fspath(path))  # queued in the backlog, no new descriptor
                await turns_until(lambda: "accept failed (Too many open files)" in caplog.text)
                assert not arrived.is_set()
            await asyncio.wait_for(arrived.wait(), WAIT)
            async with udskit.aio.Channel(client) as channel:
                await channel.send(b"patience")
                assert await reply(channel) == b"PATIENCE"

    with caplog.at_level(logging.WARNING, logger="udskit"):
        arun(main())


def test_a_datagram_client_that_never_reads_never_puts_the_loop_to_sleep(
    arun: Run, sockdir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Replies wait in the server socket's send buffer until their receiver reads them: a
    client that never reads fills it, and further replies wait in a task, in order. The
    event loop never sleeps waiting for room, and replies flow again once that client is
    gone."""
    path = sockdir / "dgreedy.sock"
    handled: list[int] = []

    def handler(conn: Connection, message: bytes) -> bytes:
        handled.append(len(message))
        return message

    async def main() -> None:
        async with running(path, handler, type="dgram"):
            greedy = await connect(path, "dgram")
            for _ in range(200):  # replies of 2000 bytes: more than the kernel buffers
                await greedy.send(bytes(2000))
            await turns_until(lambda: len(handled) == 200)
            await greedy.aclose()  # what was queued for it is freed
            async with await connect(path, "dgram") as polite:
                await polite.send(b"polite")
                assert await reply(polite) == b"polite"

    with caplog.at_level(logging.WARNING, logger="udskit"):
        arun(main())


def test_a_handler_may_close_the_server(arun: Run, sockdir: Path) -> None:
    """A "quit" command: the handler awaits aclose(), which does not wait for the handler
    itself, and its reply still goes out before the client is closed."""
    path = sockdir / "quit.sock"
    servers: list[udskit.aio.MessageServer] = []

    async def handler(conn: Connection, message: bytes) -> bytes:
        if message == b"quit":
            await servers[0].aclose()
            return b"bye"
        return message.upper()

    async def main() -> None:
        server = await udskit.aio.start_message_server(path, handler)
        servers.append(server)
        serving = asyncio.ensure_future(server.serve_forever())
        async with await connect(path, "stream") as channel:
            await channel.send(b"hi")
            assert await reply(channel) == b"HI"
            await channel.send(b"quit")
            assert await reply(channel) == b"bye"
            await assert_ended(channel)
        await asyncio.wait_for(serving, WAIT)
        assert not path.exists()

    arun(main())


@pytest.mark.parametrize("kind", KINDS)
def test_more_descriptors_than_max_fds(
    arun: Run, sockdir: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A stream cannot go on without them (its client is closed); a packet or datagram that
    brought too many is dropped, and its sender served on. Nothing leaks (no_fd_leak)."""
    path = sockdir / "fds.sock"
    handled: list[bytes] = []

    def handler(conn: Connection, message: bytes) -> bytes:
        handled.append(message)
        return message.upper()

    async def main() -> None:
        async with running(path, handler, type=kind, max_fds=2) as server:
            channel = await connect(path, kind)
            r, w = os.pipe()
            try:
                await channel.send_fds(b"too many", [r, w, r])
            finally:
                os.close(r)
                os.close(w)
            await turns_until(lambda: "descriptor" in caplog.text)
            if kind == "stream":
                await assert_ended(channel)
                channel.close()
                channel = await connect(path, kind)
            async with channel:
                await channel.send(b"next")
                assert await reply(channel) == b"NEXT"
            await turns_until(lambda: server.active_clients == 0)
        assert handled == [b"next"]

    with caplog.at_level(logging.WARNING, logger="udskit"):
        arun(main())
