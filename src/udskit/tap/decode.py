"""Sans-IO: what the bytes a tap relays mean, for display. Bytes in, :class:`Shown` out.

A :class:`Conversation` is fed each direction's bytes as the relay read them and answers
the messages they complete, in the framing chosen (``--framing``):

* ``length``: udskit's length prefix (4 bytes, big-endian, then the payload);
* ``lines``: text lines ending in ``\\n``;
* ``http``: HTTP/1.1, parsed by h11 (requests one way, responses the other);
* ``raw``: each read as it came;
* ``auto``: decided from the first bytes: an HTTP request or status line means http, a
  first byte 0 with a plausible length means length (not PostgreSQL's first message, whose
  length counts its own 4 bytes), printable text means lines, anything else raw.

Only what is shown is kept: a message's first ``max_bytes`` and its size, however long it
is. Bytes that break the framing (a length above the frame limit, malformed HTTP) switch
that direction to raw from there on, with a note: the relay never depends on any of this.
Packets (seqpacket, datagram) are whole messages already: :func:`show_packet`.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias

from ..proto.framing import DEFAULT_MAX_FRAME, HEADER
from .events import Direction

__all__ = [
    "FRAMINGS",
    "Conversation",
    "Framing",
    "Shown",
    "preview_text",
    "show_packet",
]

Framing: TypeAlias = Literal["auto", "length", "lines", "http", "raw"]

FRAMINGS: Final = ("auto", "length", "lines", "http", "raw")

#: What a request line and a status line look like (RFC 9112 section 3 and 4).
#: What follows the length of a PostgreSQL client's first message (a length that counts
#: its own 4 bytes): protocol 3.x's startup message (major 3, then any minor), or one of
#: the requests that may come first instead: SSLRequest, GSSENCRequest, CancelRequest.
_POSTGRESQL_FIRST: Final = re.compile(rb"\x00\x03..|\x04\xd2\x16[\x2e\x2f\x30]", re.DOTALL)

_REQUEST_LINE: Final = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+ \S+ HTTP/1\.[01]\r?$")
_STATUS_LINE: Final = re.compile(rb"^HTTP/1\.[01] \d{3}")

#: How much of the first bytes ``auto`` looks at to tell text: a line's worth and more.
_GUESS_LOOK: Final = 4096

#: ASCII control characters other than tab, LF and CR.
_ASCII_CONTROL: Final = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class Shown:
    """One decoded message (or piece of one), as much of it as is shown."""

    framing: str  # length, line, http, raw, message
    size: int  # the payload's size in bytes
    preview: bytes  # its first max_bytes
    summary: str = ""  # http: the request or status line
    note: str = ""  # why the framing changed, or what is odd


#: A string as a JSON string literal, non-ASCII kept: one encoder for every line
#: (json.dumps() with an option makes a new one each call).
_quoted: Final = json.JSONEncoder(ensure_ascii=False).encode


def _is_text(text: str) -> bool:
    """No control or unprintable characters but tab, CR and LF."""
    if text.isascii():  # the common case, without a look at each character
        return _ASCII_CONTROL.search(text) is None
    return all(ch in "\t\r\n" or unicodedata.category(ch)[0] != "C" for ch in text)


def preview_text(preview: bytes, size: int) -> str:
    """A payload for one line of output: quoted text if it is text, else hex bytes; with
    the number of bytes left out when the preview is shorter than the payload."""
    try:
        text = preview.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    shown = _quoted(text) if text is not None and _is_text(text) else preview.hex(" ")
    left = size - len(preview)
    return f"{shown} ...(+{left} B)" if left > 0 else shown


def show_packet(data: bytes, framing: Framing, max_bytes: int) -> Shown:
    """One seqpacket message or datagram: a whole message by itself."""
    if framing == "length" and len(data) >= HEADER.size:
        (announced,) = HEADER.unpack_from(data)
        if announced == len(data) - HEADER.size:
            payload = data[HEADER.size :]
            return Shown("length", len(payload), payload[:max_bytes])
        note = f"length prefix says {announced} B, the message holds {len(data) - HEADER.size}"
        return Shown("message", len(data), data[:max_bytes], note=note)
    return Shown("message", len(data), data[:max_bytes])


class _Direction:
    """One direction's decoder: a state machine per framing."""

    __slots__ = ("framing", "head", "max_bytes", "need", "preview", "size")

    def __init__(self, framing: str, max_bytes: int) -> None:
        self.framing = framing
        self.max_bytes = max_bytes
        self.head = b""  # a length prefix being read
        self.need = -1  # length: payload bytes still to come (-1: reading the prefix)
        self.preview = b""
        self.size = 0

    def feed(self, data: bytes) -> list[Shown]:
        if self.framing == "length":
            return self._length(data)
        if self.framing == "lines":
            return self._lines(data)
        return [Shown("raw", len(data), data[: self.max_bytes])]

    def end(self) -> list[Shown]:
        """End of stream: what was left incomplete."""
        if self.framing == "length" and (self.head or self.need > 0):
            got = len(self.head) if self.need < 0 else self.size
            self.head, self.need = b"", -1
            return [Shown("length", got, self.preview, note="the stream ended inside this frame")]
        if self.framing == "lines" and self.size:
            shown = Shown("line", self.size, self.preview, note="no newline before the end")
            self.preview, self.size = b"", 0
            return [shown]
        return []

    def _take(self, chunk: bytes) -> None:
        room = self.max_bytes - len(self.preview)
        if room > 0:
            self.preview += chunk[:room]
        self.size += len(chunk)

    def _length(self, data: bytes) -> list[Shown]:
        out: list[Shown] = []
        view = memoryview(data)
        while view:
            if self.need < 0:
                want = HEADER.size - len(self.head)
                self.head += bytes(view[:want])
                view = view[want:]
                if len(self.head) < HEADER.size:
                    break
                (self.need,) = HEADER.unpack(self.head)
                prefix, self.head = self.head, b""
                if self.need > DEFAULT_MAX_FRAME:
                    note = (
                        f"not a length frame: a prefix announcing {self.need} B (the limit is "
                        f"{DEFAULT_MAX_FRAME}); shown raw from here"
                    )
                    self.framing, self.need = "raw", -1
                    # From the prefix on: its four bytes are the first of what is not a frame.
                    rest = prefix + bytes(view)
                    out.append(Shown("raw", len(rest), rest[: self.max_bytes], note=note))
                    return out
                self.preview, self.size = b"", 0
            take = bytes(view[: self.need])
            view = view[len(take) :]
            self._take(take)
            self.need -= len(take)
            if self.need == 0:
                out.append(Shown("length", self.size, self.preview))
                self.need, self.preview, self.size = -1, b"", 0
        return out

    def _lines(self, data: bytes) -> list[Shown]:
        out: list[Shown] = []
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                if start < len(data):
                    self._take(data[start:])
                return out
            self._take(data[start : end + 1])
            out.append(Shown("line", self.size, self.preview))
            self.preview, self.size = b"", 0
            start = end + 1


