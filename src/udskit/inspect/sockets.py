"""The host's Unix sockets, from /proc/net/unix, and the processes that hold them."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from ..handover import CONTROL_SUFFIX
from ..sockfile import PRIVATE_PREFIX
from .probe import SocketTypeName
from .tapped import tapped_note

__all__ = ["PROC", "SocketEntry", "list_sockets", "proc_ids"]

#: Where the kernel describes sockets and processes.
PROC: Final = "/proc"

#: /proc/net/unix columns: ``Flags`` bit for a listening socket (__SO_ACCEPTCON), the
#: ``Type`` numbers (SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET) and ``St`` socket states
#: (include/uapi/linux/net.h: SS_UNCONNECTED .. SS_DISCONNECTING).
_ACCEPTCON: Final = 0x10000
_PROC_TYPES: Final[dict[int, SocketTypeName]] = {1: "stream", 2: "dgram", 5: "seqpacket"}
_PROC_STATES: Final = {1: "unconnected", 2: "connecting", 3: "connected", 4: "disconnecting"}

#: What a udskit listener's bound name looks like in /proc/net/unix: it binds in a private
#: directory next to PATH and links the socket into place (see udskit.sockfile), so the
#: kernel keeps reporting ``DIR/.udskit-XXXXXXXX/NAME`` for the socket now at ``DIR/NAME``.
_PRIVATE_BOUND: Final = re.compile(
    rb"^(?P<dir>.*)/" + re.escape(PRIVATE_PREFIX) + rb"[0-9a-f]{8}/(?P<name>[^/]+)$"
)


@dataclass(frozen=True, slots=True)
class SocketEntry:
    """One Unix socket of the host, from /proc/net/unix."""

    inode: int
    type: SocketTypeName
    #: listening, bound, connected, unconnected, connecting, disconnecting; or handover: the
    #: control socket through which a udskit server at ``path`` hands its listener over.
    state: str
    path: str  # "" for an unnamed socket, "@name" for an abstract one
    bound_as: str = ""  # the name the kernel shows, where ``path`` was mapped from it
    pids: tuple[int, ...] = ()
    processes: tuple[str, ...] = ()
    connections: int = 0  # for a listener: accepted connections still open
    note: str = ""  # a tap in front of it, or a socket a killed tap displaced

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def list_sockets(
    directory: str | os.PathLike[str] | None = None,
    *,
    with_owners: bool = True,
    proc: str = PROC,
) -> list[SocketEntry]:
    """The Unix sockets of this network namespace that have a name (a path or @name).

    A listener's accepted connections are counted in its ``connections`` rather than
    listed. ``directory`` keeps only socket files under it. Owning processes are found by
    their descriptors in /proc; without root, only this user's processes can be seen.
    """
    rows = list(_read_proc_net_unix(proc))
    listeners = {(r.type, r.path) for r in rows if r.state in ("listening", "handover")}
    counts: dict[tuple[str, str], int] = {}
    named: list[SocketEntry] = []
    for row in rows:
        if not row.path:
            continue
        if row.state in ("connected", "connecting") and (row.type, row.path) in listeners:
            # a listener's accepted (or still queued) connections carry its name
            counts[(row.type, row.path)] = counts.get((row.type, row.path), 0) + 1
            continue
        named.append(row)
    if directory is not None:
        prefix = os.path.abspath(os.fspath(directory)).rstrip("/") + "/"
        named = [e for e in named if e.path.startswith(prefix)]
    owners = _socket_owners(proc) if with_owners else {}
    result = []
    for entry in named:
        pids = tuple(sorted(owners.get(entry.inode, ())))
        result.append(
            dataclasses.replace(
                entry,
                pids=pids,
                processes=tuple(_comm(proc, pid) for pid in pids),
                connections=counts.get((entry.type, entry.path), 0),
                note=tapped_note(entry.path) if entry.path.startswith("/") else "",
            )
        )
    # By path, as ls sorts; a server's handover socket under the socket it hands over.
    result.sort(key=lambda e: (e.path, e.state == "handover"))
    return result


def _read_proc_net_unix(proc: str) -> Iterator[SocketEntry]:
    with open(os.path.join(proc, "net", "unix"), "rb") as f:
        lines = f.read().splitlines()[1:]  # the header names the columns
    for line in lines:
        fields = line.split(None, 7)
        if len(fields) < 7:
            continue
        try:
            flags, kind, state = (int(x, 16) for x in fields[3:6])
            inode = int(fields[6])
        except ValueError:
            continue
        name = _PROC_TYPES.get(kind)
        if name is None:
            continue
        bound = fields[7] if len(fields) > 7 else b""
        path = _unprivate(bound)
        shown = _state(flags, state, name, bool(bound))
        served = _served_by_control(path)
        if served is not None:
            # A udskit server's handover socket: shown as what it belongs to, the path.
            path, shown = served, "handover" if shown == "listening" else shown
        yield SocketEntry(
            inode=inode,
            type=name,
            state=shown,
            path=os.fsdecode(path),
            bound_as=os.fsdecode(bound) if path != bound else "",
        )


def _state(flags: int, state: int, kind: SocketTypeName, named: bool) -> str:
    if flags & _ACCEPTCON:
        return "listening"
    if kind == "dgram" and state == 1 and named:
        return "bound"
    return _PROC_STATES.get(state, f"state {state}")


def _served_by_control(path: bytes) -> bytes | None:
    """``DIR/.NAME.udskit-handover`` (see udskit.handover) -> ``DIR/NAME``; else None."""
    directory, _, name = path.rpartition(b"/")
    if not (name.startswith(b".") and name.endswith(CONTROL_SUFFIX)) or not directory:
        return None
    served = name[1 : -len(CONTROL_SUFFIX)]
    return directory + b"/" + served if served else None


def _unprivate(bound: bytes) -> bytes:
    """``DIR/.udskit-XXXXXXXX/NAME`` (where a udskit listener bound) -> ``DIR/NAME``."""
    match = _PRIVATE_BOUND.match(bound)
    if match is None:
        return bound
    return match.group("dir") + b"/" + match.group("name")


def _socket_owners(proc: str) -> dict[int, set[int]]:
    """Socket inode -> pids holding it, from /proc/PID/fd links (``socket:[INODE]``)."""
    owners: dict[int, set[int]] = {}
    try:
        pids = [int(p) for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return owners
    for pid in pids:
        fd_dir = os.path.join(proc, str(pid), "fd")
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue  # another user's process (without root), or it has exited
        for fd in fds:
            try:
                link = os.readlink(os.path.join(fd_dir, fd))
            except OSError:
                continue
            if link.startswith("socket:["):
                owners.setdefault(int(link[8:-1]), set()).add(pid)
    return owners


def _comm(proc: str, pid: int) -> str:
    try:
        with open(os.path.join(proc, str(pid), "comm"), encoding="utf-8", errors="replace") as f:
            return f.read().strip() or "?"
    except OSError:
        return "?"


def proc_ids(pid: int) -> tuple[int | None, int | None]:
    """A process's effective uid and gid, from /proc/PID/status."""
    uid = gid = None
    try:
        with open(os.path.join(PROC, str(pid), "status"), encoding="utf-8") as f:
            for line in f:
                if line.startswith("Uid:"):
                    uid = int(line.split()[2])
                elif line.startswith("Gid:"):
                    gid = int(line.split()[2])
    except (OSError, ValueError, IndexError):
        pass
    return uid, gid
