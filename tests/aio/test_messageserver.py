"""``udskit.aio.MessageServer``, ``start_message_server`` and ``serve_messages``: a handler
per message, called from the reader callback; a handler that returns an awaitable pauses its
client only. Real sockets of each type, on asyncio's loop and on uvloop, no timing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

import udskit
import udskit.aio
from udskit import Connection, ConnectionClosed

from .helpers import turns_until

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
