"""pyzmq over ``ipc://`` (a Unix socket underneath): REQ/REP for round trips, PUSH/PULL for
one-way streams, default options (ZeroMQ batches small messages on its own I/O thread).

An empty message ends a test: REP echoes it and stops, PULL stops on it.
"""

from __future__ import annotations

from collections.abc import Callable

import zmq

from ..loops import make_payload, receive_all, run_round_trips, send_all, stream_check_every
from ..wire import Job, RttResult, SendResult, StreamResult

__all__ = ["rtt_client", "rtt_server", "stream_receiver", "stream_sender"]

_END = b""


def _endpoint(job: Job) -> str:
    return f"ipc://{job.address}"


def rtt_server(job: Job, ready: Callable[[str], None]) -> None:
    with zmq.Context() as context, context.socket(zmq.REP) as sock:
        sock.bind(_endpoint(job))
        ready(job.address)
        while True:
            message = sock.recv()
            sock.send(message)
            if message == _END:
                return


def rtt_client(job: Job) -> RttResult:
    payload = make_payload(job.size)
    with zmq.Context() as context, context.socket(zmq.REQ) as sock:
        sock.connect(_endpoint(job))

        def once() -> None:
            sock.send(payload)
            sock.recv()

        result = run_round_trips(once, count=job.count, warmup=job.warmup, seconds=job.seconds)
        sock.send(_END)
        sock.recv()
        return result


def stream_receiver(job: Job, ready: Callable[[str], None]) -> StreamResult:
    with zmq.Context() as context, context.socket(zmq.PULL) as sock:
        sock.bind(_endpoint(job))
        ready(job.address)
        return receive_all(lambda: 0 if sock.recv() == _END else 1)


def stream_sender(job: Job) -> SendResult:
    payload = make_payload(job.size)
    with zmq.Context() as context, context.socket(zmq.PUSH) as sock:
        sock.connect(_endpoint(job))

        def send() -> int:
            sock.send(payload)
            return 1

        check = stream_check_every(job.size)
        result = send_all(
            send, count=job.count, seconds=job.seconds, check_every=check, warmup=job.warmup
        )
        # The default linger waits until everything queued, the end marker included, is
        # delivered before the context closes.
        sock.send(_END)
        return result
