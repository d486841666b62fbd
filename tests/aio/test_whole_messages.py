"""A message is whole, or the channel is broken (asyncio layer, both loops).

A scripted socket gives the aio channel short writes, EAGAIN and EINTR on every send path
(what the kernel does not take is queued and flushed in order), and an exception that
lands just after a write returned (the channel breaks; nothing is spliced).
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

import udskit
import udskit.aio
from udskit import ConnectionClosed

from ..faults.scripted import Drain, ScriptedSocket, Step, scripted_pair, tagged

Run = Callable[[Coroutine[Any, Any, Any]], Any]
Send = Callable[[udskit.aio.Channel, int], Awaitable[list[bytes]]]


async def _send_small(ch: udskit.aio.Channel, tag: int) -> list[bytes]:
    msg = tagged(tag, 1000)
    await ch.send(msg)
    return [msg]


async def _send_large(ch: udskit.aio.Channel, tag: int) -> list[bytes]:
    msg = tagged(tag, 200_000)
    await ch.send(msg)
    return [msg]


async def _send_fds(ch: udskit.aio.Channel, tag: int) -> list[bytes]:
    msg = tagged(tag, 3000)
    r, w = os.pipe()
    try:
        await ch.send_fds(msg, [r])
    finally:
        os.close(r)
        os.close(w)
    return [msg]


async def _send_many(ch: udskit.aio.Channel, tag: int) -> list[bytes]:
    msgs = [tagged(tag * 1000 + i, 1000) for i in range(100)]
    await ch.send_many(msgs)
    return msgs


SENDS: dict[str, Send] = {
    "send": _send_small,
    "send-large": _send_large,
    "send_fds": _send_fds,
    "send_many": _send_many,
}

#: Every way a non-blocking write can fall short, in one script.
SHORT: list[Step] = [
    ("short", 7),
    BlockingIOError(errno.EAGAIN, "busy"),
    InterruptedError(errno.EINTR, "interrupted"),
    ("short", 1),
    ("short", 4000),
]


@pytest.mark.parametrize("path", sorted(SENDS))
def test_short_writes_still_deliver_whole_messages(arun: Run, path: str) -> None:
    async def main() -> None:
        mine, theirs = scripted_pair(socket.SOCK_STREAM, SHORT)
        receiver = udskit.Channel(theirs)
        drain = Drain(receiver)
        sender = udskit.aio.Channel(mine)
        async with sender:
            sent = await SENDS[path](sender, 1) + await SENDS[path](sender, 2)
        assert not mine.script  # every step of it really ran
        got = await asyncio.get_running_loop().run_in_executor(None, drain.result)
        receiver.close()
        assert got == sent

    arun(main())


@pytest.mark.parametrize("path", sorted(SENDS))
def test_an_exception_mid_write_breaks_the_channel(arun: Run, path: str) -> None:
    async def main() -> None:
        mine, theirs = scripted_pair(socket.SOCK_STREAM, [("after", 10, KeyboardInterrupt())])
        receiver = udskit.Channel(theirs)
        drain = Drain(receiver)
        sender = udskit.aio.Channel(mine)
        async with sender:
            with pytest.raises(KeyboardInterrupt):
                await SENDS[path](sender, 1)
            for later in (lambda: sender.send(b"hello"), sender.recv):
                with pytest.raises(ConnectionClosed, match="this channel is broken"):
                    await later()
        got = await asyncio.get_running_loop().run_in_executor(None, drain.result)
        receiver.close()
        assert got == []  # ten bytes of a frame, then the end: no message at all

    arun(main())


@pytest.mark.parametrize("kind", [socket.SOCK_SEQPACKET, socket.SOCK_DGRAM])
def test_packets_wait_out_eagain_and_eintr(arun: Run, kind: int) -> None:
    async def main() -> None:
        script: list[Step] = [
            BlockingIOError(errno.EAGAIN, "busy"),
            InterruptedError(errno.EINTR, "interrupted"),
        ]
        mine, theirs = scripted_pair(kind, script)
        sender = udskit.aio.Channel(mine)
        receiver = udskit.aio.Channel(theirs)
        async with sender, receiver:
            await sender.send(b"first")
            await sender.send_many([b"second"])
            await sender.send_fds(b"third", [0])
            assert await receiver.recv() == b"first"
            assert await receiver.recv() == b"second"
            assert await receiver.recv() == b"third"
        assert mine.calls >= 3

    arun(main())


def test_a_listener_reply_waits_out_eagain_and_eintr(arun: Run, sockdir: Path) -> None:
    async def main() -> None:
        path = sockdir / "d.sock"
        async with await udskit.aio.listen(path, type="dgram") as listener:
            inner = listener._inner
            scripted = ScriptedSocket(
                inner._sock,
                [BlockingIOError(errno.EAGAIN, "busy"), InterruptedError(errno.EINTR, "again")],
            )
            inner._sock = scripted  # type: ignore[misc]
            async with await udskit.aio.connect(path, type="dgram") as client:
                await client.send(b"ping")
                datagram = await listener.recv()
                assert datagram.sender is not None
                with pytest.raises(TypeError, match="messages are bytes"):
                    await listener.send_to(datagram.sender, "text")  # type: ignore[arg-type]
                await listener.send_to(datagram.sender, b"pong")
                assert await client.recv() == b"pong"
            assert not scripted.script

    arun(main())


class Interrupt(Exception):
    """What a signal handler raises in these tests."""


def test_an_exception_after_a_read_ends_reading_instead_of_splicing(arun: Run) -> None:
    async def main() -> None:
        mine, theirs = socket.socketpair()
        scripted = ScriptedSocket(mine, [], reads=["ok", ("after", Interrupt())])
        receiver = udskit.aio.Channel(scripted)
        sender = udskit.Channel(theirs)
        loop = asyncio.get_running_loop()
        errors: list[BaseException] = []
        loop.set_exception_handler(lambda _, context: errors.append(context["exception"]))
        async with receiver:
            with sender:
                sender.send(b"first")
                assert await receiver.recv() == b"first"
                sender.send(b"x" * 100)
                sender.send(b"next")
                for _ in range(2):
                    with pytest.raises(udskit.ProtocolError, match="a receive was interrupted"):
                        await receiver.recv()
        assert [type(e) for e in errors] == [Interrupt]  # the loop saw it, as it must

    arun(main())


def test_descriptors_queued_behind_data_stay_with_their_message(arun: Run) -> None:
    async def main() -> None:
        left, right = udskit.aio.pair(write_limit=64 << 20)
        r, w = os.pipe()
        try:
            async with left, right:
                await left.send(b"F" * 4_000_000)  # the kernel's buffers fill; the rest queues
                assert left.write_buffer_size
                with_fds = asyncio.ensure_future(left.send_fds(b"with-fds", [r]))
                await asyncio.sleep(0)
                plain = asyncio.ensure_future(left.send(b"plain"))
                await asyncio.sleep(0)
                assert len(await right.recv()) == 4_000_000
                data, fds = await right.recv_fds()
                assert (data, len(fds)) == (b"with-fds", 1)
                os.close(fds[0])
                assert await right.recv_fds() == (b"plain", [])
                await with_fds
                await plain
        finally:
            os.close(r)
            os.close(w)

    arun(main())


def test_memoryviews_of_wide_items_are_framed_by_their_bytes(arun: Run) -> None:
    import array

    async def main() -> None:
        words = memoryview(array.array("I", [1, 0x41414141]))  # 8 bytes, len() 2
        left, right = udskit.aio.pair()
        async with left, right:
            await left.send(words)
            await left.send_many([words])
            await left.send(b"next")
            assert await right.recv() == words.tobytes()
            assert await right.recv() == words.tobytes()
            assert await right.recv() == b"next"

    arun(main())
