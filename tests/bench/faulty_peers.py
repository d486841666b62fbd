"""Peer roles that misbehave on purpose, one way per ``fault`` option, for the runner's tests.

The runner starts them as it starts every Python peer (``python -m udskit.bench.peer``).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

from udskit.bench.wire import Job, RttResult, SendResult, StreamResult


def _fault(job: Job) -> object:
    return job.option("fault", "")


def rtt_server(job: Job, ready: Callable[[str], None]) -> None:
    fault = _fault(job)
    if fault == "crash_before_ready":
        raise RuntimeError("boom before ready")
    if fault == "never_ready":
        threading.Event().wait()  # the fault under test: the runner must kill us
    if fault == "garbage":
        print("hello", flush=True)
        return
    ready("nowhere")


def rtt_client(job: Job) -> RttResult:
    fault = _fault(job)
    if fault == "client_crash":
        print("client broke", file=sys.stderr)
        raise SystemExit(3)
    if fault == "client_hangs":
        threading.Event().wait()  # the fault under test: the runner must kill us
    return RttResult([1000, 2000, 3000])


def stream_receiver(job: Job, ready: Callable[[str], None]) -> StreamResult:
    ready("nowhere")
    # The sender's clock starts after this returns: the last message "came" a second later.
    return StreamResult(messages=7, last_ns=time.monotonic_ns() + 1_000_000_000)


def stream_sender(job: Job) -> SendResult:
    # The receiver counts 7: 10 sent is a loss; 5 after 2 warm-up messages is all of them.
    if _fault(job) == "warmup":
        return SendResult(messages=5, started_ns=time.monotonic_ns(), warmup=2)
    return SendResult(messages=10, started_ns=time.monotonic_ns())
