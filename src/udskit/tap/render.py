"""Events as lines of output: text (one line per message) or JSON (one object per line).

Sans-IO: :class:`Printer` turns each event into bytes and hands them to ``write``; it
keeps a :class:`~udskit.tap.decode.Conversation` per connection to decode the payloads.

A text line::

    0.001234 #1 > socat[4242] uid 1000  6 B  line "hello\\n"

the seconds since the tap started, the connection, the direction (``>`` client to
server, ``<`` back), the client (command, pid, uid), the message's size, its framing and
its payload (quoted text, or hex bytes), cut to ``max_bytes`` for display only.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Final

from ..address import one_line
from ..creds import PeerCred
from .decode import Conversation, Framing, Shown, preview_text, show_packet
from .events import Closed, Data, Event, Notice, Opened, PassedFd, Refused

__all__ = ["DEFAULT_MAX_BYTES", "Printer", "hexdump"]

#: Payload bytes shown per message by default: one terminal line's worth.
DEFAULT_MAX_BYTES: Final = 64

#: Bytes per hex dump row, as ``hexdump -C`` and ``udskit connect -x``.
_ROW: Final = 16

_ARROWS: Final = {"up": ">", "down": "<"}

# Peers choose much of a text line (a bound address, a command name, which prctl() sets
# to anything, the reason a request was refused): each goes through one_line(), so that a
# newline in one cannot start a line of its own, forged to look like the tap's.


def hexdump(data: bytes) -> list[str]:
    """``hexdump -C``-style rows."""
    rows = []
    for offset in range(0, len(data), _ROW):
        chunk = data[offset : offset + _ROW]
        hexes = chunk[:8].hex(" ") + ("  " + chunk[8:].hex(" ") if len(chunk) > 8 else "")
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        rows.append(f"  {offset:08x}  {hexes:<49} |{text}|")
    return rows


class Printer:
    """Renders events; call it with each event (from one thread at a time).

    ``write`` receives whole lines. ``packets``: the socket keeps message boundaries
    (seqpacket, datagram), so each read is one message. ``count``: write nothing after
    that many messages, and call ``done`` once they are out (``--count``).
    """

    def __init__(
        self,
        write: Callable[[bytes], object],
        *,
        start: float,
        framing: Framing = "auto",
        max_bytes: int = DEFAULT_MAX_BYTES,
        as_json: bool = False,
        hex_dump: bool = False,
        packets: bool = False,
        count: int | None = None,
        done: Callable[[], object] | None = None,
    ) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be 0 or more, not {max_bytes}")
        self._write = write
        self._start = start
        self._framing: Framing = framing
        self._max = max_bytes
        self._json = as_json
        self._hex = hex_dump
        self._packets = packets
        self._left = count
        self._done = done
        self._conversations: dict[int, Conversation] = {}
        self._clients: dict[int, PeerCred | None] = {}
        self._names: dict[int, str] = {}  # read from /proc once, at open
        self._shown: dict[int, str] = {}  # the client as each line shows it, made at open

    @property
    def finished(self) -> bool:
        """True once ``count`` messages have been written."""
        return self._left is not None and self._left <= 0

    def __call__(self, event: Event) -> None:
        if self.finished:
            return
        if isinstance(event, Data):
            self._data(event)
        elif isinstance(event, Opened):
            self._clients[event.conn] = event.client
            self._names[event.conn] = event.client.process_name if event.client else "?"
            if not self._packets:
                self._conversations[event.conn] = Conversation(self._framing, self._max)
            where = f" from {event.address}" if event.address else ""
            shown = self._shown[event.conn] = _client(event.client, self._names[event.conn])
            self._line(
                event.time,
                event.conn,
                "open",
                f"{shown}{where}",
                {
                    "event": "open",
                    **_cred(event.client, self._names[event.conn]),
                    "address": event.address,
                },
            )
        elif isinstance(event, Closed):
            self._closed(event)
        elif isinstance(event, Refused):
            self._line(
                event.time,
                event.conn,
                "refused",
                f"{_client(event.client)}: {event.reason}",
                {"event": "refused", **_cred(event.client), "reason": event.reason},
            )
        elif isinstance(event, Notice):
            self._line(event.time, None, "tap", event.text, {"event": "notice", "text": event.text})

    def _closed(self, event: Closed) -> None:
        if event.direction is None:
            self._conversations.pop(event.conn, None)
            self._clients.pop(event.conn, None)
            self._names.pop(event.conn, None)
            self._shown.pop(event.conn, None)
            self._line(event.time, event.conn, "closed", "", {"event": "closed"})
            return
        conversation = self._conversations.get(event.conn)
        if conversation is not None:
            for shown in conversation.end(event.direction):
                self._message(event.time, event.conn, event.direction, shown, (), b"")
        arrow = _ARROWS[event.direction]
        self._line(
            event.time,
            event.conn,
            arrow,
            event.reason or "ended",
            {"event": "end", "direction": event.direction, "reason": event.reason},
        )

    def _data(self, event: Data) -> None:
        conversation = self._conversations.get(event.conn)
        if conversation is None:
            decoded = [show_packet(event.data, self._framing, self._max)]
        else:
            decoded = conversation.feed(event.direction, event.data)
        fds = event.fds
        raw = event.data if self._hex else b""
        if not decoded and (fds or raw):
            decoded = [Shown("partial", len(event.data), b"", note="part of a message")]
        for shown in decoded:
            if self.finished:
                return
            self._message(event.time, event.conn, event.direction, shown, fds, raw)
            fds, raw = (), b""

    def _message(
        self,
        when: float,
        conn: int,
        direction: str,
        shown: Shown,
        fds: tuple[PassedFd, ...],
        raw: bytes,
    ) -> None:
        client = self._clients.get(conn)
        if self._json:
            record: dict[str, object] = {
                "event": "message",
                "direction": direction,
                **_cred(client, self._names.get(conn)),
                "size": shown.size,
                "framing": shown.framing,
            }
            if shown.summary:
                record["summary"] = shown.summary
            payload = shown.preview
            try:
                record["text"] = payload.decode("utf-8")
            except UnicodeDecodeError:
                record["hex"] = payload.hex()
            record["truncated"] = len(payload) < shown.size
            if fds:
                record["fds"] = [
                    {"fd": f.number, "kind": f.kind, "name": f.name, "size": f.size} for f in fds
                ]
            if shown.note:
                record["note"] = shown.note
            self._emit_json(when, conn, record)
        else:
            name = self._shown.get(conn) or _client(client, self._names.get(conn))
            # An HTTP head has no payload size of its own to show: its line is the message.
            size = "" if shown.summary and not shown.size else f"  {shown.size} B"
            parts = [f"{name}{size}  {shown.framing}"]
            if shown.summary:
                parts.append(f" {shown.summary}")
            if shown.preview or (shown.size and not shown.summary):
                parts.append(" " + preview_text(shown.preview, shown.size))
            if fds:
                parts.append(" [" + ", ".join(str(f) for f in fds) + "]")
            if shown.note:
                parts.append(f" ({shown.note})")
            text = self._prefix(when, conn, _ARROWS[direction]) + one_line("".join(parts)) + "\n"
            if raw:
                text += "\n".join(hexdump(raw[: self._max] if self._max else raw)) + "\n"
            self._write(text.encode(errors="replace"))
        if self._left is not None:
            self._left -= 1
            if self._left <= 0 and self._done is not None:
                self._done()

    def _prefix(self, when: float, conn: int | None, what: str) -> str:
        where = f"#{conn} " if conn else ""
        return f"{max(0.0, when - self._start):.6f} {where}{what} "

    def _line(
        self, when: float, conn: int | None, what: str, text: str, record: dict[str, object]
    ) -> None:
        if self._json:
            self._emit_json(when, conn, record)
            return
        self._write(
            (self._prefix(when, conn, what) + one_line(text)).rstrip().encode(errors="replace")
            + b"\n"
        )

    def _emit_json(self, when: float, conn: int | None, record: dict[str, object]) -> None:
        head: dict[str, object] = {
            "time": round(when, 6),
            "t": round(max(0.0, when - self._start), 6),
        }
        if conn:
            head["conn"] = conn
        self._write((json.dumps({**head, **record}, ensure_ascii=False) + "\n").encode())


def _client(cred: PeerCred | None, command: str | None = None) -> str:
    if cred is None:
        return "unknown sender"
    return f"{command or cred.process_name}[{cred.pid}] uid {cred.uid}"


def _cred(cred: PeerCred | None, shown: str | None = None) -> dict[str, object]:
    if cred is None:
        return {}
    command = shown or cred.process_name
    return {"pid": cred.pid, "uid": cred.uid, "gid": cred.gid, "command": command}
