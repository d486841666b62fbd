"""The asyncio layer's own buffers: where received bytes land, and how much may queue.

Socket buffer sizes (SO_SNDBUF/SO_RCVBUF) are the blocking API's: see
:data:`udskit.options.DEFAULT_STREAM_BUFFER` and docs/aio.md for the measurements.
"""

from __future__ import annotations

import threading
from typing import Final

__all__ = [
    "FDS_AHEAD",
    "FEED_SLICE",
    "READ_AHEAD",
    "RECV_CHUNK",
    "WRITE_HIGH_WATER",
    "WRITE_LOW_WATER",
    "check_write_limit",
    "scratch",
]

#: Bytes read per recvmsg() on a stream: a burst of small messages is one system call, a
#: 1 MiB message four. One buffer per thread (see ``scratch``), not per channel, so a
#: thousand idle connections cost no read buffers at all.
RECV_CHUNK: Final = 256 * 1024

#: A large read is handed to the framing in slices of at most this size. The framing appends
#: each to its buffer, which it frees whenever a read ends on a message boundary; a block
#: over glibc's mmap threshold (128 KiB at first) then comes back fresh from mmap(), a page
#: fault per page. Measured, 64 KiB messages read in 256 KiB chunks: ~55,000 faults per GiB
#: fed whole, ~800 in 64 KiB slices (and 1 MiB messages: ~6,000 against ~1,800).
FEED_SLICE: Final = 64 * 1024

#: Received but unconsumed bytes above which a channel stops reading until its owner calls
#: recv() again. Bounds what a fast sender can make a slow consumer hold (beyond one
#: max_frame message under way); the kernel queues the rest and the sender feels it.
READ_AHEAD: Final = 1024 * 1024

#: Descriptors held in received messages nobody has taken yet, above which a channel or a
#: datagram listener stops reading too (the message that crosses it is kept whole). Each is
#: an entry in this process's descriptor table: messages of a few bytes, each with max_fds
#: descriptors, would otherwise fill it (RLIMIT_NOFILE) long before READ_AHEAD bytes, and
#: every other socket and file of the process would fail with EMFILE.
FDS_AHEAD: Final = 64

#: The send queue's limits: ``await send()`` returns at once while at most WRITE_HIGH_WATER
#: bytes wait in it (the kernel's buffer being full); above that, it waits until the queue
#: has drained to WRITE_LOW_WATER. These are asyncio's transport defaults (64 KiB / 16 KiB):
#: behind a 1 MiB socket buffer, more queueing in user space adds memory, not throughput.
WRITE_HIGH_WATER: Final = 64 * 1024
WRITE_LOW_WATER: Final = 16 * 1024

#: Largest write_limit accepted: past it the queue only hides a peer that does not read.
MAX_WRITE_LIMIT: Final = 64 * 1024 * 1024

_local = threading.local()


def scratch(size: int) -> memoryview:
    """A receive buffer of at least ``size`` bytes, shared by every endpoint of the thread.

    Safe because every read copies what it keeps before returning to the event loop, and a
    thread runs one event loop at a time.
    """
    view: memoryview | None = getattr(_local, "view", None)
    if view is None or len(view) < size:
        view = memoryview(bytearray(max(size, RECV_CHUNK)))
        _local.view = view
    return view


def check_write_limit(value: int | None) -> int:
    """Validate ``write_limit`` (the send queue's high-water mark); None gives the default."""
    if value is None:
        return WRITE_HIGH_WATER
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_WRITE_LIMIT:
        raise ValueError(
            f"write_limit must be a byte count from 0 to {MAX_WRITE_LIMIT}, not {value!r}; "
            f"the default is {WRITE_HIGH_WATER}"
        )
    return value
