"""Diagnostics: why a connect fails, which Unix sockets exist, which socket files are stale.

Three questions, each answered with typed values (frozen dataclasses), never text to parse:

* :func:`diagnose` ("why can't I connect?", ``udskit doctor``): walks the path as a given
  user would, tries to connect, and returns a :class:`Diagnosis` whose ``findings`` say what
  is wrong and the exact fix, one :class:`Finding` per cause;
* :func:`list_sockets` (``udskit ls``): the host's Unix sockets from ``/proc/net/unix``, with
  their owning processes from ``/proc/*/fd``;
* :func:`find_stale` (``udskit ls --stale``): socket files nobody listens on any more.

:func:`try_connect` is the probe under all three (and under ``udskit wait``): one
non-blocking connect that reports what happened.

How permission is judged (path_resolution(7)): to reach ``/a/b/app.sock`` a process needs
search (x) permission on ``/``, ``/a`` and ``/a/b``, and write (w) permission on the socket
itself. For each file the kernel uses exactly one class of bits: the owner's if the process
runs as the owner, else the group's if the file's group is among the process's groups, else
the others'. Root (CAP_DAC_OVERRIDE) passes every such check. POSIX ACLs and security
modules (AppArmor, SELinux) can refuse what the bits allow; where a file carries an ACL we
say so, and a refusal the bits do not explain is reported as such.
"""

from __future__ import annotations

import dataclasses
import difflib
import errno
import grp
import os
import pwd
import re
import shlex
import socket
import stat
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Final, Literal, TypeAlias

from .address import MAX_DIRECT_PATH, SUN_PATH_MAX, Address, AddressLike, sun_path
from .creds import PeerCred, peer_cred
from .errors import AddressError
from .sockfile import PRIVATE_PREFIX
from .translate import explain_connect, kind_of

__all__ = [
    "Attempt",
    "Diagnosis",
    "FileInfo",
    "Finding",
    "ServerInfo",
    "SocketEntry",
    "StaleSocket",
    "Status",
    "UserInfo",
    "diagnose",
    "find_stale",
    "list_sockets",
    "try_connect",
]

Status: TypeAlias = Literal["ok", "problem", "warning", "info"]
SocketTypeName: TypeAlias = Literal["stream", "seqpacket", "dgram"]

#: The socket types, in the order a probe tries them when the type is not known.
_TYPES: Final[dict[SocketTypeName, int]] = {
    "stream": socket.SOCK_STREAM,
    "seqpacket": socket.SOCK_SEQPACKET,
    "dgram": socket.SOCK_DGRAM,
}

#: Longest file name (one path component) Linux accepts (NAME_MAX).
NAME_MAX: Final = 255

#: Bits of a mode: search on a directory, write on a socket.
_SEARCH: Final = 0o1
_WRITE: Final = 0o2

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

#: How many similar names a diagnosis suggests for a name that does not exist.
_SUGGESTIONS: Final = 3


