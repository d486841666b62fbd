"""One connect attempt, and what came of it: the probe under doctor, ls --stale and wait."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

from ..address import Address, AddressLike, sun_path
from ..creds import PeerCred, peer_cred
from ..errors import AddressError
from ..translate import explain_connect

__all__ = ["TYPES", "Attempt", "SocketTypeName", "try_connect", "type_name"]

SocketTypeName: TypeAlias = Literal["stream", "seqpacket", "dgram"]

#: The socket types, in the order a probe tries them when the type is not known.
TYPES: Final[dict[SocketTypeName, int]] = {
    "stream": socket.SOCK_STREAM,
    "seqpacket": socket.SOCK_SEQPACKET,
    "dgram": socket.SOCK_DGRAM,
}


@dataclass(frozen=True, slots=True)
class Attempt:
    """The outcome of one connect: whether it worked, with which type, and if not, why."""

    ok: bool
    type: SocketTypeName | None = None  # the type that connected (or the one refused)
    errno: int = 0
    reason: str = ""  # one line: why it failed, and what to do
    peer: PeerCred | None = None  # the server, for stream and seqpacket


def try_connect(
    address: AddressLike,
    type: str | None = None,  # noqa: A002 - mirrors udskit.connect
    *,
    timeout: float = 1.0,
) -> Attempt:
    """Connect once, without waiting on a Unix socket; report what happened.

    ``type=None`` tries stream, then seqpacket, then dgram, until one is not refused as
    the wrong type. ``timeout`` bounds a TCP connect only (a Unix connect never waits: a
    full backlog is reported as EAGAIN).

    The wrong type shows differently by namespace (net/unix/af_unix.c): a socket file is
    found by its inode whatever its type, and a connect of another type fails with
    EPROTOTYPE; an abstract name is looked up together with the type, so a name bound by a
    socket of another type answers ECONNREFUSED, like a name nobody holds.
    """
    target = Address.parse(address)
    if target.kind == "tcp":
        return _try_tcp(target, timeout)
    if not target.is_unix:
        raise AddressError(f"{target}: give a path, @name or tcp:HOST:PORT to connect to")
    kinds: Iterable[SocketTypeName] = TYPES if type is None else (type_name(type),)
    wrong_type = {errno.EPROTOTYPE}
    if target.kind == "abstract":
        wrong_type.add(errno.ECONNREFUSED)
    first: Attempt | None = None
    with sun_path(target) as where:
        for name in kinds:
            attempt = _connect_once(target, where, name)
            if attempt.errno not in wrong_type:
                return attempt
            first = first or attempt
    assert first is not None
    return first


def _connect_once(target: Address, where: str | bytes, name: SocketTypeName) -> Attempt:
    kind = TYPES[name] | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
    with socket.socket(socket.AF_UNIX, kind) as sock:
        code = sock.connect_ex(where)
        if code == 0:
            peer = peer_cred(sock) if name != "dgram" else None
            return Attempt(True, name, peer=peer if peer is None or peer.pid > 0 else None)
    return Attempt(False, name, code, explain_connect(code, target, TYPES[name]))


def _try_tcp(target: Address, timeout: float) -> Attempt:
    try:
        with socket.create_connection((target.host, target.port), timeout=timeout):
            return Attempt(True, "stream")
    except OSError as exc:
        code = exc.errno or errno.ETIMEDOUT
        reason = f"cannot connect to {target}: {os.strerror(code).lower()}"
        return Attempt(False, "stream", code, reason)


def type_name(type: str) -> SocketTypeName:  # noqa: A002
    if type not in TYPES:
        raise ValueError(f"unknown socket type {type!r}: choose 'stream', 'seqpacket' or 'dgram'")
    return type
