"""A large message on an asyncio stream channel is read straight into its own ``bytes`` once
its first part has arrived: whole, in order, with the stream going on in step after it; a
peer leaving inside it is a cut, descriptors with a later part go to the framing as with any
read, and a close() drops it. Real sockets, both loops."""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import socket
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest

import udskit
import udskit.aio
from udskit import ConnectionClosed
from udskit.aio.channel import _IN_PLACE_MIN
from udskit.freshbytes import FRESH_MIN
from udskit.proto import HEADER

from ..conftest import marked, open_fds
from .helpers import turns_until

Run = Callable[[Coroutine[Any, Any, Any]], Any]


@contextlib.contextmanager
def raw_peer(size: int) -> Iterator[tuple[socket.socket, udskit.aio.Channel]]:
    """A peer that is not udskit (a non-blocking socket, to write frames by hand) and the
    channel at its other end (max_frame ``size``); both closed afterwards."""
    left, right = socket.socketpair()
    left.setblocking(False)
    channel = udskit.aio.Channel(right, max_frame=size)
    try:
        yield left, channel
    finally:
        left.close()
        channel.close()


@pytest.mark.parametrize(
    "sizes",
    [[_IN_PLACE_MIN, 5, _IN_PLACE_MIN + 4097, 3 * _IN_PLACE_MIN], [FRESH_MIN + 12345, 7]],
    ids=["large", "fresh"],
)
def test_large_messages_arrive_whole_and_in_order(
    arun: Run, rests: list[int], sizes: list[int]
) -> None:
    messages = [marked(size, i + 1) for i, size in enumerate(sizes)]

    async def main() -> list[bytes]:
        left, right = udskit.aio.pair(max_frame=max(sizes))
        async with left, right:
            sending = asyncio.ensure_future(left.send_many(messages))
            received = [await right.recv() for _ in messages]
            await sending
        return received

    assert arun(main()) == messages
    assert rests == [size for size in sizes if size >= _IN_PLACE_MIN]


def test_a_peer_that_leaves_inside_a_message_read_in_place_is_a_cut(
    arun: Run, rests: list[int]
) -> None:
    size = 2 * _IN_PLACE_MIN
    sent = 3 * _IN_PLACE_MIN // 2

    async def main() -> ConnectionClosed:
        with raw_peer(size) as (left, channel):
            loop = asyncio.get_running_loop()
            receiving = asyncio.ensure_future(channel.recv())
            await loop.sock_sendall(left, HEADER.pack(size) + b"x" * sent)
            left.close()
            with pytest.raises(ConnectionClosed) as caught:
                await receiving
            return caught.value

    error = arun(main())
    assert error.mid_message is True
    assert f"mid-message: {sent + 4} of {size + 4} bytes received" in str(error)
    assert rests == []


def test_descriptors_with_a_later_part_reach_the_framing(arun: Run) -> None:
    size = 2 * _IN_PLACE_MIN
    payload = marked(size, 9)

    async def main() -> tuple[bytes, list[int]]:
        with raw_peer(size) as (left, channel):
            loop = asyncio.get_running_loop()
            receiving = asyncio.ensure_future(channel.recv_fds())
            await loop.sock_sendall(left, HEADER.pack(size) + payload[:_IN_PLACE_MIN])
            fds = array.array("i", [os.dup(0)])
            rest = payload[_IN_PLACE_MIN:]
            try:
                for _ in range(10_000):  # bounded: each turn lets the channel read on
                    try:
                        went = left.sendmsg(
                            [rest], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())]
                        )
                        break
                    except BlockingIOError:
                        await asyncio.sleep(0)
                else:
                    pytest.fail("the channel never read on")
            finally:
                os.close(fds[0])
            await loop.sock_sendall(left, rest[went:])  # the descriptors went with the first
            return await receiving

    message, received = arun(main())
    for fd in received:
        os.close(fd)
    assert message == payload
    assert len(received) == 1


def test_a_close_drops_a_message_being_read_in_place(arun: Run, rests: list[int]) -> None:
    size = 2 * _IN_PLACE_MIN
    before = open_fds()

    async def main() -> ConnectionClosed:
        with raw_peer(size) as (left, channel):
            loop = asyncio.get_running_loop()
            receiving = asyncio.ensure_future(channel.recv())
            await loop.sock_sendall(left, HEADER.pack(size) + b"y" * (size // 2))
            await turns_until(lambda: channel._into is not None)
            channel.close()
            with pytest.raises(ConnectionClosed) as caught:
                await receiving
            assert channel._into is None
            return caught.value

    error = arun(main())
    assert "closed" in str(error)
    assert rests == []
    assert open_fds() == before
