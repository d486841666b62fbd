"""udskit's asyncio API on the standard loop or on uvloop: ``udskit.aio.listen`` /
``udskit.aio.connect`` Channels, one ``await send()`` and ``await recv()`` per message. The
many-clients echo server is ``udskit.aio.start_server`` (a task per client).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from typing import Final

import udskit
import udskit.aio

from ..loops import areceive_all, arun_round_trips, asend_all, make_payload, stream_check_every
from ..wire import Job, RttResult, SendResult, StreamResult
from . import aloop

__all__ = [
    "echo_server",
    "rtt_client",
    "rtt_server",
    "stream_receiver",
    "stream_sender",
]

#: Listen backlog for the echo server: its clients connect in a burst. The kernel caps it at
#: net.core.somaxconn (4096 since Linux 5.4); clients beyond it wait in connect().
_BACKLOG: Final = 4096


async def _accept_one(job: Job, ready: Callable[[str], None]) -> udskit.aio.Channel:
    async with await udskit.aio.listen(job.address) as listener:
        ready(job.address)
        return await listener.accept()


async def _echo(channel: udskit.aio.Channel) -> None:
    async with channel:
        try:
            async for message in channel:
                await channel.send(message)
        except udskit.ConnectionClosed:
            pass  # the client went away: it is done


def rtt_server(job: Job, ready: Callable[[str], None]) -> None:
    async def main() -> None:
        await _echo(await _accept_one(job, ready))

    aloop.run(job, main())


def rtt_client(job: Job) -> RttResult:
    async def main() -> RttResult:
        payload = make_payload(job.size)
        async with await udskit.aio.connect(job.address) as channel:

            async def once() -> None:
                await channel.send(payload)
                await channel.recv()

            return await arun_round_trips(
                once, count=job.count, warmup=job.warmup, seconds=job.seconds
            )

    return aloop.run(job, main())


def stream_receiver(job: Job, ready: Callable[[str], None]) -> StreamResult:
    async def main() -> StreamResult:
        async with await _accept_one(job, ready) as channel:

            async def one() -> int:
                try:
                    await channel.recv()
                except udskit.ConnectionClosed as exc:
                    if exc.mid_message:
                        raise
                    return 0
                return 1

            return await areceive_all(one)

    return aloop.run(job, main())


def stream_sender(job: Job) -> SendResult:
    async def main() -> SendResult:
        payload = make_payload(job.size)
        async with await udskit.aio.connect(job.address) as channel:

            async def send() -> int:
                await channel.send(payload)
                return 1

            check = stream_check_every(job.size)
            return await asend_all(
                send, count=job.count, seconds=job.seconds, check_every=check, warmup=job.warmup
            )

    return aloop.run(job, main())


def echo_server(job: Job, ready: Callable[[str], None]) -> None:
    """``udskit.aio.start_server`` echoing every message, a task per client, until SIGTERM."""

    async def echo(channel: udskit.aio.Channel) -> None:
        async for message in channel:
            await channel.send(message)

    async def main() -> None:
        server = await udskit.aio.start_server(job.address, echo, backlog=_BACKLOG)
        async with server:
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, server.stop)
            ready(job.address)
            await server.serve_forever()

    aloop.run(job, main())
