"""The hand-written handoff many Python programs use for large data: a
``multiprocessing.shared_memory.SharedMemory`` block and a pipe for signalling.

The sender keeps a ring of ``SLOTS`` message-sized slots in one block, copies each payload
into a free slot and writes the slot's number (4 bytes) down a pipe; the receiver copies the
slot out to ``bytes`` and writes one byte back, which frees the slot. The block's name goes
first, down the same pipe. The runner gives each peer its ``(read_fd, write_fd)``.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from typing import Final

from ..loops import make_payload, receive_all, send_all
from ..wire import Job, SendResult, StreamResult

__all__ = ["stream_receiver", "stream_sender"]

#: Slots in the ring: as many messages in flight as udskit's pool holds in its rows.
SLOTS: Final = 2

_INDEX: Final = struct.Struct("<I")


def _read_exactly(fd: int, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            return data
        data += chunk
    return data


def stream_receiver(job: Job, ready: Callable[[str], None]) -> StreamResult:
    read_fd, write_fd = job.fds
    ready("pipes")
    try:
        length = _read_exactly(read_fd, 2)
        if len(length) < 2:
            return receive_all(lambda: 0)
        name = _read_exactly(read_fd, int.from_bytes(length, "little")).decode()
        block = SharedMemory(name)
        buffer = block.buf
        assert buffer is not None
        # Python 3.11 registers an attached block with the resource tracker, which would
        # unlink it (with a warning) when we exit: it is the sender's to remove.
        resource_tracker.unregister(block._name, "shared_memory")  # type: ignore[attr-defined]
        size = job.size

        def one() -> int:
            index = _read_exactly(read_fd, _INDEX.size)
            if not index:
                return 0
            start = _INDEX.unpack(index)[0] * size
            bytes(buffer[start : start + size])  # the copy out
            os.write(write_fd, b"\x01")
            return 1

        try:
            return receive_all(one)
        finally:
            block.close()
    finally:
        os.close(read_fd)
        os.close(write_fd)


def stream_sender(job: Job) -> SendResult:
    read_fd, write_fd = job.fds
    size = job.size
    block = SharedMemory(create=True, size=SLOTS * size)
    try:
        name = block.name.encode()
        os.write(write_fd, len(name).to_bytes(2, "little") + name)
        payload = make_payload(size)
        buffer = block.buf
        assert buffer is not None
        free = SLOTS
        slot = 0

        def send() -> int:
            nonlocal free, slot
            while not free:
                acks = os.read(read_fd, SLOTS)
                if not acks:
                    raise ConnectionError("the receiver went away")
                free += len(acks)
            start = slot * size
            buffer[start : start + size] = payload  # the copy in
            os.write(write_fd, _INDEX.pack(slot))
            slot = (slot + 1) % SLOTS
            free -= 1
            return 1

        result = send_all(
            send, count=job.count, seconds=job.seconds, check_every=1, warmup=job.warmup
        )
        os.close(write_fd)
        write_fd = -1
        while os.read(read_fd, 4096):  # until the receiver is done and closes its end
            pass
        return result
    finally:
        if write_fd >= 0:
            os.close(write_fd)
        os.close(read_fd)
        block.close()
        block.unlink()
