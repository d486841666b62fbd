"""Seqpacket and datagram specifics over asyncio, listener iteration, and what a channel or
listener closes behind it: full sockets that make senders wait, read-ahead limits, unbound
datagram senders, descriptors nobody took."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

import udskit
import udskit.aio
from udskit import ConnectionClosed, Timeout

from ..conftest import open_fds
from .helpers import first_error, idle_turns, numbered, turns_until

Run = Callable[[Coroutine[Any, Any, Any]], Any]


@pytest.mark.parametrize("kind", ["seqpacket", "dgram"])
def test_a_full_packet_socket_makes_the_sender_wait(arun: Run, kind: str) -> None:
    async def main() -> None:
        sender, reader = udskit.aio.pair(kind, sndbuf=8192, rcvbuf=8192)
        messages = numbered(400, 1024)
        done = 0

        async def send_all() -> None:
            nonlocal done
            for message in messages:
                await sender.send(message)
                done += 1

        task = asyncio.ensure_future(send_all())
        await idle_turns()
        assert not task.done(), "the socket filled up: send() waits, nothing is queued"
        assert 0 < done < len(messages)
        assert sender.write_buffer_size == 0
        received = [await reader.recv() for _ in messages]
        await task
        assert received == messages
        sender.settimeout(0.02)
        timed_out = await first_error(lambda: sender.send(b"filler"), Timeout)
        assert "send timed out" in str(timed_out)
        sender.close()
        reader.close()

    arun(main())


def test_datagram_send_to_a_full_receiver_retries(arun: Run, sockdir: Path) -> None:
    """An unconnected sender gets no event when the receiver's queue frees up: send_to()
    retries after growing pauses, and gives up at its timeout."""
    path = sockdir / "slow.sock"

    async def main() -> None:
        async with await udskit.aio.listen(path, type="dgram") as receiver:
            own = sockdir / "sender.sock"
            async with await udskit.aio.listen(own, type="dgram") as sender:
                sent = 0

                async def flood() -> None:
                    nonlocal sent
                    while True:
                        await sender.send_to(path, b"%06d" % sent)
                        sent += 1

                task = asyncio.ensure_future(flood())
                await turns_until(lambda: sent > 0)
                await idle_turns()
                assert not task.done()
                stuck = sent
                first = await receiver.recv()  # room for one more
                assert first.data == b"000000"
                await turns_until(lambda: sent > stuck)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                sender.settimeout(0.02)
                timed_out = await first_error(lambda: sender.send_to(path, b"more"), Timeout)
                assert f"send on {path} timed out" in str(timed_out)

    arun(main())


def test_datagram_listener_reads_ahead_a_bounded_number(arun: Run, sockdir: Path) -> None:
    path = sockdir / "many.sock"

    async def main() -> None:
        async with await udskit.aio.listen(path, type="dgram") as listener:
            with udskit.connect(path, type="dgram") as client:
                client.socket.setblocking(False)
                sent = 0
                try:
                    while sent < 2000:
                        client.send(b"%06d" % sent)
                        sent += 1
                except udskit.Timeout:
                    pass  # the kernel queue is full (non-blocking: "would block")
                first = await listener.recv()
                await idle_turns()
                assert len(listener._ready) <= 256
                rest = [await listener.recv() for _ in range(sent - 1)]
                assert [first.data, *(d.data for d in rest)] == [b"%06d" % i for i in range(sent)]

    arun(main())


def test_datagram_from_an_unbound_sender_cannot_be_answered(arun: Run, sockdir: Path) -> None:
    path = sockdir / "dgram.sock"
    failures: list[str] = []

    async def handler(session: udskit.aio.Channel) -> None:
        assert await session.recv() == b"anonymous"
        assert session.address is None
        try:
            await session.send(b"reply")
        except ConnectionClosed as exc:
            failures.append(str(exc))

    async def main() -> None:
        async with await udskit.aio.start_server(path, handler, type="dgram") as server:
            serving = asyncio.ensure_future(server.serve_forever())
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as unbound:
                unbound.sendto(b"anonymous", str(path))
            await turns_until(lambda: bool(failures))
            server.stop()
            await serving
        assert failures == [
            (
                "cannot reply to this datagram: its sender did not bind an address "
                "(a udskit client always does; connect with bind= from other programs)"
            )
        ]

    arun(main())


def test_listeners_iterate_until_closed(arun: Run, sockdir: Path) -> None:
    async def main() -> None:
        stream = await udskit.aio.listen(sockdir / "s.sock")
        datagrams = await udskit.aio.listen(sockdir / "d.sock", type="dgram")
        clients = [await udskit.aio.connect(sockdir / "s.sock") for _ in range(3)]
        async with await udskit.aio.connect(sockdir / "d.sock", type="dgram") as sender:
            await sender.send_many([b"a", b"b"])
            accepted: list[udskit.aio.Channel] = []
            received: list[bytes] = []

            async def accept_all() -> None:
                async for channel in stream:
                    accepted.append(channel)
                    if len(accepted) == 3:
                        stream.close()

            async def receive_all() -> None:
                async for datagram in datagrams:
                    received.append(datagram.data)
                    if len(received) == 2:
                        datagrams.close()

            await asyncio.gather(accept_all(), receive_all())
        assert len(accepted) == 3
        assert received == [b"a", b"b"]
        with pytest.raises(ConnectionClosed, match="is closed"):
            await stream.accept()
        with pytest.raises(ConnectionClosed, match="is closed"):
            await datagrams.recv()
        for channel in [*accepted, *clients]:
            channel.close()
        assert not (sockdir / "s.sock").exists()
        assert not (sockdir / "d.sock").exists()

    arun(main())


@pytest.mark.parametrize("kind", ["stream", "seqpacket", "dgram"])
def test_close_closes_descriptors_nobody_took(arun: Run, kind: str) -> None:
    async def main() -> None:
        before = open_fds()
        sender, receiver = udskit.aio.pair(kind)
        read_end, write_end = os.pipe()
        await sender.send_fds(b"first", [read_end])
        await sender.send_fds(b"second", [write_end])
        os.close(read_end)
        os.close(write_end)
        assert await receiver.recv() == b"first"  # the reader has queued "second" by now
        await turns_until(lambda: bool(receiver._ready))
        receiver.close()
        sender.close()
        assert open_fds() == before

    arun(main())


def test_datagram_listener_close_closes_queued_descriptors(arun: Run, sockdir: Path) -> None:
    path = sockdir / "fds.sock"

    async def main() -> None:
        before = open_fds()
        listener = await udskit.aio.listen(path, type="dgram")
        with udskit.connect(path, type="dgram") as client:
            read_end, write_end = os.pipe()
            client.send(b"plain")
            client.send_fds(b"with fds", [read_end, write_end])
            os.close(read_end)
            os.close(write_end)
            assert (await listener.recv()).data == b"plain"
            await turns_until(lambda: bool(listener._ready))
        listener.close()
        assert open_fds() == before

    arun(main())


def test_channel_properties(arun: Run) -> None:
    async def main() -> None:
        left, right = udskit.aio.pair("seqpacket")
        assert (left.type, left.framing, left.address, left.closed) == (
            "seqpacket",
            None,
            None,
            False,
        )
        assert left.fileno() == left.socket.fileno()
        assert "aio.Channel seqpacket unnamed" in repr(left)
        with pytest.raises(ValueError, match="timeout must be"):
            left.settimeout(-1)
        with pytest.raises(ValueError, match="timeout must be"):
            left.settimeout(float("nan"))
        await left.send(b"plain")
        assert await right.recv_fds() == (b"plain", [])
        left.close()
        assert left.closed
        assert "closed" in repr(left)
        right.close()
        stream, other = udskit.aio.pair(framing="lines")
        assert stream.framing == "lines"
        with pytest.raises(udskit.ProtocolError, match="newline"):
            await stream.send(b"two\nlines")
        stream.close()
        other.close()

    arun(main())


def test_a_listener_outlives_its_loop(loop_name: str, sockdir: Path) -> None:
    use_uvloop = loop_name == "uvloop"
    path = sockdir / "long-lived.sock"

    async def make() -> udskit.aio.Listener:
        listener = await udskit.aio.listen(path)
        listener.settimeout(0.01)
        with pytest.raises(Timeout):
            await listener.accept()  # its reader is now registered with this loop
        listener.settimeout(None)
        return listener

    listener = udskit.aio.run(make(), use_uvloop=use_uvloop)

    async def serve_one() -> bytes:
        async with await udskit.aio.connect(path) as client:
            await client.send(b"on the next loop")
            async with await listener.accept() as server:
                return await server.recv()

    try:
        assert udskit.aio.run(serve_one(), use_uvloop=use_uvloop) == b"on the next loop"
    finally:
        listener.close()
