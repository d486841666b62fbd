"""Writing what crossed a socket: to stdout as it arrives, and as a hex dump on stderr (-x).

Writes go straight to the file descriptor, unbuffered, so a reply shows on a terminal the
moment it arrives and a pipeline reader sees each message without waiting for a flush.

A stdout that nobody reads any more (``udskit http ... | head -1``: head has exited) is
remembered here (:func:`stdout_gone`): the command stops writing and ends, and the entry
point then ends the process as SIGPIPE ends ``cat`` in the same place (see ``main``).
"""

from __future__ import annotations

import os
import select
import sys
import threading
from typing import Final

__all__ = [
    "HexDump",
    "Output",
    "as_line",
    "err",
    "forget_stdout_gone",
    "found_stdout_gone",
    "stdout_gone",
]

#: How a failed write names its output.
_NAMES: Final = {1: "stdout", 2: "stderr"}

#: Bytes shown per hex dump row, as in ``hexdump -C`` and ``socat -x``.
_ROW: Final = 16

#: Set once a write to stdout found that nobody reads it any more (EPIPE).
_STDOUT_GONE: Final = threading.Event()

#: What poll(2) reports to the writer of a pipe without readers (POLLERR: fs/pipe.c,
#: pipe_poll) or of a stream socket whose peer has closed (POLLHUP: af_unix.c, unix_poll).
_NO_READER: Final = select.POLLERR | select.POLLHUP


def forget_stdout_gone() -> None:
    """A new command starts (``main`` called again in one process, by tests or a program
    that embeds the CLI): what an earlier one found about its stdout is not this one's."""
    _STDOUT_GONE.clear()


def stdout_gone() -> bool:
    """True once a write to stdout failed because nobody reads it any more."""
    return _STDOUT_GONE.is_set()


def found_stdout_gone() -> bool:
    """Whether stdout has lost its reader, for a BrokenPipeError that names no descriptor
    (``print``'s): true, and remembered, if a write to stdout failed or would now fail so."""
    if not _STDOUT_GONE.is_set():
        poller = select.poll()
        poller.register(1, select.POLLOUT)
        if any(events & _NO_READER for _, events in poller.poll(0)):
            _STDOUT_GONE.set()
    return _STDOUT_GONE.is_set()


class Output:
    """Thread-safe, unbuffered writes to a descriptor (stdout by default).

    ``write`` returns False once nobody reads any more (EPIPE: ``... | head -1`` exited), so
    callers can stop instead of failing on every later message; on stdout, that is also
    remembered for the exit (:func:`stdout_gone`).
    """

    __slots__ = ("_closed", "_fd", "_lock")

    def __init__(self, fd: int = 1) -> None:
        self._fd = fd
        self._lock = threading.Lock()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def write(self, data: bytes) -> bool:
        with self._lock:
            if self._closed:
                return False
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(self._fd, view) :]
            except BrokenPipeError:
                self._closed = True
                if self._fd == 1:
                    _STDOUT_GONE.set()
                return False
            except OSError as exc:  # /dev/full, a closed stdout: say which output failed
                where = _NAMES.get(self._fd, f"descriptor {self._fd}")
                reason = os.strerror(exc.errno or 0).lower()
                raise OSError(f"cannot write to {where}: {reason}") from exc
            return True


def as_line(message: bytes) -> bytes:
    """A message as a line of output: with a newline added unless it ends with one."""
    return message if message.endswith(b"\n") else message + b"\n"


def err(text: str) -> None:
    """One line on stderr, prefixed like every udskit message, in one write (so that it
    is never split by other output on a terminal)."""
    sys.stderr.flush()
    _STDERR.write(f"udskit: {text}\n".encode(errors="replace"))


_STDERR: Final = Output(2)


class HexDump:
    """``-x``: each message, with its direction, as a hex dump on stderr.

    ``>`` is what we sent, ``<`` what we received; ``who`` names the peer when a server
    talks to several at once.
    """

    __slots__ = ("_out",)

    def __init__(self, fd: int = 2) -> None:
        self._out = Output(fd)

    def sent(self, data: bytes, who: str = "") -> None:
        self._dump(">", data, who)

    def received(self, data: bytes, who: str = "") -> None:
        self._dump("<", data, who)

    def _dump(self, arrow: str, data: bytes, who: str) -> None:
        peer = f" {who}" if who else ""
        lines = [f"{arrow}{peer} {len(data)} bytes"]
        lines.extend(
            _row(offset, data[offset : offset + _ROW]) for offset in range(0, len(data), _ROW)
        )
        self._out.write(("\n".join(lines) + "\n").encode())


def _row(offset: int, chunk: bytes) -> str:
    hexes = " ".join(f"{byte:02x}" for byte in chunk)
    if len(chunk) > _ROW // 2:
        first = " ".join(f"{byte:02x}" for byte in chunk[: _ROW // 2])
        rest = " ".join(f"{byte:02x}" for byte in chunk[_ROW // 2 :])
        hexes = f"{first}  {rest}"
    text = "".join(chr(byte) if 32 <= byte < 127 else "." for byte in chunk)
    return f"  {offset:08x}  {hexes:<49} |{text}|"
