"""A request body as the exchange sends it: its length when known, then chunks read on demand.

A body is bytes (sent from memory) or a binary file object (read a chunk at a time while the
socket accepts them, so that a large upload never sits in memory whole). A regular file's
length comes from its size, and goes into ``Content-Length``; a pipe's is unknown, and the
body goes out with chunked transfer coding.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterator
from typing import BinaryIO, Final, TypeAlias

from ..errors import ProtocolError

__all__ = ["BODY_CHUNK", "RequestBody", "body_chunks", "body_length"]

#: Bytes read from a body file (or sliced from a bytes body) per chunk handed to the socket:
#: the most the exchange holds of a body at once. 256 KiB fills a Unix socket's default
#: buffers in one or two sends, so an upload streams at full speed with few system calls.
BODY_CHUNK: Final = 256 * 1024

#: What ``body=`` accepts: bytes-like data, or a file opened in binary mode.
RequestBody: TypeAlias = bytes | bytearray | memoryview | BinaryIO


def body_length(body: RequestBody) -> int | None:
    """The number of bytes ``body`` will send, or None when only reading it to the end
    can tell (a pipe, a socket, a file object without a descriptor). TypeError for a body
    that is neither bytes-like nor a binary file: found now, before anything is sent."""
    if isinstance(body, (bytes, bytearray, memoryview)):
        return memoryview(body).nbytes
    given: object = body  # what a caller may pass, whatever the annotation says
    if isinstance(given, io.TextIOBase):
        raise TypeError("body must be a file opened in binary mode ('rb'), not in text mode")
    if isinstance(given, str) or not callable(getattr(given, "read", None)):
        raise TypeError(
            "body must be bytes, bytearray, memoryview or a file opened in binary mode, "
            f"not {type(given).__name__}" + (" (encode the text)" if isinstance(given, str) else "")
        )
    try:
        fd = body.fileno()
        info = os.fstat(fd)
    except (OSError, io.UnsupportedOperation, AttributeError):
        return None
    if not stat.S_ISREG(info.st_mode):
        return None
    try:
        position = body.tell()
    except (OSError, io.UnsupportedOperation):
        return None
    return max(info.st_size - position, 0)


def body_chunks(body: RequestBody, length: int | None) -> Iterator[bytes]:
    """``body`` in chunks of at most :data:`BODY_CHUNK` bytes; a file is read as they are
    taken. With a ``length``, exactly that many bytes: a file that has shrunk since its
    size was taken raises ProtocolError (the Content-Length already sent would be a lie);
    one that has grown is sent up to its old size."""
    if isinstance(body, (bytes, bytearray, memoryview)):
        view = memoryview(body)
        # Bytes, whatever the format; a strided view (which cannot be cast) as a copy.
        view = view.cast("B") if view.c_contiguous else memoryview(view.tobytes())
        for start in range(0, len(view), BODY_CHUNK):
            yield bytes(view[start : start + BODY_CHUNK])
        return
    left = length
    while left is None or left > 0:
        chunk = body.read(BODY_CHUNK if left is None else min(BODY_CHUNK, left))
        if not chunk:
            break
        if left is not None:
            left -= len(chunk)
        yield bytes(chunk)
    if left:
        raise ProtocolError(
            f"the request body ended {left} bytes short of its Content-Length ({length}): "
            "did the file shrink while it was being sent?"
        )