#: h11 ends some errors with the offending bytes as Python shows them ("illegal header
#: line: bytearray(b'Bad header')"); the raw bytes are shown anyway, after the note.
_H11_BYTES: Final = re.compile(r":\s*(?:bytearray\()?b['\"].*$", re.DOTALL)


def _reason(exc: Exception) -> str:
    return _H11_BYTES.sub("", str(exc)) or type(exc).__name__


class _Http:
    """Both directions of an HTTP/1.1 conversation, through two h11 connections kept in
    step: the one that reads requests plays the server, the one that reads responses the
    client, and every event one reads is sent through the other (its output discarded), so
    that each knows where the exchange is (a HEAD's response has no body, keep-alive)."""

    __slots__ = ("_body", "_broken", "_h11", "_max", "_requests", "_responses")

    def __init__(self, max_bytes: int) -> None:
        import h11  # the ``tap`` extra (and ``http``)

        self._h11 = h11
        self._requests = h11.Connection(h11.SERVER)
        self._responses = h11.Connection(h11.CLIENT)
        self._max = max_bytes
        self._body: dict[str, list[Any]] = {"up": [b"", 0], "down": [b"", 0]}
        self._broken: set[str] = set()

    def broken(self, direction: Direction) -> bool:
        return direction in self._broken

    def feed(self, direction: Direction, data: bytes) -> list[Shown]:
        h11 = self._h11
        conn = self._requests if direction == "up" else self._responses
        out: list[Shown] = []
        unread = data
        try:
            conn.receive_data(data)
            while True:
                # What h11 holds unparsed (an earlier read's part of a head, say): if this
                # event breaks, it is shown from its first byte, not from this read's.
                unread = conn.trailing_data[0]
                event = conn.next_event()
                if event is h11.NEED_DATA or event is h11.PAUSED:
                    break
                if not isinstance(event, h11.ConnectionClosed):
                    mirror = self._responses if direction == "up" else self._requests
                    mirror.send(self._mirrored(event))
                out.extend(self._event(direction, event))
                if event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                    break
                self._next_cycle()
        except (h11.ProtocolError, ValueError) as exc:
            self._broken.add(direction)
            note = f"not HTTP/1.1 ({_reason(exc)}); shown raw from here"
            out.append(Shown("raw", len(unread), unread[: self._max], note=note))
        return out

    def _mirrored(self, event: Any) -> Any:
        """The event as the other h11 connection may send it: h11 only sends HTTP/1.1 (a
        request with a Host header), so an HTTP/1.0 request (nginx's to its upstreams) or
        response is mirrored as 1.1; what matters for reading the other direction (the
        method, the status, the framing headers) is kept."""
        h11 = self._h11
        if isinstance(event, (h11.Response, h11.InformationalResponse)):
            if event.http_version != b"1.1":
                return type(event)(
                    status_code=event.status_code,
                    headers=list(event.headers),
                    reason=event.reason,
                    http_version="1.1",
                )
            return event
        if isinstance(event, h11.Request) and event.http_version != b"1.1":
            headers = list(event.headers)
            if not any(name == b"host" for name, _ in headers):
                headers.append((b"host", b"_"))
            return h11.Request(
                method=event.method, target=event.target, headers=headers, http_version="1.1"
            )
        return event

    def _next_cycle(self) -> None:
        h11 = self._h11
        if self._requests.our_state is h11.DONE and self._requests.their_state is h11.DONE:
            self._requests.start_next_cycle()
            self._responses.start_next_cycle()

    def _event(self, direction: Direction, event: object) -> list[Shown]:
        h11 = self._h11
        body = self._body[direction]
        if isinstance(event, h11.Request):
            method, target = event.method.decode(), event.target.decode()
            line = f"{method} {target} HTTP/{event.http_version.decode()}"
            return [Shown("http", 0, b"", summary=line)]
        if isinstance(event, (h11.Response, h11.InformationalResponse)):
            # A reason phrase may hold any byte from 0x80 (obs-text, RFC 9112): Latin-1, as
            # HTTP's own text is, so that no valid response reads as a decoding error.
            reason = event.reason.decode("latin-1")
            line = f"HTTP/{event.http_version.decode()} {event.status_code} {reason}"
            return [Shown("http", 0, b"", summary=line.rstrip())]
        if isinstance(event, h11.Data):
            room = self._max - len(body[0])
            if room > 0:
                body[0] += bytes(event.data[:room])
            body[1] += len(event.data)
            return []
        if isinstance(event, h11.EndOfMessage):
            preview, size = body
            body[0], body[1] = b"", 0
            return [Shown("http", size, preview, summary="body")] if size else []
        return []


