"""What ``udskit serve`` does with each message: echo, upper, print, reply (``--exec``: see
:mod:`._exec`); the ``--until`` test that stops it; and the session kept per client.

Every action works on messages. What a message is depends on the socket: one datagram or
seqpacket packet, one frame (``--framing length``), one line (``--framing lines``) or, on a
raw stream, whatever bytes arrived together (for a peer typing in ``nc -U``, one line).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import udskit

from ._output import HexDump, Output, as_line, err

if TYPE_CHECKING:
    from ._exec import Command

__all__ = ["STOP", "Action", "Session", "Until", "echo", "make_print", "make_reply", "upper"]


class Until:
    """Recognises the ``--until TEXT`` message.

    A message equals TEXT if it is TEXT, optionally followed by ``\\n`` or ``\\r\\n`` (what
    ``nc`` and ``socat`` send for a typed line). On a raw stream, where bytes arrive in
    arbitrary pieces, the test is per line: a line equal to TEXT, wherever the pieces split.
    """

    __slots__ = ("_line", "_overflow", "_raw", "_text")

    def __init__(self, text: bytes | None, *, raw: bool) -> None:
        self._text = text
        self._raw = raw
        self._line = b""
        self._overflow = False  # the current line is already longer than TEXT

    def feed(self, message: bytes) -> int | None:
        """The length of ``message`` up to and including the match, or None."""
        text = self._text
        if text is None:
            return None
        if not self._raw:
            return len(message) if _bare(message) == text else None
        start = 0
        while True:
            newline = message.find(b"\n", start)
            if newline < 0:
                self._extend(message[start:])
                return None
            self._extend(message[start:newline])
            line, overflow = self._line, self._overflow
            self._line, self._overflow = b"", False
            if not overflow and line.removesuffix(b"\r") == text:
                return newline + 1
            start = newline + 1

    def matched_at_eof(self) -> bool:
        """True if a raw stream ended with TEXT as its unterminated last line."""
        return self._raw and not self._overflow and self._line == self._text

    def _extend(self, part: bytes) -> None:
        if self._overflow or self._text is None:
            return
        self._line += part
        if len(self._line) > len(self._text) + 1:  # + 1 for a '\r'
            self._line, self._overflow = b"", True


def _bare(message: bytes) -> bytes:
    return message.removesuffix(b"\n").removesuffix(b"\r")


class Session:
    """One client (or one datagram) being served, and how to report on it.

    ``exchanged`` is set once a message has crossed in either direction: a client that
    connects and leaves without a byte either way (a readiness probe such as ``udskit
    wait``) was not served, and does not use up ``--once``. ``done`` is set when the
    client's ``--until`` message has arrived: nothing after it is served.
    """

    __slots__ = ("command", "conn", "done", "dump", "exchanged", "until", "who")

    def __init__(self, conn: udskit.Connection, dump: HexDump | None, until: Until) -> None:
        self.conn = conn
        peer = conn.peer
        self.who = f"pid {peer.pid}" if peer is not None else ""
        self.dump = dump
        self.until = until
        self.exchanged = threading.Event()  # also set by the thread sending --exec output
        self.done = False
        self.command: Command | None = None  # --exec on a connection: its command

    def received(self, message: bytes) -> None:
        """Note (and dump, with -x) a message from the client."""
        self.exchanged.set()
        if self.dump is not None:
            self.dump.received(message, self.who)

    def send(self, data: bytes) -> None:
        """Send ``data`` to the client; from the serving thread or any other."""
        conn = self.conn
        if conn.type == "dgram" and conn.remote is None:
            return  # the sender has no address (socat UNIX-SENDTO): no way to answer
        # Set first: from another thread (--exec output), the send may reach the client,
        # and the client leave, before conn.send returns here; --once must know by then.
        self.exchanged.set()
        conn.send(data)
        if self.dump is not None:
            self.dump.sent(data, self.who)


class _Stop:
    """What an action returns to stop the server."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "STOP"


#: Returned by an action: stop serving.
STOP: Final = _Stop()

#: An action takes one message and returns the reply (None: no reply), or STOP.
Action = Callable[[bytes], "bytes | _Stop | None"]


def echo(message: bytes) -> bytes:
    return message


def upper(message: bytes) -> bytes:
    return message.upper()


def make_print(out: Output, *, raw: bool) -> Action:
    def show(message: bytes) -> _Stop | None:
        if out.write(message if raw else as_line(message)):
            return None
        err("stdout was closed (nobody reads it any more): stopping")
        return STOP

    return show


def make_reply(text: bytes, *, raw: bool) -> Action:
    # On a raw stream the reply ends with a newline, the only delimiter a reader like
    # nc -U sees; framings and packets delimit messages themselves.
    reply = as_line(text) if raw else text

    def answer(message: bytes) -> bytes:
        return reply

    return answer
