"""udskit's blocking API: ``udskit.listen``/``udskit.connect`` Channels, one ``send()`` and
``recv()`` per message; the many-clients echo server is ``udskit.Server`` (a thread per
client). Options select the fast paths: ``spin`` (``Channel.spin``, microseconds of polling
before blocking, on both peers) and ``batch`` (``send_many``/``recv_many``).
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Final

import udskit

from ..loops import make_payload, receive_all, run_round_trips, send_all, stream_check_every
from ..wire import Job, RttResult, SendResult, StreamResult

__all__ = [
    "BATCH_BYTES",
    "echo_server",
    "rtt_client",
    "rtt_server",
    "stream_receiver",
    "stream_sender",
]

#: Listen backlog for the echo server: its clients connect in a burst. The kernel caps it at
#: net.core.somaxconn (4096 since Linux 5.4); clients beyond it wait in connect().
_BACKLOG: Final = 4096

#: A send_many() batch carries about this many payload bytes (at least one message, at most
#: BATCH_MESSAGES): enough to amortise the system call, small enough to stay well inside
#: the socket buffer so that sender and receiver overlap.
BATCH_BYTES: Final = 64 * 1024
BATCH_MESSAGES: Final = 1024


def _tuned(job: Job, channel: udskit.Channel) -> udskit.Channel:
    spin = job.option("spin", 0)
    if spin:
        channel.spin = int(spin)
    return channel


def _accept_one(job: Job, ready: Callable[[str], None]) -> udskit.Channel:
    with udskit.listen(job.address) as listener:
        ready(job.address)
        return _tuned(job, listener.accept())


def _connect(job: Job) -> udskit.Channel:
    return _tuned(job, udskit.connect(job.address))


def rtt_server(job: Job, ready: Callable[[str], None]) -> None:
    with _accept_one(job, ready) as channel:
        for message in channel:
            channel.send(message)


def rtt_client(job: Job) -> RttResult:
    payload = make_payload(job.size)
    with _connect(job) as channel:

        def once() -> None:
            channel.send(payload)
            channel.recv()

        return run_round_trips(once, count=job.count, warmup=job.warmup, seconds=job.seconds)


def stream_receiver(job: Job, ready: Callable[[str], None]) -> StreamResult:
    with _accept_one(job, ready) as channel:
        if job.option("batch", False):
            return receive_all(lambda: _recv_many(channel))

        def one() -> int:
            try:
                channel.recv()
            except udskit.ConnectionClosed as exc:
                if exc.mid_message:
                    raise
                return 0
            return 1

        return receive_all(one)


def _recv_many(channel: udskit.Channel) -> int:
    try:
        return len(channel.recv_many())
    except udskit.ConnectionClosed as exc:
        if exc.mid_message:
            raise
        return 0


def stream_sender(job: Job) -> SendResult:
    payload = make_payload(job.size)
    with _connect(job) as channel:
        if job.option("batch", False):
            batch = [payload] * max(1, min(BATCH_MESSAGES, BATCH_BYTES // job.size))

            def send() -> int:
                channel.send_many(batch)
                return len(batch)

            check = max(1, stream_check_every(job.size) // len(batch))
        else:

            def send() -> int:
                channel.send(payload)
                return 1

            check = stream_check_every(job.size)
        return send_all(
            send, count=job.count, seconds=job.seconds, check_every=check, warmup=job.warmup
        )


def echo_server(job: Job, ready: Callable[[str], None]) -> None:
    """``udskit.Server`` echoing every message, a thread per client, until SIGTERM.

    ``max_clients`` is the job's client count, whatever the Server's default: a server that
    stops accepting at its cap would leave the rest of the clients waiting in connect().
    """

    def echo(channel: udskit.Channel) -> None:
        for message in channel:
            channel.send(message)

    with udskit.Server(job.address, echo, max_clients=job.clients, backlog=_BACKLOG) as server:
        signal.signal(signal.SIGTERM, lambda signum, frame: server.stop())
        ready(job.address)
        server.serve_forever()