class Conversation:
    """The decoder of one connection's two directions (see the module docstring)."""

    __slots__ = ("_framing", "_http", "_max", "_note", "_pending", "_sides")

    def __init__(self, framing: Framing, max_bytes: int) -> None:
        if framing not in FRAMINGS:
            raise ValueError(f"framing must be one of {', '.join(FRAMINGS)}, not {framing!r}")
        self._framing: str = framing
        self._max = max_bytes
        self._http: _Http | None = None
        self._note = ""  # said once, with the first message shown
        self._sides: dict[str, _Direction] = {}
        self._pending: dict[str, bytes] = {"up": b"", "down": b""}
        if framing != "auto":
            self._decide(framing)

    @property
    def framing(self) -> str:
        return self._framing

    def _decide(self, framing: str) -> None:
        if framing == "http":
            try:
                self._http = _Http(self._max)
            except ImportError:  # h11 comes with the ``tap`` and ``http`` extras
                framing = "raw"
                self._note = "HTTP shown raw: h11 is not installed (pip install 'udskit[tap]')"
        self._framing = framing
        for direction in ("up", "down"):
            self._sides[direction] = _Direction(framing, self._max)

    def feed(self, direction: Direction, data: bytes) -> list[Shown]:
        if not data:
            return []  # nothing to show; h11 would take it for the end of the stream
        if self._framing == "auto":
            pending = self._pending[direction] + data
            guess = _guess(pending)
            if guess is None:
                self._pending[direction] = pending
                return []
            self._decide(guess)
            data = pending
            other: Direction = "down" if direction == "up" else "up"
            held = self._pending[other]
            self._pending = {"up": b"", "down": b""}
            if held:
                return self._feed(other, held) + self._feed(direction, data)
        return self._feed(direction, data)

    def _feed(self, direction: Direction, data: bytes) -> list[Shown]:
        shown = self._decode(direction, data)
        if self._note and shown:
            first = shown[0]
            shown[0] = Shown(first.framing, first.size, first.preview, first.summary, self._note)
            self._note = ""
        return shown

    def _decode(self, direction: Direction, data: bytes) -> list[Shown]:
        side = self._sides[direction]
        if self._http is not None and side.framing == "http":
            shown = self._http.feed(direction, data)
            if self._http.broken(direction):
                side.framing = "raw"
            return shown
        return side.feed(data)

    def end(self, direction: Direction) -> list[Shown]:
        """The direction ended: show what it left incomplete."""
        pending = self._pending.get(direction, b"")
        if self._framing == "auto" and pending:
            self._pending[direction] = b""
            return [Shown("raw", len(pending), pending[: self._max])]
        side = self._sides.get(direction)
        return side.end() if side is not None else []


