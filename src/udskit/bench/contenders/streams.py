"""asyncio streams over AF_UNIX (``start_unix_server`` / ``open_unix_connection``), on the
standard event loop or on uvloop, with the length prefix read by ``readexactly``: the way
asyncio's documentation shows it.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ..loops import areceive_all, arun_round_trips, asend_all, make_payload, stream_check_every
from ..wire import Job, RttResult, SendResult, StreamResult
from . import aloop
from .frames import HEADER, frame

__all__ = [
    "echo_server",
    "rtt_client",
    "rtt_server",
    "stream_receiver",
    "stream_sender",
]

#: Listen backlog for the echo server: its clients connect in a burst. The kernel caps it at
#: net.core.somaxconn (4096 since Linux 5.4); clients beyond it wait in connect().
_BACKLOG = 4096

T = TypeVar("T")


async def _read(reader: asyncio.StreamReader) -> bytes | None:
    """The next payload, or None at a clean end of stream."""
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None
    (size,) = HEADER.unpack(header)
    return await reader.readexactly(size)


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while (message := await _read(reader)) is not None:
            writer.write(frame(message))
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass  # the client went away: it is done
    finally:
        writer.close()


async def _serve_one(
    job: Job,
    ready: Callable[[str], None],
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[T]],
) -> T:
    """Accept one connection, run ``handler`` on it, stop listening; the handler's result."""
    done: asyncio.Future[T] = asyncio.get_running_loop().create_future()

    async def once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            done.set_result(await handler(reader, writer))
        except Exception as exc:  # noqa: BLE001 - handed to the waiting server
            done.set_exception(exc)

    server = await asyncio.start_unix_server(once, job.address)
    async with server:
        ready(job.address)
        return await done


def rtt_server(job: Job, ready: Callable[[str], None]) -> None:
    aloop.run(job, _serve_one(job, ready, _echo))


def rtt_client(job: Job) -> RttResult:
    return aloop.run(job, _rtt_client(job))


async def _rtt_client(job: Job) -> RttResult:
    reader, writer = await asyncio.open_unix_connection(job.address)
    payload = make_payload(job.size)

    async def once() -> None:
        writer.write(frame(payload))
        await writer.drain()
        if await _read(reader) is None:
            raise ConnectionError("the server closed the connection mid-test")

    try:
        return await arun_round_trips(once, count=job.count, warmup=job.warmup, seconds=job.seconds)
    finally:
        writer.close()
        await writer.wait_closed()


def stream_receiver(job: Job, ready: Callable[[str], None]) -> StreamResult:
    return aloop.run(job, _serve_one(job, ready, _receive))


async def _receive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> StreamResult:
    async def one() -> int:
        return 0 if await _read(reader) is None else 1

    try:
        return await areceive_all(one)
    finally:
        writer.close()


def stream_sender(job: Job) -> SendResult:
    return aloop.run(job, _stream_sender(job))


async def _stream_sender(job: Job) -> SendResult:
    _, writer = await asyncio.open_unix_connection(job.address)
    payload = make_payload(job.size)
    header = HEADER.pack(job.size)

    async def send() -> int:
        writer.write(header + payload)
        await writer.drain()
        return 1

    try:
        check = stream_check_every(job.size)
        return await asend_all(
            send, count=job.count, seconds=job.seconds, check_every=check, warmup=job.warmup
        )
    finally:
        writer.close()
        await writer.wait_closed()


def echo_server(job: Job, ready: Callable[[str], None]) -> None:
    aloop.run(job, _echo_server(job, ready))


async def _echo_server(job: Job, ready: Callable[[str], None]) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    server = await asyncio.start_unix_server(_echo, job.address, backlog=_BACKLOG)
    async with server:
        ready(job.address)
        await stop.wait()