# -- values -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Finding:
    """One conclusion of a diagnosis.

    ``check`` names what was examined (``address``, ``path``, ``permission``, ``length``,
    ``listening``, ``type``, ``server``, ...); ``summary`` is the conclusion in one line;
    ``facts`` back it up; ``fixes`` are exact commands or steps, one per line, any one of
    which resolves a ``problem``.
    """

    check: str
    status: Status
    summary: str
    facts: tuple[str, ...] = ()
    fixes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class UserInfo:
    """A user as the kernel judges it: uid, primary gid, and every group it is in."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]  # all of them, the primary group included

    @classmethod
    def current(cls) -> UserInfo:
        """This process: effective uid and gid, and its supplementary groups."""
        uid, gid = os.geteuid(), os.getegid()
        return cls(_user_name(uid), uid, gid, tuple(sorted({gid, *os.getgroups()})))

    @classmethod
    def lookup(cls, user: str | int) -> UserInfo:
        """A user from the passwd and group databases (name or uid), as it would be at its
        next login: its primary group and every group that lists it as a member."""
        try:
            entry = pwd.getpwuid(int(user)) if str(user).isdigit() else pwd.getpwnam(str(user))
        except (KeyError, OverflowError):
            raise ValueError(
                f"unknown user {user!r}: not in the passwd database (getent passwd {user})"
            ) from None
        groups = os.getgrouplist(entry.pw_name, entry.pw_gid)
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid, tuple(sorted(set(groups))))

    def __str__(self) -> str:
        groups = ", ".join(f"{_group_name(g)}({g})" for g in self.groups)
        return f"{self.name} (uid {self.uid}, groups {groups or 'none'})"


@dataclass(frozen=True, slots=True)
class FileInfo:
    """A file on the way to a socket: what it is, its permission bits and its owner."""

    path: str
    kind: str  # "directory", "socket", "regular file", "symlink", ...
    mode: int  # the permission bits only (st_mode & 0o7777)
    uid: int
    gid: int
    mtime: float
    has_acl: bool = False

    @classmethod
    def of(cls, path: str | bytes, info: os.stat_result) -> FileInfo:
        return cls(
            os.fsdecode(path),
            kind_of(info.st_mode),
            stat.S_IMODE(info.st_mode),
            info.st_uid,
            info.st_gid,
            info.st_mtime,
            _has_acl(path),
        )

    def __str__(self) -> str:
        acl = "+" if self.has_acl else ""
        letters = stat.filemode(self.mode | _TYPE_BITS.get(self.kind, 0))
        return (
            f"{letters}{acl} {_user_name(self.uid)}:{_group_name(self.gid)} (mode {self.mode:04o})"
        )


_TYPE_BITS: Final = {
    "directory": stat.S_IFDIR,
    "socket": stat.S_IFSOCK,
    "regular file": stat.S_IFREG,
}


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """Who answers at an address: the socket type, and the serving process where known."""

    type: SocketTypeName
    pid: int | None = None
    uid: int | None = None
    gid: int | None = None
    process: str | None = None

    def __str__(self) -> str:
        parts = [f"a {self.type} server"]
        if self.pid is not None:
            parts.append(f"pid {self.pid} ({self.process or '?'})")
        if self.uid is not None:
            parts.append(f"uid {self.uid} ({_user_name(self.uid)})")
        if self.gid is not None:
            parts.append(f"gid {self.gid} ({_group_name(self.gid)})")
        return ", ".join(parts)


@dataclass(frozen=True, slots=True)
class Diagnosis:
    """Everything :func:`diagnose` found about connecting to ``address`` as ``user``.

    ``findings`` is in the order the checks ran; more can be added with :meth:`adding`
    (another check, e.g. whether the server speaks HTTP, is one more Finding).
    """

    address: str
    user: UserInfo
    findings: tuple[Finding, ...]
    server: ServerInfo | None = None
    as_other: bool = False  # judged for another user than the one running the check

    @property
    def ok(self) -> bool:
        """True when nothing stops ``user`` from connecting."""
        return not any(f.status == "problem" for f in self.findings)

    @property
    def problems(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.status == "problem")

    def adding(self, *findings: Finding) -> Diagnosis:
        """This diagnosis with more findings at the end."""
        return dataclasses.replace(self, findings=self.findings + findings)


@dataclass(frozen=True, slots=True)
class Attempt:
    """The outcome of one connect: whether it worked, with which type, and if not, why."""

    ok: bool
    type: SocketTypeName | None = None  # the type that connected (or the one refused)
    errno: int = 0
    reason: str = ""  # one line: why it failed, and what to do
    peer: PeerCred | None = None  # the server, for stream and seqpacket


@dataclass(frozen=True, slots=True)
class SocketEntry:
    """One Unix socket of the host, from /proc/net/unix."""

    inode: int
    type: SocketTypeName
    state: str  # listening, bound, connected, unconnected, connecting, disconnecting
    path: str  # "" for an unnamed socket, "@name" for an abstract one
    bound_as: str = ""  # the name the kernel shows, where ``path`` was mapped from it
    pids: tuple[int, ...] = ()
    processes: tuple[str, ...] = ()
    connections: int = 0  # for a listener: accepted connections still open

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class StaleSocket:
    """A socket file nobody listens on: connecting to it is refused."""

    path: str
    uid: int
    gid: int
    mtime: float
    age: float = field(default=0.0)  # seconds since it was last modified (created)

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


# -- connecting ---------------------------------------------------------------------------
def try_connect(
    address: AddressLike,
    type: str | None = None,  # noqa: A002 - mirrors udskit.connect
    *,
    timeout: float = 1.0,
) -> Attempt:
    """Connect once, without waiting on a Unix socket; report what happened.

    ``type=None`` tries stream, then seqpacket, then dgram, until one is not refused as
    the wrong type (EPROTOTYPE). ``timeout`` bounds a TCP connect only (a Unix connect
    never waits: a full backlog is reported as EAGAIN).
    """
    target = Address.parse(address)
    if target.kind == "tcp":
        return _try_tcp(target, timeout)
    if not target.is_unix:
        raise AddressError(f"{target}: give a path, @name or tcp:HOST:PORT to connect to")
    kinds: Iterable[SocketTypeName] = _TYPES if type is None else (_type_name(type),)
    attempt = Attempt(False, errno=errno.EPROTOTYPE)
    with sun_path(target) as where:
        for name in kinds:
            attempt = _connect_once(target, where, name)
            if attempt.errno != errno.EPROTOTYPE:
                break
    return attempt


def _connect_once(target: Address, where: str | bytes, name: SocketTypeName) -> Attempt:
    kind = _TYPES[name] | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
    with socket.socket(socket.AF_UNIX, kind) as sock:
        code = sock.connect_ex(where)
        if code == 0:
            peer = peer_cred(sock) if name != "dgram" else None
            return Attempt(True, name, peer=peer if peer is None or peer.pid > 0 else None)
    return Attempt(False, name, code, explain_connect(code, target))


def _try_tcp(target: Address, timeout: float) -> Attempt:
    try:
        with socket.create_connection((target.host, target.port), timeout=timeout):
            return Attempt(True, "stream")
    except OSError as exc:
        code = exc.errno or errno.ETIMEDOUT
        reason = f"cannot connect to {target}: {os.strerror(code).lower()}"
        return Attempt(False, "stream", code, reason)


def _type_name(type: str) -> SocketTypeName:  # noqa: A002
    if type not in _TYPES:
        raise ValueError(f"unknown socket type {type!r}: choose 'stream', 'seqpacket' or 'dgram'")
    return type


# -- doctor -------------------------------------------------------------------------------
def diagnose(
    address: AddressLike,
    *,
    user: str | int | UserInfo | None = None,
    type: str = "stream",  # noqa: A002
) -> Diagnosis:
    """Why ``user`` (default: this process) can or cannot connect to ``address`` with a
    socket of ``type``: one Finding per cause, each problem with its exact fix.

    For another user the path and permissions are judged from the passwd and group
    databases; whether a server answers is tested by connecting from this process.
    """
    me = UserInfo.current()
    who = me if user is None else user if isinstance(user, UserInfo) else UserInfo.lookup(user)
    kind = _type_name(type)
    shown = address if isinstance(address, str) else os.fsdecode(bytes(address))  # type: ignore[arg-type]
    base = Diagnosis(shown, who, (), as_other=who.uid != me.uid)
    try:
        target = Address.parse(address)
    except AddressError as exc:
        return base.adding(_address_problem(exc))
    base = dataclasses.replace(base, address=str(target))
    if target.kind == "fd":
        return base.adding(
            Finding(
                "address",
                "problem",
                f"{target} is a descriptor of this process, not an address other programs reach",
                fixes=("give the socket's path, @name or tcp:HOST:PORT",),
            )
        )
    if target.kind == "tcp":
        return _diagnose_tcp(base, target)
    if target.kind == "abstract":
        return _diagnose_abstract(base, target, kind)
    return _diagnose_path(base, target, kind, me)


def _address_problem(exc: AddressError) -> Finding:
    text = str(exc)
    too_long = "bytes" in text and ("limit" in text or "sun_path" in text)
    return Finding(
        "length" if too_long else "address",
        "problem",
        text,
        fixes=("use a shorter path" if too_long else "correct the address",),
    )


def _diagnose_tcp(base: Diagnosis, target: Address) -> Diagnosis:
    attempt = try_connect(target)
    if attempt.ok:
        return dataclasses.replace(base, server=ServerInfo("stream")).adding(
            Finding("listening", "ok", f"{target} accepts TCP connections")
        )
    return base.adding(Finding("listening", "problem", attempt.reason))


def _diagnose_abstract(base: Diagnosis, target: Address, kind: SocketTypeName) -> Diagnosis:
    note = Finding(
        "permission",
        "info",
        "abstract names have no file permissions: any process in this network namespace "
        "may connect, and only the server's own check of its peers (udskit serve "
        "--allow-uid) restricts who is served",
    )
    attempt = try_connect(target, kind)
    if attempt.ok:
        return _connected(base, target, attempt).adding(note)
    if attempt.errno == errno.ECONNREFUSED:
        names = [
            e.path for e in list_sockets() if e.path.startswith("@") and e.state != "connected"
        ]
        similar = difflib.get_close_matches(str(target), names, n=_SUGGESTIONS, cutoff=0.6)
        facts = [f"similar names in use: {', '.join(similar)}"] if similar else []
        facts.append(
            "abstract names belong to a network namespace: a server in another container "
            "(or started with 'unshare -n') is invisible from here"
        )
        return base.adding(
            Finding(
                "listening",
                "problem",
                f"no socket is bound to {target} in this network namespace",
                tuple(facts),
                ("start the server, or check the name ('udskit ls' lists the names in use)",),
            )
        )
    return base.adding(_refusal(target, attempt, kind))


def _diagnose_path(
    base: Diagnosis, target: Address, kind: SocketTypeName, me: UserInfo
) -> Diagnosis:
    path = target.absolute().raw
    findings: list[Finding] = []
    length = _length_finding(path)
    if length is not None:
        findings.append(length)
        if length.status == "problem":
            return base.adding(*findings)
    walk = _walk(path, base.user)
    findings.extend(walk.findings)
    if walk.stop:
        return base.adding(*findings)
    denied = any(f.check == "permission" and f.status == "problem" for f in walk.findings)
    if denied and base.user.uid == me.uid:
        return base.adding(*findings)  # our connect would only be refused for the same reason
    attempt = try_connect(target, kind)
    if attempt.ok:
        if base.as_other and me.uid == 0:
            findings = _kernel_verdict(findings, target, kind, base.user, denied)
            denied = any(f.check == "permission" and f.status == "problem" for f in findings)
        result = _connected(base, target, attempt, checked_by=me, denied=denied)
        return dataclasses.replace(result, findings=(*findings, *result.findings))
    if attempt.errno in (errno.EACCES, errno.EPERM) and not denied:
        findings.append(_unexplained_denial(target, walk.socket, me))
    elif attempt.errno == errno.ECONNREFUSED and walk.socket is not None:
        findings.append(_stale(target, walk.socket))
    else:
        findings.append(_refusal(target, attempt, kind))
    return base.adding(*findings)


def _kernel_verdict(
    findings: list[Finding],
    target: Address,
    kind: SocketTypeName,
    user: UserInfo,
    denied: bool,
) -> list[Finding]:
    """Root can ask the kernel itself: connect as ``user`` and see. ACLs and security
    modules can decide differently from the mode bits; the kernel's answer wins."""
    code = _connect_as(user, target, kind)
    if code == 0 and denied:
        demoted = [
            dataclasses.replace(f, status="warning", fixes=())
            if f.check == "permission" and f.status == "problem"
            else f
            for f in findings
        ]
        demoted.append(
            Finding(
                "permission",
                "ok",
                f"yet the kernel let {user.name} connect: an ACL grants what the mode bits "
                "do not (getfacl shows it)",
            )
        )
        return demoted
    if code in (errno.EACCES, errno.EPERM) and not denied:
        return [*findings, _unexplained_denial(target, None, user)]
    if code in (errno.EACCES, errno.EPERM, 0):
        outcome = "refused (permission denied)" if code else "accepted"
        return [
            *findings,
            Finding("permission", "info", f"confirmed: a connect as {user.name} was {outcome}"),
        ]
    reason = os.strerror(code).lower() if code > 0 else "the check could not run"
    return [*findings, Finding("permission", "info", f"a connect as {user.name} failed: {reason}")]


