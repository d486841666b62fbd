"""Two ``os.pipe()`` pipes, one each way, inherited by both peers; the hand-written framing
of :mod:`.frames` over ``os.write`` and ``os.readv``.

The runner creates the pipes and passes each peer its ``(read_fd, write_fd)`` in ``job.fds``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from ..loops import make_payload, receive_all, run_round_trips, send_all, stream_check_every
from ..wire import Job, RttResult, SendResult, StreamResult
from .frames import HEADER, FrameReader, frame

__all__ = ["rtt_client", "rtt_server", "stream_receiver", "stream_sender"]


def _ends(job: Job) -> tuple[int, int]:
    read_fd, write_fd = job.fds
    return read_fd, write_fd


def _reader(fd: int) -> FrameReader:
    return FrameReader(lambda view: os.readv(fd, [view]))


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _send(fd: int, payload: bytes | bytearray) -> None:
    if len(payload) <= 64 * 1024:
        _write_all(fd, HEADER.pack(len(payload)) + payload)
    else:
        _write_all(fd, HEADER.pack(len(payload)))
        _write_all(fd, payload)


def rtt_server(job: Job, ready: Callable[[str], None]) -> None:
    read_fd, write_fd = _ends(job)
    ready("pipes")
    try:
        reader = _reader(read_fd)
        while (message := reader.read()) is not None:
            _send(write_fd, message)
    finally:
        os.close(read_fd)
        os.close(write_fd)


def rtt_client(job: Job) -> RttResult:
    read_fd, write_fd = _ends(job)
    payload = make_payload(job.size)
    reader = _reader(read_fd)

    def once() -> None:
        _write_all(write_fd, frame(payload))
        if reader.read() is None:
            raise ConnectionError("the server closed its pipe mid-test")

    try:
        return run_round_trips(once, count=job.count, warmup=job.warmup, seconds=job.seconds)
    finally:
        os.close(read_fd)
        os.close(write_fd)


def stream_receiver(job: Job, ready: Callable[[str], None]) -> StreamResult:
    read_fd, write_fd = _ends(job)
    os.close(write_fd)
    ready("pipes")
    try:
        reader = _reader(read_fd)
        return receive_all(lambda: 0 if reader.read() is None else 1)
    finally:
        os.close(read_fd)


def stream_sender(job: Job) -> SendResult:
    read_fd, write_fd = _ends(job)
    os.close(read_fd)
    payload = make_payload(job.size)

    def send() -> int:
        _send(write_fd, payload)
        return 1

    try:
        check = stream_check_every(job.size)
        return send_all(
            send, count=job.count, seconds=job.seconds, check_every=check, warmup=job.warmup
        )
    finally:
        os.close(write_fd)