def _guess(data: bytes) -> str | None:
    """The framing that the first bytes suggest, or None until there are enough."""
    if not data:
        return None
    if data[0] == 0:
        if len(data) < HEADER.size:
            return None
        if all(0x20 <= byte < 0x7F for byte in data[1 : HEADER.size]):
            # A NUL, then text: D-Bus (its credentials byte, then "AUTH ..."), whose
            # "length" of 4 MiB would hold back everything the client sends.
            return "raw"
        (announced,) = HEADER.unpack_from(data)
        if announced == len(data) and _POSTGRESQL_FIRST.fullmatch(data, 4, 8):
            # A prefix that counts itself, with the whole message behind it: PostgreSQL's
            # first message. Taken for udskit's, it would wait for 4 bytes of the next
            # message, holding this one back until then, and then show both cut in the
            # wrong places. (A udskit frame whose first read stops 4 bytes short has the
            # same length, but not these codes.)
            return "raw"
        return "length" if announced <= DEFAULT_MAX_FRAME else "raw"
    line_end = data.find(b"\n")
    first = data[:line_end] if line_end >= 0 else data
    if line_end >= 0 and (_REQUEST_LINE.match(first) or _STATUS_LINE.match(first)):
        return "http"
    # Text without a line end is shown as it comes (raw) rather than held back: an
    # interactive peer may be waiting for the answer before it sends more.
    return "lines" if line_end >= 0 and _could_be_text(data[:_GUESS_LOOK]) else "raw"


def _could_be_text(data: bytes) -> bool:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        # a multi-byte character cut at the end of the read is still text
        if exc.start < len(data) - 3:
            return False
        text = data[: exc.start].decode("utf-8")
    return _is_text(text)
