"""The asyncio message server's datagram replies: a receiver whose queue is full gets its
replies later, in order, and the loop is never blocked meanwhile."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

import udskit
import udskit.aio
import udskit.serving

#: More datagrams in flight than a receiver's queue holds (net.unix.max_dgram_qlen: 10 by
#: default, and a small SO_RCVBUF below), so that replies must wait for room.
IN_FLIGHT = 200


def test_replies_to_a_full_receiver_arrive_later_in_order(
    arun: Callable[[Coroutine[Any, Any, None]], None], sockdir: Path
) -> None:
    async def main() -> None:
        ticks = 0

        async def tick() -> None:  # proves the loop keeps running while replies wait
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        server = await udskit.aio.start_message_server(
            sockdir / "s", lambda conn, message: message.upper(), type="dgram"
        )
        serving = asyncio.create_task(server.serve_forever())
        ticker = asyncio.create_task(tick())
        client = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        client.bind(str(sockdir / "c"))
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.settimeout(5)

        def send_all() -> None:
            for number in range(IN_FLIGHT):
                client.sendto(b"m%03d" % number, str(sockdir / "s"))

        def receive_all() -> list[bytes]:
            return [client.recv(64) for _ in range(IN_FLIGHT)]

        try:
            await asyncio.to_thread(send_all)
            before = ticks
            got = await asyncio.to_thread(receive_all)
            assert got == [b"M%03d" % number for number in range(IN_FLIGHT)]
            assert ticks > before
        finally:
            client.close()
            ticker.cancel()
            server.stop()
            await serving

    arun(main())


def test_a_receiver_that_never_reads_loses_its_replies_and_nothing_else(
    arun: Callable[[Coroutine[Any, Any, None]], None],
    sockdir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(udskit.serving, "DATAGRAM_REPLY_WAIT", 0.05)

    async def main() -> None:
        server = await udskit.aio.start_message_server(
            sockdir / "s", lambda conn, message: message.upper(), type="dgram"
        )
        serving = asyncio.create_task(server.serve_forever())
        stuck = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        stuck.bind(str(sockdir / "stuck"))
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.settimeout(5)

        def flood() -> None:
            for number in range(IN_FLIGHT):
                stuck.sendto(b"m%03d" % number, str(sockdir / "s"))

        try:
            await asyncio.to_thread(flood)
            # Another sender is answered while the stuck one's replies wait and expire.
            async with await udskit.aio.connect(sockdir / "s", type="dgram") as other:
                await other.send(b"hello")
                assert await asyncio.wait_for(other.recv(), 5) == b"HELLO"
            while server._unsent:
                await asyncio.sleep(0.01)
        finally:
            stuck.close()
            server.stop()
            await serving
        assert "replies dropped" in caplog.text

    with caplog.at_level("WARNING", logger="udskit"):
        arun(main())
