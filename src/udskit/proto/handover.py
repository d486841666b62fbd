"""The handover conversation: what the serving process and its successor say to each other.

Sans-IO: messages are built and checked here; :mod:`udskit.handover` moves them over a
private seqpacket socket (one message a packet, so none is ever split or joined) and passes
the listener's descriptor with the one message that carries it.

The successor (or ``udskit upgrade``) speaks first::

    successor                               serving process
    take {type}              ->
                             <-  listener {type, pid}  + the listening descriptor
                                 (or error {reason})
    ... sets up its server ...
    ready                    ->
                             <-  stopped {pid}  + its control socket (offer it now)
                                 gives up the socket file and the control socket
                                 stops accepting, finishes its clients, exits

    udskit upgrade           ->  upgrade
                                 starts a new copy of itself, which takes over as above
                             <-  upgraded {pid, old}   (or error {reason})

Every message is a JSON object with an ``op`` and the fields of that op, at most
MAX_MESSAGE bytes. Anything else (not JSON, an unknown op, a missing or mistyped field,
descriptors with a message that carries none) is a :class:`ProtocolError` and ends the
conversation; the serving process keeps serving.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Final

from ..errors import ProtocolError

__all__ = ["MAX_MESSAGE", "VERSION", "Message", "decode", "encode"]

#: The protocol's version, sent with ``take``: a serving process refuses a successor that
#: speaks another version with a message saying so, rather than misreading it.
VERSION: Final = 1

#: The largest control message: the longest one (an error's reason, which names a path of
#: up to PATH_MAX bytes) fits with room to spare; anything longer is not ours.
MAX_MESSAGE: Final = 8192

#: The largest pid Linux hands out (PID_MAX_LIMIT, 2**22): a pid field beyond it, or below
#: 1, is not a process.
PID_MAX: Final = 4_194_304

#: The fields each op carries, and their types.
_FIELDS: Final[dict[str, dict[str, type]]] = {
    "take": {"version": int, "type": str},
    "listener": {"type": str, "pid": int},
    "ready": {},
    "stopped": {"pid": int},
    "upgrade": {},
    "upgraded": {"pid": int, "old": int},
    "error": {"reason": str},
}

#: The ops that come with a descriptor: the listener, and with ``stopped`` the listening
#: control socket, so that its name never goes missing between two owners.
CARRIES_DESCRIPTOR: Final = ("listener", "stopped")


@dataclass(frozen=True, slots=True)
class Message:
    """One control message: its op and fields (``type``, ``pid``, ``old``, ``reason``,
    ``version``)."""

    op: str
    type: str = ""
    pid: int = 0
    old: int = 0
    reason: str = ""
    version: int = 0


def encode(message: Message) -> bytes:
    """The packet for ``message``: only the fields of its op."""
    fields = _FIELDS[message.op]
    body: dict[str, object] = {"op": message.op}
    body.update({name: getattr(message, name) for name in fields})
    return json.dumps(body, separators=(",", ":")).encode()


def decode(packet: bytes, descriptors: int, expected: tuple[str, ...]) -> Message:
    """Check a received packet (and how many descriptors came with it) against the ops that
    may come now; raise ProtocolError saying what was wrong."""
    if not packet:
        raise ProtocolError("the handover peer closed the conversation")
    if len(packet) > MAX_MESSAGE:
        raise ProtocolError(f"handover message of {len(packet)} bytes; the limit is {MAX_MESSAGE}")
    try:
        body = json.loads(packet)
    except (UnicodeDecodeError, ValueError, RecursionError):
        # RecursionError: arrays or objects nested deeper than json parses ("[[[[..."), which
        # fit in MAX_MESSAGE many times over; no message of ours nests at all.
        raise ProtocolError("handover message is not JSON") from None
    if not isinstance(body, dict) or not isinstance(body.get("op"), str):
        raise ProtocolError("handover message is not an object with an op")
    op = body["op"]
    if op not in _FIELDS:
        raise ProtocolError(f"unknown handover op {op[:40]!r}")
    if op not in expected:
        raise ProtocolError(f"handover op {op!r} out of turn (expected {' or '.join(expected)})")
    fields: dict[str, object] = {}
    for name, kind in _FIELDS[op].items():
        value = body.get(name)
        if type(value) is not kind:  # bool is an int subclass; take neither for the other
            raise ProtocolError(f"handover {op!r} message lacks a valid {name!r}")
        if name in ("pid", "old") and not 1 <= value <= PID_MAX:  # type: ignore[operator]
            raise ProtocolError(f"handover {op!r} message has a {name} that is no process")
        fields[name] = value
    wanted = 1 if op in CARRIES_DESCRIPTOR else 0
    if descriptors != wanted:
        raise ProtocolError(
            f"handover {op!r} message came with {descriptors} descriptors, not {wanted}"
        )
    return Message(op, **fields)  # type: ignore[arg-type]
