"""Admission: what every server does with a freshly accepted connection, in one place.

A connection is admitted once: its socket buffers are sized, its peer's credentials are
read (SO_PEERCRED, taken by the kernel at connect(2), so a client cannot forge them), and
the access policy is checked, before any handler sees it. A refused peer's socket is shut
down (it reads end of stream) and closed; a peer that vanished between accept(2) and
getsockopt(2) is closed quietly. The blocking and asyncio listeners, both message servers
and the bridge all call :func:`admit`.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

from .address import Address
from .creds import PeerCred, Policy, peer_cred
from .options import tune_buffers
from .tcp import tcp_options

__all__ = ["REFUSED", "Admitted", "Refused", "admit", "refuse", "sender_address"]

log = logging.getLogger("udskit")


@dataclass(frozen=True, slots=True)
class Admitted:
    """Who is on the other end of an admitted connection (None: not a Unix socket, or an
    unbound client)."""

    peer: PeerCred | None
    remote: Address | None


class Refused:
    """Sentinel: the access policy refused the peer (the refusal is logged)."""

    def __repr__(self) -> str:
        return "REFUSED"


REFUSED = Refused()


def admit(
    conn: socket.socket,
    address: object,
    policy: Policy | None,
    buffers: tuple[int | None, int | None] = (None, None),
    *,
    blocking: bool,
) -> Admitted | Refused | None:
    """Prepare ``conn`` for serving; or close it and return None if its peer is gone
    already, REFUSED if ``policy`` refuses it."""
    try:
        conn.setblocking(blocking)
        tune_buffers(conn, *buffers)
        if conn.family != socket.AF_UNIX:
            tcp_options(conn)
            return Admitted(None, None)
        peer = peer_cred(conn)
        remote = sender_address(conn.getpeername())
    except OSError as exc:  # the client vanished between accept() and getsockopt()
        log.debug("%s: client gone before it was served: %s", address, exc)
        conn.close()
        return None
    if policy is not None and not policy.check(peer, address):
        refuse(conn)
        return REFUSED
    return Admitted(peer, remote)


def refuse(conn: socket.socket) -> None:
    """End a refused connection: the peer reads end of stream, never a message."""
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    conn.close()


def sender_address(name: object) -> Address | None:
    """The Address of a Unix socket name from accept()/recvfrom() (None: unbound).

    The name is what the peer bound, byte for byte: taken as the path (or abstract name)
    it is, never parsed as an address string. A client may bind ``zz:x``, ``fd:3`` or
    ``unix:/run/other.sock`` relative to its own directory; parsed, the first is an error
    (which stopped the server that accepted it), the others another address (a reply to
    the sender would go to the socket its name spells).
    """
    if isinstance(name, str):
        name = os.fsencode(name)  # Python decodes path names with the file system codec
    if not isinstance(name, bytes) or not name:
        return None
    if name.startswith(b"\0"):
        return Address("abstract", name[1:]) if len(name) > 1 else None
    return Address("path", name)
