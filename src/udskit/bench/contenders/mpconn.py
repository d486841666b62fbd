"""``multiprocessing.connection``: ``Listener``/``Client`` with ``family="AF_UNIX"`` and no
authkey, ``send_bytes``/``recv_bytes`` (a 4-byte big-endian length prefix on the wire).

The many-clients server accepts every client, then answers whichever are ready with
``multiprocessing.connection.wait()``.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from multiprocessing.connection import Client, Connection, Listener, wait

from ..loops import make_payload, receive_all, run_round_trips, send_all, stream_check_every
from ..wire import Job, RttResult, SendResult, StreamResult

__all__ = [
    "echo_server",
    "rtt_client",
    "rtt_server",
    "stream_receiver",
    "stream_sender",
]

#: Listen backlog for the echo server (Listener's default is 1).
_BACKLOG = 4096


def _accept_one(job: Job, ready: Callable[[str], None]) -> Connection:
    with Listener(job.address, family="AF_UNIX") as listener:
        ready(job.address)
        return listener.accept()


def rtt_server(job: Job, ready: Callable[[str], None]) -> None:
    with _accept_one(job, ready) as conn:
        while True:
            try:
                message = conn.recv_bytes()
            except EOFError:
                return
            conn.send_bytes(message)


def rtt_client(job: Job) -> RttResult:
    payload = make_payload(job.size)
    with Client(job.address, family="AF_UNIX") as conn:

        def once() -> None:
            conn.send_bytes(payload)
            conn.recv_bytes()

        return run_round_trips(once, count=job.count, warmup=job.warmup, seconds=job.seconds)


def stream_receiver(job: Job, ready: Callable[[str], None]) -> StreamResult:
    with _accept_one(job, ready) as conn:

        def one() -> int:
            try:
                conn.recv_bytes()
            except EOFError:
                return 0
            return 1

        return receive_all(one)


def stream_sender(job: Job) -> SendResult:
    payload = make_payload(job.size)
    with Client(job.address, family="AF_UNIX") as conn:

        def send() -> int:
            conn.send_bytes(payload)
            return 1

        check = stream_check_every(job.size)
        return send_all(
            send, count=job.count, seconds=job.seconds, check_every=check, warmup=job.warmup
        )


def echo_server(job: Job, ready: Callable[[str], None]) -> None:
    """Accept ``job.clients`` clients, then echo until they leave or SIGTERM arrives."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    clients: list[Connection] = []
    try:
        with Listener(job.address, family="AF_UNIX", backlog=_BACKLOG) as listener:
            ready(job.address)
            clients.extend(listener.accept() for _ in range(job.clients))
        while clients:
            for conn in wait(clients):
                try:
                    conn.send_bytes(conn.recv_bytes())  # type: ignore[union-attr]
                except (EOFError, OSError):
                    clients.remove(conn)  # type: ignore[arg-type]
                    conn.close()  # type: ignore[union-attr]
    except KeyboardInterrupt:
        pass  # SIGTERM: the runner is done with us
    finally:
        for conn in clients:
            conn.close()
