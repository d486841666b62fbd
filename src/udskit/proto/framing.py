"""Framings for byte streams: length-prefixed, newline-delimited, and raw.

A framing object is fed what arrived (``receive_data``), told when the stream ended
(``receive_eof``), and asked for the next complete message (``next_message``), h11-style.
``encode`` turns a payload into the buffers to write.

Descriptors (SCM_RIGHTS) are fed with the read that brought them, and handed out with the
*last message that starts within that read*. Why: Linux's unix_stream_read_generic() copies
skb after skb into one read and detaches an skb's descriptors when it first copies from it,
then ends the read right there. So a read can start with the tail of earlier messages, but
the skb that carried the descriptors is the last one it touched, and that skb begins the
message the sender passed them with (a sender sends descriptors with one whole message per
sendmsg(), as Channel.send_fds does).

So each message gets the descriptors of one read at most. A read that holds no message's
start (a relay such as the tap passes descriptors on with the last part of what it read;
a peer that is not udskit may send them with any part) gives its descriptors to the message
around it, but only if no other read gave that message some: otherwise the stream is
refused, or a peer sending one descriptor with each byte would make one message carry as
many as it liked, however small max_fds is, and hold ours while it sends.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Final, Literal, TypeAlias

from ..errors import ConnectionClosed, FrameTooLarge, ProtocolError

__all__ = [
    "CLOSED",
    "DEFAULT_MAX_FRAME",
    "DEFAULT_MAX_LINE",
    "HEADER",
    "NEED_DATA",
    "Closed",
    "Control",
    "Decoder",
    "Framing",
    "LengthPrefixed",
    "Lines",
    "NeedData",
    "Raw",
    "default_max_frame",
    "make_framing",
]

#: Largest length-prefixed frame accepted by default. A peer can announce up to 4 GiB in the
#: header; we refuse before allocating anything, so one bad or hostile header cannot make us
#: reserve gigabytes. 16 MiB is far above any message an IPC peer should send in one piece
#: (stream large payloads in chunks, or pass a memfd with send_fds).
DEFAULT_MAX_FRAME: Final = 16 * 1024 * 1024

#: Longest line accepted by ``Lines`` (without its newline). Same reasoning as h11's
#: DEFAULT_MAX_INCOMPLETE_EVENT_SIZE: a peer that never sends the delimiter must not grow our
#: buffer without bound. 64 KiB is well above any interactive or log line.
DEFAULT_MAX_LINE: Final = 64 * 1024

#: The length prefix: 4 bytes, big-endian, unsigned.
HEADER: Final = struct.Struct(">I")
_pack: Final = HEADER.pack
_unpack_from: Final = HEADER.unpack_from

#: Up to this size a message is sliced out of the buffer directly; above it, through a
#: memoryview, which saves one copy of a large message at a fixed cost for small ones.
_SMALL: Final = 4096

#: Largest record body accepted (proto.shm's are 17 bytes): a bound, so that a bad header
#: cannot make us wait for or buffer megabytes of "record".
_MAX_RECORD: Final = 256

#: Compact the receive buffer once this many consumed bytes sit in front of it; below this,
#: moving the tail costs more than it saves.
_COMPACT_AT: Final = 64 * 1024


class NeedData:
    """Sentinel: no complete message is buffered yet; feed more data."""

    def __repr__(self) -> str:
        return "NEED_DATA"


class Closed:
    """Sentinel: the peer ended the stream at a message boundary."""

    def __repr__(self) -> str:
        return "CLOSED"


NEED_DATA: Final = NeedData()
CLOSED: Final = Closed()

#: A length header with this bit set is a shared-memory record (see proto.shm), decoded
#: only by a framing made with ``records=True``; to any other it is a frame over max_frame.
_CONTROL_BIT: Final = 0x8000_0000


class Control:
    """What ``next_message`` returns for a shared-memory record (``records=True`` only):
    its body, for :func:`udskit.proto.shm.decode_record`. Never a message."""

    __slots__ = ("body",)

    def __init__(self, body: bytes) -> None:
        self.body = body

    def __repr__(self) -> str:
        return f"Control({self.body!r})"


FramingName: TypeAlias = Literal["length", "lines", "raw"]
Payload: TypeAlias = bytes | bytearray | memoryview


def as_bytes(payload: Payload) -> Payload:
    """``payload`` as something whose len() counts bytes: a memoryview of 4-byte ints (an
    array's, say) has len() 2 for 8 bytes, which would frame a wrong length."""
    if type(payload) is bytes:
        return payload
    return memoryview(payload).cast("B")


class Decoder:
    """Shared buffering and descriptor bookkeeping for the stream framings."""

    __slots__ = ("_buf", "_eof", "_error", "_fd_tags", "_last_fds", "_pos", "_received")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0  # first unconsumed byte in _buf
        self._eof = False
        self._received = 0  # absolute stream offset of the end of _buf
        # (first, end) stream offsets of a read that brought descriptors, and those fds.
        self._fd_tags: deque[tuple[int, int, list[int]]] = deque()
        self._last_fds: list[int] = []
        self._error: ProtocolError | None = None  # the stream cannot be decoded any more

    # -- feeding -------------------------------------------------------------------------
    def receive_data(self, data: Payload, fds: Sequence[int] = ()) -> None:
        """Append one read's bytes and the descriptors that read brought (see module doc)."""
        if self._eof:
            raise ProtocolError("data received after end of stream")
        if self._error is not None:
            raise self._error
        first = self._received
        pos = self._pos
        if pos and pos == len(self._buf):
            self._buf.clear()  # everything consumed: start over, nothing to move
            self._pos = 0
        elif pos >= _COMPACT_AT and pos * 2 >= len(self._buf):
            del self._buf[:pos]
            self._pos = 0
        self._buf += data
        self._received += len(data)
        if fds:
            shared = self._shares_a_message(first)
            self._fd_tags.append((first, self._received, list(fds)))  # closed with us
            if shared:
                self._error = ProtocolError(
                    "peer sent descriptors with two parts of one message (udskit sends them "
                    "with a message's first bytes): they cannot all be that message's; they "
                    "are closed with the connection, and nothing more can be received on it"
                )
                raise self._error

    def _shares_a_message(self, first: int) -> bool:
        """Whether the read that starts at stream offset ``first`` (now buffered) holds no
        message's start, and the message around it has descriptors of another read."""
        around = -1
        for start in self._starts():
            if start >= first:
                return False  # a message starts in this read: the descriptors are its
            around = start
        # The last pending tag is the latest earlier read that brought descriptors.
        return around >= 0 and bool(self._fd_tags) and self._fd_tags[-1][1] > around

    def _starts(self) -> Iterator[int]:
        """The stream offsets where the buffered messages start, from the first one not yet
        returned, as far as the buffer tells (Raw: every read is a message)."""
        yield self._received

    def _unconsumed(self) -> int:
        """The stream offset of the first byte not yet returned in a message."""
        return self._received - (len(self._buf) - self._pos)

    def feed(self, data: Payload, fds: Sequence[int] = ()) -> bytes | NeedData | Closed | Control:
        """``receive_data`` (or ``receive_eof`` for empty ``data``), then ``next_message``.

        One call per read for the I/O layers; framings override it with a shortcut for the
        common case of a read that brought exactly one whole message.
        """
        if data:
            self.receive_data(data, fds)
        else:
            self._eof = True
        return self.next_message()

    def next_message(self) -> bytes | NeedData | Closed | Control:
        """The next complete message, NEED_DATA, or CLOSED at a clean end of stream (or a
        shared-memory record, from a ``LengthPrefixed(records=True)`` only)."""
        raise NotImplementedError

    def receive_eof(self) -> None:
        """The peer shut down its sending side."""
        self._eof = True

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned in a message."""
        return len(self._buf) - self._pos

    @property
    def at_eof(self) -> bool:
        return self._eof

    # -- descriptors ---------------------------------------------------------------------
    def take_fds(self) -> list[int]:
        """The descriptors that came with the message last returned (ownership passes)."""
        fds = self._last_fds
        if not fds:
            return []
        self._last_fds = []
        return fds

    def held_fds(self) -> list[int]:
        """Every descriptor still owned by the decoder: close these when giving up."""
        held = list(self._last_fds)
        for _, _, fds in self._fd_tags:
            held.extend(fds)
        self._last_fds = []
        self._fd_tags.clear()
        return held

    # -- for subclasses ------------------------------------------------------------------
    def _take(self, start: int, end: int, skip: int) -> bytes:
        """Return ``_buf[start:end]`` and consume through ``end + skip``."""
        if end - start <= _SMALL:
            message = bytes(self._buf[start:end])
        else:
            with memoryview(self._buf) as view:
                message = view[start:end].tobytes()
        self._pos = end + skip
        if self._fd_tags:
            self._hand_over_fds()
        return message

    def _hand_over_fds(self) -> None:
        """Give the message just consumed the descriptors whose read ended inside it.

        A read that reaches past this message's end may still hold the start of a later
        message, which then is the last to start within it: that tag waits for it.
        """
        consumed = self._received - (len(self._buf) - self._pos)  # the next message starts here
        tags = self._fd_tags
        while tags and tags[0][1] <= consumed:
            self._last_fds.extend(tags.popleft()[2])

    def _end(self, needed: int | None) -> Closed:
        """At EOF: a clean end, or ConnectionClosed if a message was cut short."""
        if self.buffered == 0:
            return CLOSED
        expect = f" of {needed}" if needed is not None else ""
        raise ConnectionClosed(
            f"peer closed the connection mid-message: {self.buffered}{expect} bytes received",
            mid_message=True,
        )


class LengthPrefixed(Decoder):
    """Each message is a 4-byte big-endian length followed by that many bytes."""

    __slots__ = ("max_frame", "records")
    name: Final = "length"

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, *, records: bool = False) -> None:
        super().__init__()
        if not 0 < max_frame <= 0xFFFFFFFF:
            raise ValueError(f"max_frame must be between 1 and {0xFFFFFFFF}, not {max_frame}")
        if records and max_frame >= _CONTROL_BIT:
            raise ValueError(
                f"max_frame must be below {_CONTROL_BIT} on a channel with shared_memory, "
                f"not {max_frame}"
            )
        self.max_frame = max_frame
        #: Decode shared-memory records (headers with the top bit) as ``Control``.
        self.records = records

    def encode(self, payload: Payload) -> list[Payload]:
        payload = as_bytes(payload)
        size = len(payload)
        if size > self.max_frame:
            raise FrameTooLarge(
                f"message of {size} bytes is over max_frame ({self.max_frame} bytes): send it "
                "in parts, pass a file descriptor instead, or raise max_frame on both ends"
            )
        return [HEADER.pack(size), payload]

    def frame(self, payload: Payload) -> bytes:
        """The encoding as one ``bytes`` (copies the payload: for small messages)."""
        if type(payload) is not bytes:
            payload = as_bytes(payload)
        size = len(payload)
        if size > self.max_frame:
            self.encode(payload)  # raises FrameTooLarge with the full explanation
        return _pack(size) + payload

    def feed(self, data: Payload, fds: Sequence[int] = ()) -> bytes | NeedData | Closed | Control:
        # Shortcut: nothing buffered, no descriptors, and the read holds exactly one frame
        # (the usual request/response case): slice the payload out, skip the buffer.
        # The same for a read that is exactly one shared-memory record (a slot, a release).
        size = len(data)
        if (
            size > HEADER.size
            and not fds
            and self._pos == len(self._buf)
            and not self._eof
            and self._error is None
        ):
            announced: int = _unpack_from(data)[0]
            if announced + HEADER.size == size and announced <= self.max_frame:
                self._received += size
                return bytes(data[HEADER.size :])
            if self.records and announced ^ _CONTROL_BIT == size - HEADER.size <= _MAX_RECORD:
                self._received += size
                return Control(bytes(data[HEADER.size :]))
        return super().feed(data, fds)

    def next_message(self) -> bytes | NeedData | Closed | Control:
        if self._error is not None:
            raise self._error
        pos = self._pos
        available = len(self._buf) - pos
        if available < HEADER.size:
            return self._end(None) if self._eof else NEED_DATA
        (size,) = HEADER.unpack_from(self._buf, pos)
        if size > self.max_frame:
            if self.records and size & _CONTROL_BIT:
                return self._record(size & ~_CONTROL_BIT, available)
            raise FrameTooLarge(
                f"peer announced a message of {size} bytes, over max_frame ({self.max_frame} "
                "bytes): the peer uses another framing, or max_frame must be raised"
            )
        if available - HEADER.size < size:
            return self._end(HEADER.size + size) if self._eof else NEED_DATA
        start = pos + HEADER.size
        return self._take(start, start + size, 0)

    def _starts(self) -> Iterator[int]:
        start = self._unconsumed()
        at = self._pos
        end = len(self._buf)
        while start < self._received:
            yield start
            if end - at < HEADER.size:
                return
            (size,) = _unpack_from(self._buf, at)
            if size > self.max_frame:
                if not (self.records and size & _CONTROL_BIT):
                    yield self._received  # not this framing: next_message says so
                    return
                size &= ~_CONTROL_BIT
            start += HEADER.size + size
            at += HEADER.size + size

    def _record(self, size: int, available: int) -> Control | NeedData | Closed:
        """A record (header top bit set) of ``size`` body bytes: whole, or wait for it."""
        if size > _MAX_RECORD:
            # Not waited for: an empty body, which no record has, so that the channel refuses
            # it as it refuses any bad record (and closes); nothing after it is decoded.
            self._error = ProtocolError(f"peer announced a shared-memory record of {size} bytes")
            return Control(b"")
        if available - HEADER.size < size:
            return self._end(HEADER.size + size) if self._eof else NEED_DATA
        start = self._pos + HEADER.size
        return Control(self._take(start, start + size, 0))

    def wanted(self) -> int:
        """Bytes still missing from the message being received (0 if none is under way)."""
        available = self.buffered
        if available < HEADER.size:
            return 0
        size: int = HEADER.unpack_from(self._buf, self._pos)[0]
        return max(0, min(size, self.max_frame) + HEADER.size - available)

    def header_only(self) -> int:
        """The announced payload size if exactly one header (and nothing else) is buffered,
        else 0: then the payload can be read straight into its own object and passed to
        ``receive_payload``, with no copy through our buffer."""
        if len(self._buf) - self._pos != HEADER.size or self._eof:
            return 0
        size: int = _unpack_from(self._buf, self._pos)[0]
        return size if size <= self.max_frame else 0

    def partial(self) -> tuple[int, int]:
        """``(size, have)`` if the buffer holds one message's header and only ``have`` of
        its ``size`` payload bytes (and so nothing after them), else ``(0, 0)``: then the
        message's own object can take those (``copy_partial``), the rest be read straight
        into it, and ``receive_rest`` complete it, with no copy through our buffer."""
        available = len(self._buf) - self._pos
        if available < HEADER.size or self._eof:
            return 0, 0
        size: int = _unpack_from(self._buf, self._pos)[0]
        have = available - HEADER.size
        if size > self.max_frame or have >= size:
            return 0, 0
        return size, have

    def copy_partial(self, into: memoryview) -> None:
        """Copy the payload bytes ``partial`` counted to the start of ``into``."""
        start = self._pos + HEADER.size
        with memoryview(self._buf) as view:
            into[: len(view) - start] = view[start:]

    def receive_rest(self, message: bytes) -> bytes:
        """Complete the message ``partial`` described: ``message`` is all of its payload,
        the part we held (``copy_partial``) and the rest, read by the caller. Returned as
        is, uncopied."""
        size, have = self.partial()
        assert size == len(message), "receive_rest() without the partial() it completes"
        self._pos = len(self._buf)
        self._received += size - have
        self._hand_over_fds()
        return message

    def receive_payload(self, payload: bytes) -> bytes | NeedData | Closed | Control:
        """Complete the frame whose header alone is buffered with ``payload`` as its body.

        When ``payload`` is the whole body it is returned as the message itself, uncopied;
        otherwise (the peer closed early, a short read) it is fed like any other data.
        """
        if len(payload) == self.header_only() and payload:
            self._pos += HEADER.size
            self._received += len(payload)
            self._hand_over_fds()
            return payload
        return self.feed(payload)


class Lines(Decoder):
    """Each message is a line ending in ``\\n`` (not included in the message).

    A last line without its newline, cut off by the end of the stream, is still delivered:
    that is what ``printf 'a\\nb' | nc -U`` means.
    """

    __slots__ = ("_scanned", "limit_name", "max_line")
    name: Final = "lines"

    def __init__(self, max_line: int = DEFAULT_MAX_LINE, *, limit_name: str = "max_line") -> None:
        """``limit_name``: the keyword its errors name as the limit to raise, the one the
        caller set it with: ``max_line`` here, ``max_frame`` for a channel's framing
        (:func:`make_framing`), which a command line shows as ``--max-frame``."""
        super().__init__()
        if max_line <= 0:
            raise ValueError(f"{limit_name} must be positive, not {max_line}")
        self.max_line = max_line
        self.limit_name = limit_name
        self._scanned = 0  # bytes after _pos already known to hold no newline

    def encode(self, payload: Payload) -> list[Payload]:
        if not isinstance(payload, (bytes, bytearray)):
            payload = memoryview(payload).tobytes()  # `in` on a memoryview compares items
        if b"\n" in payload:
            raise ProtocolError(
                "message contains a newline, which 'lines' framing uses as the delimiter: "
                "use framing='length' for binary or multi-line messages"
            )
        if len(payload) > self.max_line:
            name = self.limit_name
            raise FrameTooLarge(
                f"line of {len(payload)} bytes is over {name} ({self.max_line} bytes): send "
                f"it in parts, or raise {name} on both ends"
            )
        return [payload, b"\n"]

    def frame(self, payload: Payload) -> bytes:
        """The encoding as one ``bytes`` (copies the payload: for small messages)."""
        return b"".join(self.encode(payload))

    def _starts(self) -> Iterator[int]:
        # A line starts where the first not yet returned does, and after each newline.
        buf = self._buf
        base = self._received - len(buf)  # the stream offset of buf[0]
        at = self._pos
        while at < len(buf):
            yield base + at
            newline = buf.find(b"\n", at)
            if newline < 0:
                return
            at = newline + 1

    def next_message(self) -> bytes | NeedData | Closed | Control:
        if self._error is not None:
            raise self._error
        pos = self._pos
        newline = self._buf.find(b"\n", pos + self._scanned)
        if newline < 0:
            self._scanned = len(self._buf) - pos
            if self._scanned > self.max_line:
                raise FrameTooLarge(
                    f"peer sent over {self.max_line} bytes without a newline "
                    f"({self.limit_name}): it does not speak 'lines' framing, or "
                    f"{self.limit_name} must be raised"
                )
            if not self._eof:
                return NEED_DATA
            if self.buffered == 0:
                return CLOSED
            self._scanned = 0
            return self._take(pos, len(self._buf), 0)
        if newline - pos > self.max_line:
            raise FrameTooLarge(
                f"peer sent a line of {newline - pos} bytes, over {self.limit_name} "
                f"({self.max_line} bytes): it must send shorter lines, or "
                f"{self.limit_name} must be raised"
            )
        self._scanned = 0
        return self._take(pos, newline, 1)


class Raw(Decoder):
    """No framing: each message is whatever bytes have arrived (like ``nc -U``)."""

    __slots__ = ()
    name: Final = "raw"

    def encode(self, payload: Payload) -> list[Payload]:
        return [as_bytes(payload)]

    def frame(self, payload: Payload) -> bytes:
        """The encoding as one ``bytes``."""
        return bytes(payload)

    def next_message(self) -> bytes | NeedData | Closed | Control:
        if self.buffered == 0:
            return CLOSED if self._eof else NEED_DATA
        return self._take(self._pos, len(self._buf), 0)


Framing: TypeAlias = LengthPrefixed | Lines | Raw


def default_max_frame(name: str) -> int:
    """What bounds a message of the framing called ``name`` when ``max_frame`` is not set:
    DEFAULT_MAX_LINE for 'lines', DEFAULT_MAX_FRAME otherwise."""
    return DEFAULT_MAX_LINE if name == "lines" else DEFAULT_MAX_FRAME


def make_framing(name: str, *, max_frame: int | None = None) -> Framing:
    """The framing called ``name``. ``max_frame`` bounds a message (a line, for 'lines');
    by default :func:`default_max_frame`."""
    limit = default_max_frame(name) if max_frame is None else max_frame
    if name == "length":
        return LengthPrefixed(limit)
    if name == "lines":
        # The caller set the limit as max_frame: the errors say so (not Lines' max_line).
        return Lines(limit, limit_name="max_frame")
    if name == "raw":
        return Raw()
    raise ValueError(f"unknown framing {name!r}: choose 'length', 'lines' or 'raw'")
