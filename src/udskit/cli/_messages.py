"""Bytes read from a pipe or a terminal, cut into messages: raw chunks as they come, or
lines without their newline. ``connect`` and ``pair`` read their stdin this way, ``serve
--exec`` its command's output.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Final

import udskit

__all__ = ["MAX_LINE", "READ_CHUNK", "line_limit", "messages"]

#: Bytes asked for per read; a raw chunk is one message. A terminal returns one line per
#: read whatever we ask; a pipe returns what is buffered, up to this.
READ_CHUNK: Final = 64 * 1024

#: Longest line sent as one message, so input without newlines (a binary file piped in by
#: mistake, a command printing binary) cannot grow our buffer without bound. Far above any
#: datagram a default Linux socket can carry (about 208 KiB) and above the 'lines'
#: framing's 64 KiB limit. A --max-frame above it raises it (see line_limit).
MAX_LINE: Final = 1024 * 1024


def line_limit(max_frame: int | None) -> int:
    """The longest line to read: MAX_LINE, or --max-frame if that allows longer messages."""
    return MAX_LINE if max_frame is None else max(MAX_LINE, max_frame)


def messages(
    fd: int, *, lines: bool, what: str, hint: str, limit: int = MAX_LINE
) -> Iterator[bytes]:
    """What ``fd`` gives until its end: raw chunks as they come, or lines without their
    newline (a last line without one still counts, as with ``printf 'a\\nb' | nc -U``).

    A line over ``limit`` raises FrameTooLarge, worded "``what`` is over ... : ``hint``".
    """
    pending = b""
    while True:
        chunk = os.read(fd, READ_CHUNK)
        if not chunk:
            break
        if not lines:
            yield chunk
            continue
        pending += chunk
        *complete, pending = pending.split(b"\n")
        yield from complete
        if len(pending) > limit:
            raise udskit.FrameTooLarge(f"{what} is over {limit} bytes without a newline: {hint}")
    if lines and pending:
        yield pending
