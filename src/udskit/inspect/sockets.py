"""The host's Unix sockets, from sock_diag (or /proc/net/unix), and the processes that
hold them."""

from __future__ import annotations

import dataclasses
import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

from ..handover import CONTROL_SUFFIX
from ..sockdiag import BoundFile, UnixSocket, unix_sockets
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
    found = unix_sockets() if proc == PROC else None
    rows = list(_read_sockets(proc, found))
    listening_at = None if found is None else _listening_at(found)
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
                note=tapped_note(entry.path, listening_at) if entry.path.startswith("/") else "",
            )
        )
    # By path, as ls sorts; a server's handover socket under the socket it hands over.
    result.sort(key=lambda e: (e.path, e.state == "handover"))
    return result


def _listening_at(found: list[UnixSocket]) -> Callable[[bytes], bool]:
    """Whether a socket of ``found`` listens on the file at a path: by the file's device
    and inode, which sock_diag gives for each socket, so without connecting to it."""
    files = {s.file for s in found if s.listening and s.file is not None}

    def listening_at(path: bytes) -> bool:
        try:
            info = os.lstat(path)
        except OSError:
            return False
        return BoundFile.of(info) in files

    return listening_at


def _read_sockets(proc: str, found: list[UnixSocket] | None) -> Iterator[SocketEntry]:
    """The sockets from sock_diag where the kernel has it (``found``: a name is
    length-delimited there, so nothing a user binds can forge a row); else from
    ``proc``/net/unix, where a newline in a name a user bound reads as the start of another
    line."""
    rows = _proc_net_unix(proc) if found is None else _sock_diag(found)
    renamed = _Renamed()
    for inode, name, state, bound, file in rows:
        path = _unprivate(bound)
        served = _served_by_control(path)
        if served is not None:
            # A udskit server's handover socket: shown as what it belongs to, the path.
            path, state = served, "handover" if state == "listening" else state
        elif path == bound and file is not None:
            path = renamed.where(bound, file)
        yield SocketEntry(
            inode=inode,
            type=name,
            state=state,
            path=os.fsdecode(path),
            bound_as=os.fsdecode(bound) if path != bound else "",
        )


#: One socket's facts, whichever table they come from: inode, type, state, bound name (as
#: /proc/net/unix shows it: ``@`` for each NUL of an abstract name), and the file its
#: bind() created (sock_diag only).
_Row = tuple[int, SocketTypeName, str, bytes, BoundFile | None]


def _sock_diag(found: list[UnixSocket]) -> Iterator[_Row]:
    for sock in found:
        name = _PROC_TYPES.get(sock.type)
        if name is None:
            continue
        bound = sock.name.replace(b"\0", b"@")
        if sock.listening:
            state = "listening"
        elif sock.connected:
            state = "connected"
        else:
            state = "bound" if name == "dgram" and bound else "unconnected"
        yield sock.inode, name, state, bound, sock.file
        # A listener's backlog, as /proc/net/unix lists it: one connecting row each.
        for _ in range(sock.queued):
            yield 0, name, "connecting", bound, sock.file


def _proc_net_unix(proc: str) -> Iterator[_Row]:
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
        yield inode, name, _state(flags, state, name, bool(bound)), bound, None


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


class _Renamed:
    """Where a socket's file went when it was renamed within its directory after bind():
    haproxy binds ``NAME.PID.tmp`` and renames it to ``NAME`` (as udskit does from its
    private directory), and the kernel keeps reporting the name bind() was given, which no
    longer exists. Found by the file's device and inode, which sock_diag gives; each
    directory is read once however many of its sockets moved."""

    __slots__ = ("_dirs",)

    def __init__(self) -> None:
        self._dirs: dict[bytes, dict[BoundFile, bytes]] = {}

    def where(self, bound: bytes, file: BoundFile) -> bytes:
        if not bound.startswith(b"/"):
            return bound  # abstract, or relative to a directory we do not know
        try:
            os.lstat(bound)
        except FileNotFoundError:
            pass
        except OSError:
            return bound
        else:
            return bound  # still there (whatever is there now: doctor tells a re-created file)
        directory = os.path.dirname(bound)
        files = self._dirs.get(directory)
        if files is None:
            files = self._dirs[directory] = _socket_files(directory)
        return files.get(file, bound)


def _socket_files(directory: bytes) -> dict[BoundFile, bytes]:
    """The socket files directly in ``directory``, by their device and inode."""
    files: dict[BoundFile, bytes] = {}
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                try:
                    info = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISSOCK(info.st_mode):
                    files[BoundFile.of(info)] = entry.path
    except OSError:
        pass  # gone, or not ours to read: the kernel's name is all there is
    return files


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
