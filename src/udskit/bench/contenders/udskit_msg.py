"""udskit's message servers, for the many-clients test only: ``udskit.MessageServer``
(blocking) and ``udskit.aio.start_message_server`` (asyncio, on the standard loop or on
uvloop), each calling ``handler(conn, message)`` once per message and sending back what it
returns.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from typing import Final

import udskit
import udskit.aio

from ..wire import Job
from . import aloop

__all__ = ["echo_server"]

#: Listen backlog for the echo server: its clients connect in a burst. The kernel caps it at
#: net.core.somaxconn (4096 since Linux 5.4); clients beyond it wait in connect().
_BACKLOG: Final = 4096


def _echo(conn: udskit.Connection, message: bytes) -> bytes:
    return message


def echo_server(job: Job, ready: Callable[[str], None]) -> None:
    """Echo every message of ``job.clients`` clients until SIGTERM; ``job.options["api"]``
    says which server: ``sync`` (udskit.MessageServer) or ``aio``."""
    if job.option("api", "sync") == "aio":
        aloop.run(job, _aio_echo_server(job, ready))
        return
    with udskit.MessageServer(
        job.address, _echo, max_clients=job.clients, backlog=_BACKLOG
    ) as server:
        signal.signal(signal.SIGTERM, lambda signum, frame: server.stop())
        ready(job.address)
        server.serve_forever()


async def _aio_echo_server(job: Job, ready: Callable[[str], None]) -> None:
    server = await udskit.aio.start_message_server(
        job.address, _echo, max_clients=job.clients, backlog=_BACKLOG
    )
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, server.stop)
    ready(job.address)
    await server.serve_forever()