def _connect_as(user: UserInfo, target: Address, kind: SocketTypeName) -> int:
    """connect()'s errno for ``user``: a forked child takes on the user's groups, gid and
    uid (which needs root), connects without waiting and reports back. -1 if it could not."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into the caller's code
        try:
            os.close(read_end)
            os.setgroups(list(user.groups))
            os.setgid(user.gid)
            os.setuid(user.uid)
            flags = _TYPES[kind] | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
            with sun_path(target) as where, socket.socket(socket.AF_UNIX, flags) as sock:
                os.write(write_end, b"%d" % sock.connect_ex(where))
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as pipe:
            answer = pipe.read()
    finally:
        os.waitpid(pid, 0)
    return int(answer) if answer.isdigit() else -1


def _connected(
    base: Diagnosis,
    target: Address,
    attempt: Attempt,
    *,
    checked_by: UserInfo | None = None,
    denied: bool = False,
) -> Diagnosis:
    assert attempt.type is not None
    peer = attempt.peer
    if peer is not None:
        server = ServerInfo(attempt.type, peer.pid, peer.uid, peer.gid, peer.process_name)
    else:
        server = _server_from_proc(target, attempt.type)
    if not base.as_other:
        verdict = f"connected to {target}: {server}"
    elif checked_by is None:
        verdict = f"{base.user.name} can connect to {target}: {server}"
    elif denied:
        verdict = f"the server answers at {target} (connected as {checked_by.name}): {server}"
    else:
        verdict = (
            f"{base.user.name} can connect to {target}: {server} "
            f"(connected as {checked_by.name}; permissions judged for {base.user.name})"
        )
    return dataclasses.replace(base, server=server).adding(Finding("server", "ok", verdict))


def _server_from_proc(target: Address, kind: SocketTypeName) -> ServerInfo:
    """For a datagram server (no SO_PEERCRED): the process holding the bound socket."""
    wanted = "@" + target.path if target.kind == "abstract" else target.absolute().path
    for entry in list_sockets(with_owners=True):
        if entry.path == wanted and entry.type == kind and entry.pids:
            pid = entry.pids[0]
            uid, gid = _proc_ids(pid)
            return ServerInfo(kind, pid, uid, gid, entry.processes[0])
    return ServerInfo(kind)


def _refusal(target: Address, attempt: Attempt, kind: SocketTypeName) -> Finding:
    if attempt.errno == errno.EPROTOTYPE:
        actual = try_connect(target)
        found = actual.type if actual.errno != errno.EPROTOTYPE else None
        if found is not None and found != kind:
            return Finding(
                "type",
                "problem",
                f"{target} is a {found} socket, not a {kind} one (EPROTOTYPE)",
                (f"a {kind} client cannot connect to a {found} server",),
                (f"connect with --type {found} (udskit.connect(..., type={found!r}))",),
            )
    if attempt.errno == errno.EAGAIN:
        return Finding(
            "listening",
            "problem",
            f"the server at {target} is alive but its backlog is full: it does not accept "
            "connections as fast as they come (nginx reports '11: Resource temporarily "
            "unavailable')",
            (),
            (
                "find out why the server is slow or stuck (udskit ls shows its pid)",
                "raise its backlog (udskit serve --backlog N; net.core.somaxconn caps it)",
            ),
        )
    return Finding("listening", "problem", attempt.reason)


def _stale(target: Address, info: FileInfo) -> Finding:
    age = max(0.0, time.time() - info.mtime)
    facts = [
        f"the socket file was created {_age(age)} ago by uid {info.uid} ({_user_name(info.uid)})"
    ]
    holders = [
        e for e in list_sockets(with_owners=True) if e.path == info.path and e.state == "listening"
    ]
    for entry in holders:
        owner = f"pid {entry.pids[0]} ({entry.processes[0]})" if entry.pids else "a process"
        facts.append(
            f"{owner} still listens on a socket once bound at this path, but the file there "
            "now is another one: it was deleted and re-created; restart that server"
        )
    quoted = shlex.quote(info.path)
    return Finding(
        "listening",
        "problem",
        f"nothing is listening on {target}: a stale socket file, left by a server that "
        "exited without removing it",
        tuple(facts),
        (
            "start the server again (udskit serve reclaims a stale file by itself)",
            f"or remove it: rm {quoted}",
        ),
    )


def _unexplained_denial(target: Address, info: FileInfo | None, me: UserInfo) -> Finding:
    acl = " It carries an ACL (getfacl shows it)." if info is not None and info.has_acl else ""
    return Finding(
        "permission",
        "problem",
        f"the kernel refused {me.name} access to {target} although the permission bits "
        f"allow it: a POSIX ACL or a security module (AppArmor, SELinux) denies it.{acl}",
        (),
        (
            f"getfacl {shlex.quote(target.path)}",
            "check the security module's log (journalctl -k | grep -i -e apparmor -e avc)",
        ),
    )


def _length_finding(path: bytes) -> Finding | None:
    """S11: sun_path holds 108 bytes; longer paths only work through a directory fd."""
    longest = max((len(part) for part in path.split(b"/")), default=0)
    if longest > NAME_MAX:
        return Finding(
            "length",
            "problem",
            f"a component of {os.fsdecode(path)} is {longest} bytes; file names are limited "
            f"to {NAME_MAX} bytes (NAME_MAX)",
            fixes=("use shorter names",),
        )
    if len(path) <= MAX_DIRECT_PATH:
        return None
    name = os.path.basename(path)
    # The longest form udskit may need: /proc/self/fd/N/NAME with a 4-digit descriptor.
    via = len(b"/proc/self/fd/1000/") + len(name)
    shown = os.fsdecode(path)
    if via > MAX_DIRECT_PATH:
        return Finding(
            "length",
            "problem",
            f"{shown} is {len(path)} bytes and its file name alone {len(name)}: sun_path "
            f"holds {SUN_PATH_MAX} bytes, and even through its directory "
            f"(/proc/self/fd/N/NAME) the name does not fit",
            fixes=(
                (
                    f"use a path of at most {MAX_DIRECT_PATH} bytes, or a file name of at "
                    f"most {MAX_DIRECT_PATH - via + len(name)} bytes"
                ),
            ),
        )
    return Finding(
        "length",
        "warning",
        f"{shown} is {len(path)} bytes, more than the {MAX_DIRECT_PATH} that fit in sun_path: "
        "udskit reaches it through its directory (/proc/self/fd/N/NAME), but most programs "
        "(nginx, curl, socat, nc) cannot",
        fixes=(f"use a path of at most {MAX_DIRECT_PATH} bytes if other programs must connect",),
    )


# -- the walk along the path --------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Walk:
    findings: tuple[Finding, ...]
    stop: bool  # nothing to connect to (missing, not a socket) or nothing more we can see
    socket: FileInfo | None = None


def _walk(path: bytes, user: UserInfo) -> _Walk:
    """Each directory from / down, then the socket: does it exist, may ``user`` pass?"""
    findings: list[Finding] = []
    parts = [p for p in path.split(b"/") if p]
    current = b"/"
    for index, part in enumerate(parts):
        parent, current = current, os.path.join(current, part)
        last = index == len(parts) - 1
        try:
            info = os.stat(current)
        except FileNotFoundError:
            findings.append(_missing(path, parent, current, last))
            return _Walk(tuple(findings), stop=True)
        except NotADirectoryError:
            info = os.stat(parent)
            findings.append(_not_directory(path, FileInfo.of(parent, info)))
            return _Walk(tuple(findings), stop=True)
        except PermissionError:
            findings.append(_cannot_look(parent))
            return _Walk(tuple(findings), stop=True)
        except OSError as exc:
            if exc.errno == errno.ENAMETOOLONG:
                findings.append(_length_finding(current) or _cannot_stat(current, exc))
            else:
                findings.append(_cannot_stat(current, exc))
            return _Walk(tuple(findings), stop=True)
        here = FileInfo.of(current, info)
        if not last:
            if not stat.S_ISDIR(info.st_mode):
                findings.append(_not_directory(path, here))
                return _Walk(tuple(findings), stop=True)
            if not _allowed(user, here, _SEARCH):
                findings.append(_denied(user, here, _SEARCH))
            continue
        if not stat.S_ISSOCK(info.st_mode):
            findings.append(_not_socket(here))
            return _Walk(tuple(findings), stop=True)
        if not _allowed(user, here, _WRITE):
            findings.append(_denied(user, here, _WRITE))
        if not any(f.status == "problem" for f in findings):
            findings.append(
                Finding(
                    "permission",
                    "ok",
                    f"{user.name} may search every directory on the way and write to the "
                    f"socket ({here})",
                )
            )
        return _Walk(tuple(findings), stop=False, socket=here)
    findings.append(
        Finding("path", "problem", f"{os.fsdecode(path)} names a directory, not a socket file")
    )
    return _Walk(tuple(findings), stop=True)


def _allowed(user: UserInfo, info: FileInfo, bit: int) -> bool:
    if user.uid == 0:
        return True  # CAP_DAC_OVERRIDE
    if info.uid == user.uid:
        shift = 6
    elif info.gid in user.groups:
        shift = 3
    else:
        shift = 0
    return bool((info.mode >> shift) & bit)


def _denied(user: UserInfo, info: FileInfo, bit: int) -> Finding:
    is_dir = bit == _SEARCH
    need = "search (x) permission on directory" if is_dir else "write (w) permission on socket"
    if info.uid == user.uid:
        applies = "it owns the file, so the owner bits apply"
    elif info.gid in user.groups:
        applies = f"it is in group {_group_name(info.gid)}, so the group bits apply"
    else:
        applies = "it is neither the owner nor in the group, so the 'other' bits apply"
    facts = [
        f"{info.path}: {info}",
        f"{user}: {applies}",
    ]
    if info.has_acl:
        facts.append("the file also carries an ACL, which may grant more (getfacl shows it)")
    return Finding(
        "permission",
        "problem",
        f"{user.name} lacks {need} {info.path}",
        tuple(facts),
        _permission_fixes(user, info, bit),
    )


def _permission_fixes(user: UserInfo, info: FileInfo, bit: int) -> tuple[str, ...]:
    path = shlex.quote(info.path)
    is_dir = bit == _SEARCH
    fixes: list[str] = []
    if info.uid == user.uid:
        fixes.append(f"chmod {info.mode | bit << 6:o} {path}")
    else:
        group = _group_name(info.gid)
        # Group access: the socket's usual fix is read+write for the group (660); a
        # directory only needs search (x) for the group.
        grant = (0o010 if is_dir else 0o060) | info.mode
        if info.gid in user.groups:
            fixes.append(f"chmod {grant:o} {path}")
        else:
            if info.mode & bit << 3 and info.gid != 0:  # never advise joining group root
                fixes.append(
                    f"usermod -aG {group} {user.name}   (then restart {user.name}'s processes: "
                    "groups are read when a process starts)"
                )
            own_group = _group_name(user.gid)
            fixes.append(f"chgrp {own_group} {path} && chmod {grant:o} {path}")
        if is_dir:
            fixes.append(f"chmod o+x {path}   (anyone may pass through; listing stays private)")
    if not is_dir:
        fixes.append(
            "the server re-creates the socket at each start: make it last with the server's own "
            f"options, e.g. udskit serve --mode 660 --group {_group_name(user.gid)} ..."
        )
    return tuple(fixes)


def _missing(path: bytes, parent: bytes, current: bytes, last: bool) -> Finding:
    shown = os.fsdecode(path)
    try:
        siblings = os.listdir(parent)
    except OSError:
        siblings = []
    wanted = os.path.basename(current)
    if last:
        sockets = [s for s in siblings if _is_socket(os.path.join(parent, s))]
        similar = difflib.get_close_matches(wanted, sockets, n=_SUGGESTIONS, cutoff=0.6)
        facts = [f"the directory {os.fsdecode(parent)} exists"]
        if sockets:
            names = ", ".join(os.fsdecode(s) for s in sorted(sockets)[:10])
            facts.append(f"sockets in it: {names}")
        link = _dangling(current)
        if link is not None:
            facts.append(f"{shown} is a symlink to {link}, which does not exist")
        fixes = [f"did you mean {os.fsdecode(os.path.join(parent, s))}?" for s in similar]
        fixes.append(f"start the server (it creates {shown}), or check the path")
        return Finding("path", "problem", f"no such file: {shown}", tuple(facts), tuple(fixes))
    dirs = [s for s in siblings if os.path.isdir(os.path.join(parent, s))]
    similar = difflib.get_close_matches(wanted, dirs, n=_SUGGESTIONS, cutoff=0.6)
    missing = os.fsdecode(current)
    fixes = [f"did you mean {os.fsdecode(os.path.join(parent, s))}?" for s in similar]
    fixes.append(
        f"create it before the server starts: mkdir -p {shlex.quote(os.path.dirname(shown))}"
    )
    return Finding(
        "path",
        "problem",
        f"no such file: the directory {missing} does not exist ({os.fsdecode(parent)} does)",
        (),
        tuple(fixes),
    )


def _not_directory(path: bytes, info: FileInfo) -> Finding:
    return Finding(
        "path",
        "problem",
        f"{info.path} is a {info.kind}, not a directory, so {os.fsdecode(path)} cannot exist",
        fixes=("check the path",),
    )


def _not_socket(info: FileInfo) -> Finding:
    quoted = shlex.quote(info.path)
    return Finding(
        "path",
        "problem",
        f"{info.path} is a {info.kind}, not a socket",
        (f"{info.path}: {info}",),
        (
            "check the path: the server's socket is elsewhere, or the server has not started",
            f"if it is a leftover, move it (udskit never deletes it): mv {quoted} {quoted}.old",
        ),
    )


def _cannot_look(directory: bytes) -> Finding:
    me = UserInfo.current()
    return Finding(
        "permission",
        "problem",
        f"cannot look inside {os.fsdecode(directory)}: {me.name} (running this check) lacks "
        "search permission there",
        fixes=("run the check as root (sudo udskit doctor ...) to see past it",),
    )


def _cannot_stat(path: bytes, exc: OSError) -> Finding:
    return Finding(
        "path",
        "problem",
        f"cannot examine {os.fsdecode(path)}: {os.strerror(exc.errno or 0).lower()}",
    )


def _is_socket(path: bytes | str) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


def _dangling(path: bytes) -> str | None:
    try:
        return os.fsdecode(os.readlink(path))
    except OSError:
        return None


def _has_acl(path: str | bytes) -> bool:
    try:
        return "system.posix_acl_access" in os.listxattr(path)
    except OSError:
        return False


# -- ls -----------------------------------------------------------------------------------
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
    listeners = {(r.type, r.path) for r in rows if r.state == "listening"}
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
            )
        )
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
        yield SocketEntry(
            inode=inode,
            type=name,
            state=_state(flags, state, name, bool(bound)),
            path=os.fsdecode(path),
            bound_as=os.fsdecode(bound) if path != bound else "",
        )


def _state(flags: int, state: int, kind: SocketTypeName, named: bool) -> str:
    if flags & _ACCEPTCON:
        return "listening"
    if kind == "dgram" and state == 1 and named:
        return "bound"
    return _PROC_STATES.get(state, f"state {state}")


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


def _proc_ids(pid: int) -> tuple[int | None, int | None]:
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


# -- stale files --------------------------------------------------------------------------
def find_stale(directory: str | os.PathLike[str]) -> list[StaleSocket]:
    """Socket files under ``directory`` (recursively) that nobody listens on.

    A socket counts as stale when connecting with every socket type is refused
    (ECONNREFUSED): no process holds a socket bound there. Files we may not connect to
    (EACCES) are left out: we cannot tell. udskit's private claim directories are skipped.
    """
    top = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(top):
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", top)
    now = time.time()
    found: list[StaleSocket] = []
    for here, dirs, files in os.walk(top):
        dirs[:] = sorted(d for d in dirs if not os.fsencode(d).startswith(PRIVATE_PREFIX))
        for name in sorted(files):
            path = os.path.join(here, name)
            try:
                info = os.lstat(path)
            except OSError:
                continue
            if not stat.S_ISSOCK(info.st_mode):
                continue
            attempt = try_connect(path)
            if not attempt.ok and attempt.errno == errno.ECONNREFUSED:
                found.append(
                    StaleSocket(
                        path, info.st_uid, info.st_gid, info.st_mtime, max(0.0, now - info.st_mtime)
                    )
                )
    return found


# -- names --------------------------------------------------------------------------------
def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _age(seconds: float) -> str:
    """'45 s', '12 min', '3 h 5 min', '2 days'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    if minutes < 90:
        return f"{minutes:.0f} min"
    hours = int(minutes // 60)
    if hours < 48:
        return f"{hours} h {int(minutes % 60)} min"
    return f"{hours // 24} days"
