"""Hand-written length-prefixed framing, as a careful stdlib programmer writes it.

This is the baseline's own code (deliberately not udskit's sans-IO core): a 4-byte
big-endian length, then the payload. Reads go into one reusable buffer, several frames per
system call when they are there; a frame larger than the buffer is read straight into its own.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Final

__all__ = ["HEADER", "FrameReader", "frame"]

HEADER: Final = struct.Struct(">I")

#: Receive buffer: the same size udskit's Channel reads with, so neither side gets a bigger
#: window onto the socket than the other.
READ_CHUNK: Final = 256 * 1024


def frame(payload: bytes) -> bytes:
    """Header and payload joined: one send for a small message."""
    return HEADER.pack(len(payload)) + payload


class FrameReader:
    """Whole frames from ``read_into(view) -> bytes read`` (0 at the end of the stream)."""

    __slots__ = ("_buf", "_end", "_read_into", "_start", "_view")

    def __init__(self, read_into: Callable[[memoryview], int]) -> None:
        self._read_into = read_into
        self._buf = bytearray(READ_CHUNK)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0

    def read(self) -> bytes | bytearray | None:
        """The next payload; None at a clean end of stream; EOFError in the middle of one."""
        while True:
            have = self._end - self._start
            if not have:
                self._start = self._end = 0  # empty: read into the whole buffer again
            elif have >= HEADER.size:
                (size,) = HEADER.unpack_from(self._buf, self._start)
                whole = HEADER.size + size
                if have >= whole:
                    begin = self._start + HEADER.size
                    self._start += whole
                    return bytes(self._view[begin : begin + size])
                if whole > len(self._buf):
                    return self._read_large(size)
                if self._start + whole > len(self._buf):
                    self._compact()
            elif self._start and self._start + HEADER.size > len(self._buf):
                self._compact()
            got = self._read_into(self._view[self._end :])
            if not got:
                if self._end != self._start:
                    raise EOFError("stream ended in the middle of a frame")
                return None
            self._end += got

    def _read_large(self, size: int) -> bytearray:
        payload = bytearray(size)
        view = memoryview(payload)
        have = self._end - self._start - HEADER.size
        begin = self._start + HEADER.size
        view[:have] = self._view[begin : self._end]
        self._start = self._end = 0
        while have < size:
            got = self._read_into(view[have:])
            if not got:
                raise EOFError("stream ended in the middle of a frame")
            have += got
        return payload

    def _compact(self) -> None:
        have = self._end - self._start
        self._buf[:have] = self._view[self._start : self._end]
        self._start, self._end = 0, have
