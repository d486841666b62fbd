"""A benchmark peer process: ``python -m udskit.bench.peer JOB_JSON``.

Pins itself to the job's CPU first (so every thread it starts later inherits the pinning),
runs one role of one contender, and answers on stdout as :mod:`udskit.bench.wire` describes.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from .host import FD_HEADROOM, pin, raise_nofile
from .wire import (
    Job,
    LoadResult,
    RttResult,
    SendResult,
    StreamResult,
    fail,
    say_not_measured,
    say_ready,
    say_result,
)

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 1:
        fail("usage: python -m udskit.bench.peer JOB_JSON")
    job = Job.from_json(args[0])
    pin(job.cpu)
    if job.role == "load":
        from .loader import load

        say_result(load(job))
        return
    if job.role == "echo_server" and job.clients:
        # One descriptor per client, as the load generator needs: raised here too, so that a
        # server started by hand (or by a runner whose own limit is lower) can hold them.
        problem = raise_nofile(job.clients + FD_HEADROOM)
        if problem:
            say_not_measured(f"the echo server cannot hold {job.clients} clients: {problem}")
    module = importlib.import_module(job.module)
    role = getattr(module, job.role)
    takes_ready = job.role in ("rtt_server", "stream_receiver", "echo_server")
    result = role(job, say_ready) if takes_ready else role(job)
    if isinstance(result, (RttResult, StreamResult, SendResult, LoadResult)):
        say_result(result)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit(130) from None
