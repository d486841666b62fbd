"""What a tap reports: frozen values, one per thing that happened on the tapped socket."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, TypeAlias

from ..creds import PeerCred

__all__ = [
    "Closed",
    "Data",
    "Direction",
    "Event",
    "Notice",
    "Opened",
    "PassedFd",
    "Refused",
]

#: ``up``: from the client to the server; ``down``: from the server to the client.
Direction: TypeAlias = Literal["up", "down"]


@dataclass(frozen=True, slots=True)
class PassedFd:
    """A descriptor that crossed the tap (SCM_RIGHTS), as the tap saw it in passing."""

    number: int  # its number in the receiving side of the tap, at the time
    kind: str  # memfd, pipe, socket, file, directory, ...
    name: str  # memfd:NAME, a path, pipe:[INODE], socket:[INODE]
    size: int | None  # bytes, for memfds and regular files

    def __str__(self) -> str:
        size = f" ({_size(self.size)})" if self.size is not None else ""
        return f"fd {self.number}: {self.name}{size}"


def _size(size: int) -> str:
    """'512 B', '12 KiB', '3 MiB', '2 GiB' (rounded)."""
    if size < 1024:
        return f"{size} B"
    value = size / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}"
        value /= 1024
    return f"{value:.0f} GiB"


@dataclass(frozen=True, slots=True)
class Opened:
    """A client connected (stream, seqpacket) or a datagram sender was first seen."""

    conn: int
    time: float  # time.time()
    client: PeerCred | None  # None: a datagram sent without credentials
    address: str = ""  # a datagram sender's own address ("" when unbound)


@dataclass(frozen=True, slots=True)
class Data:
    """Bytes (a read of a stream, or one message) relayed in one direction, unchanged."""

    conn: int
    time: float
    direction: Direction
    data: bytes
    fds: tuple[PassedFd, ...] = ()


@dataclass(frozen=True, slots=True)
class Closed:
    """One direction ended (end of stream), or the connection is over (``direction`` None)."""

    conn: int
    time: float
    direction: Direction | None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Refused:
    """A client the tap would not relay, and why (it was closed, or its datagram dropped)."""

    conn: int
    time: float
    client: PeerCred | None
    reason: str


@dataclass(frozen=True, slots=True)
class Notice:
    """Something about the tap itself: started, restored, the server went away."""

    time: float
    text: str


Event: TypeAlias = Opened | Data | Closed | Refused | Notice
