"""Faults in the middle of a large message read in place (asyncio Channel, both loops): a
timeout or a cancellation of the receiving task, an exception inside the reader, sizes at
the limits, a peer that announces much and sends little. Whole, or the channel says it can
deliver no more; never spliced. Real sockets, a hand-written peer."""

from __future__ import annotations

import asyncio
import gc
import socket
import tracemalloc
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

import udskit.aio
from udskit import ConnectionClosed, FrameTooLarge, ProtocolError, Timeout
from udskit.aio.channel import _IN_PLACE_MIN
from udskit.proto import HEADER

from ..conftest import marked, vm_rss
from ..faults.scripted import ScriptedSocket
from ..faults.test_read_in_place import limit_address_space
from ..integration.children import run_in_child
from .helpers import turns_until
from .test_read_in_place import raw_peer

Run = Callable[[Coroutine[Any, Any, Any]], Any]


class Interrupt(Exception):
    """What the injected fault raises inside the reader."""


@pytest.mark.parametrize("how", ["timeout", "wait_for", "cancel"])
def test_a_receive_that_gives_up_inside_a_message_read_in_place_loses_nothing(
    arun: Run, rests: list[int], how: str
) -> None:
    size = 2 * _IN_PLACE_MIN
    payload = marked(size, 1)
    frame = HEADER.pack(size) + payload

    async def main() -> list[bytes]:
        with raw_peer(size) as (left, channel):
            loop = asyncio.get_running_loop()
            receiving = asyncio.ensure_future(channel.recv())
            await loop.sock_sendall(left, frame[: size // 2])
            await turns_until(lambda: channel._into is not None)
            if how != "cancel":
                receiving.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await receiving
            if how == "timeout":
                channel.settimeout(0.01)
                with pytest.raises(Timeout):
                    await channel.recv()
                channel.settimeout(None)
            elif how == "wait_for":
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(channel.recv(), 0.01)
            else:
                receiving.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await receiving
            assert channel._into is not None  # still under way
            await loop.sock_sendall(left, frame[size // 2 :] + HEADER.pack(5) + b"after")
            return [await channel.recv(), await channel.recv()]

    assert arun(main()) == [payload, b"after"]
    assert rests == [size]


def test_an_exception_inside_a_read_in_place_ends_reading_and_frees_the_message(
    arun: Run,
) -> None:
    # An exception that is not ours (a signal handler's) lands in the reader while a large
    # message is half read in place: every recv() says reading ended, and the half-filled
    # message (up to max_frame) is given up then, not held until close().
    size = 4 * _IN_PLACE_MIN
    frame = HEADER.pack(size) + marked(size, 2)
    first, rest = frame[: size // 4], frame[size // 4 :]  # made before memory is counted

    async def main() -> int:
        left, right = socket.socketpair()
        left.setblocking(False)
        scripted = ScriptedSocket(right, [])
        channel = udskit.aio.Channel(scripted, max_frame=size)
        loop = asyncio.get_running_loop()
        landed: list[type[BaseException]] = []  # the type only: a traceback holds frames
        loop.set_exception_handler(lambda _, context: landed.append(type(context["exception"])))
        try:
            receiving = asyncio.ensure_future(channel.recv())
            await loop.sock_sendall(left, first)
            await turns_until(lambda: channel._into is not None)
            scripted.reads.append(("after", Interrupt()))
            sending = asyncio.ensure_future(loop.sock_sendall(left, rest))
            with pytest.raises(ProtocolError, match="receive was interrupted"):
                await receiving
            with pytest.raises(ProtocolError, match="receive was interrupted"):
                await channel.recv()
            gc.collect()  # the injected exception's traceback is a cycle through its frames
            held = tracemalloc.get_traced_memory()[0]
            sending.cancel()
        finally:
            left.close()
            channel.close()
        assert landed == [Interrupt]
        return held

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        held = arun(main())
    finally:
        tracemalloc.stop()
    assert held - before < size // 2


@pytest.mark.parametrize(
    ("size", "in_place"),
    [(_IN_PLACE_MIN - 1, False), (_IN_PLACE_MIN, True)],
    ids=["below", "at"],
)
def test_the_in_place_threshold(arun: Run, rests: list[int], size: int, in_place: bool) -> None:
    payload = marked(size, 3)

    async def main() -> bytes:
        with raw_peer(size) as (left, channel):
            loop = asyncio.get_running_loop()
            sending = asyncio.ensure_future(loop.sock_sendall(left, HEADER.pack(size) + payload))
            got = await channel.recv()
            await sending
            return got

    assert arun(main()) == payload
    assert rests == ([size] if in_place else [])


@pytest.mark.parametrize("extra", [0, 1], ids=["max_frame", "over"])
def test_max_frame_exactly_and_one_over(arun: Run, extra: int) -> None:
    size = 2 * _IN_PLACE_MIN
    payload = marked(size + extra, 4)

    async def main() -> None:
        with raw_peer(size) as (left, channel):
            loop = asyncio.get_running_loop()
            sending = asyncio.ensure_future(
                loop.sock_sendall(left, HEADER.pack(len(payload)) + payload)
            )
            if extra:
                with pytest.raises(FrameTooLarge):
                    await channel.recv()
                assert channel._into is None
                sending.cancel()
            else:
                assert await channel.recv() == payload
                await sending

    arun(main())


def test_large_small_large_from_a_raw_peer(arun: Run, rests: list[int]) -> None:
    messages = [
        marked(_IN_PLACE_MIN, 5),
        b"s",
        marked(3 * _IN_PLACE_MIN + 1, 6),
        b"",
        marked(_IN_PLACE_MIN + 7, 7),
        b"end",
    ]
    data = b"".join(HEADER.pack(len(m)) + m for m in messages)

    async def main() -> list[bytes]:
        with raw_peer(max(map(len, messages))) as (left, channel):
            loop = asyncio.get_running_loop()
            sending = asyncio.ensure_future(loop.sock_sendall(left, data))
            got = [await channel.recv() for _ in messages]
            await sending
            return got

    assert arun(main()) == messages
    assert rests == [len(m) for m in messages if len(m) >= _IN_PLACE_MIN]


def test_a_peer_announcing_a_huge_message_and_sending_a_byte_costs_no_memory(
    arun: Run,
) -> None:
    size = 1024 * 1024 * 1024

    async def main() -> int:
        with raw_peer(size) as (left, channel):
            loop = asyncio.get_running_loop()
            receiving = asyncio.ensure_future(channel.recv())
            await turns_until(lambda: channel._reading)
            before = vm_rss()
            await loop.sock_sendall(left, HEADER.pack(size) + b"x")
            await turns_until(lambda: channel._into is not None)
            grown = vm_rss() - before
            left.close()
            with pytest.raises(ConnectionClosed):
                await receiving
            return grown

    assert arun(main()) < 64 * 1024 * 1024


def test_a_message_read_in_place_is_not_written_by_later_reads(arun: Run) -> None:
    size = 2 * _IN_PLACE_MIN
    first, second = marked(size, 8), marked(size, 9)

    async def main() -> None:
        left, right = udskit.aio.pair(max_frame=size)
        async with left, right:
            sending = asyncio.ensure_future(left.send_many([first, second]))
            got = await right.recv()
            kept = bytes(bytearray(got))
            assert await right.recv() == second
            await sending
            assert got == kept == first

    arun(main())


def test_a_huge_announced_size_there_is_no_room_for_is_received_as_it_comes(
    loop_name: str,
) -> None:
    # The peer's word alone (a header) must not fail the reader where the process cannot
    # map that much: the message goes through the framing's buffer, which holds what came.
    size = 1024 * 1024 * 1024

    async def main() -> str:
        with raw_peer(size) as (left, channel):
            loop = asyncio.get_running_loop()
            receiving = asyncio.ensure_future(channel.recv())
            await loop.sock_sendall(left, HEADER.pack(size) + b"x" * 1000)
            left.shutdown(socket.SHUT_WR)
            with pytest.raises(ConnectionClosed) as caught:
                await receiving
            return str(caught.value)

    def child() -> str:
        limit_address_space(256 * 1024 * 1024)
        report: str = udskit.aio.run(main(), use_uvloop=loop_name == "uvloop")
        return report

    assert f"mid-message: 1004 of {size + 4} bytes received" in run_in_child(child)
