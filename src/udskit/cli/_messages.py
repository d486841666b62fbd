"""Bytes read from a pipe or a terminal, cut into messages: raw chunks as they come, or
lines without their newline. ``connect`` and ``pair`` read their stdin this way, ``serve
--exec`` its command's output.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Final

import udskit

__all__ = ["MAX_LINE", "READ_CHUNK", "messages"]

#: Bytes asked for per read; a raw chunk is one message. A terminal returns one line per
#: read whatever we ask; a pipe returns what is buffered, up to this.
READ_CHUNK: Final = 64 * 1024

#: Longest line sent as one message, so input without newlines (a binary file piped in by
#: mistake, a command printing binary) cannot grow our buffer without bound. Far above any
#: datagram a default Linux socket can carry (about 208 KiB) and above the 'lines'
#: framing's 64 KiB limit.
MAX_LINE: Final = 1024 * 1024


def messages(fd: int, *, lines: bool, what: str, hint: str) -> Iterator[bytes]:
    """What ``fd`` gives until its end: raw chunks as they come, or lines without their
    newline (a last line without one still counts, as with ``printf 'a\\nb' | nc -U``).

    A line over MAX_LINE raises FrameTooLarge, worded "``what`` is over ... : ``hint``".
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
        if len(pending) > MAX_LINE:
            raise udskit.FrameTooLarge(f"{what} is over {MAX_LINE} bytes without a newline: {hint}")
    if lines and pending:
        yield pending
