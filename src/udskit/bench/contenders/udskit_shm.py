"""Large messages between udskit Channels: through shared memory (``shared_memory=True``),
or through the socket (the same Channel without it), one way.

Options: ``mode`` is ``socket`` (no shared memory: the reference), ``copy`` (``send`` copies
into the pool, ``recv`` copies out to bytes), ``view`` (``send`` copies in, ``recv_view``
reads in place) or ``loan`` (the sender fills a ``loan()`` in place, ``recv_view``). The
receiver of the in-place modes takes each view and releases it; it reads nothing, as no
receiver in the other rows reads what it got.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import udskit
from udskit.proto import DEFAULT_MAX_FRAME
from udskit.proto.shm import SHARED_THRESHOLD

from ..loops import make_payload, receive_all, send_all
from ..wire import Job, SendResult, StreamResult

__all__ = ["pool_size", "stream_receiver", "stream_sender"]

#: Messages of one size the pool holds: two, so the sender fills one while the receiver
#: holds the other (as the hand-written handoff's ring does), and memory stays bounded by
#: twice the message. A larger pool lets the sender run further ahead, which here only
#: spreads the copies over more memory: with 64 MiB for 16 MiB messages, copy-out measured
#: 0.6-0.8x of what two slots give.
_IN_FLIGHT: Final = 2

#: What the receiver sends first, once the channel is set up: the sender starts its clock
#: after it, so connection set-up (and the listener's shared-memory offer) is not measured.
_GO: Final = b"go"


def pool_size(size: int) -> int:
    """The pool for messages of ``size`` bytes."""
    return max(SHARED_THRESHOLD, _IN_FLIGHT * size)


def _options(job: Job) -> tuple[int, int | bool]:
    """max_frame and shared_memory for this job."""
    shared = job.option("mode", "copy") != "socket"
    return max(job.size, DEFAULT_MAX_FRAME), pool_size(job.size) if shared else False


def stream_receiver(job: Job, ready: Callable[[str], None]) -> StreamResult:
    in_place = job.option("mode", "copy") in ("view", "loan")
    max_frame, pool = _options(job)
    with udskit.listen(job.address, max_frame=max_frame, shared_memory=pool) as listener:
        ready(job.address)
        channel = listener.accept()
    with channel:
        channel.send(_GO)

        def one() -> int:
            try:
                if in_place:
                    channel.recv_view().release()
                else:
                    channel.recv()
            except udskit.ConnectionClosed as exc:
                if exc.mid_message:
                    raise
                return 0
            return 1

        return receive_all(one)


def stream_sender(job: Job) -> SendResult:
    mode = job.option("mode", "copy")
    size = job.size
    max_frame, pool = _options(job)
    with udskit.connect(job.address, max_frame=max_frame, shared_memory=pool) as channel:
        if channel.recv() != _GO:
            raise ConnectionError("the receiver did not say go")
        if mode != "socket" and not channel.shared_memory:
            raise ConnectionError("shared memory was not agreed with the receiver")
        if mode == "loan":

            def send() -> int:
                channel.send(channel.loan(size))
                return 1

        else:
            payload = make_payload(size)

            def send() -> int:
                channel.send(payload)
                return 1

        return send_all(
            send, count=job.count, seconds=job.seconds, check_every=1, warmup=job.warmup
        )
