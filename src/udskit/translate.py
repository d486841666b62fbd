"""The one place where OS errors become udskit errors.

Every socket call that can fail runs inside :func:`translating`, which turns the ``OSError``
into the udskit error that names the condition, with a one-line message saying what failed,
on which address, and what to do. The original error is chained (``raise ... from exc``).

What each errno means for AF_UNIX on Linux (net/unix/af_unix.c, unix(7), connect(2)):

``connect()``
  ENOENT        no file at the path, or a directory on the way is missing.
  ECONNREFUSED  a socket file exists but nothing listens on it (a crashed server's stale
                file), *or* the path is not a socket at all: Linux answers ECONNREFUSED,
                not ENOTSOCK, for a regular file. We stat the path to tell which.
  EACCES        no write permission on the socket file, or no search (x) permission on a
                directory on the way. EPERM is the same under some LSMs.
  EAGAIN        the listener's backlog is full and the socket is non-blocking (a blocking
                connect waits instead): the 502 "Resource temporarily unavailable" of nginx.
  EPROTOTYPE    the file is a socket of another type (stream vs dgram vs seqpacket).
  ENOTDIR       a component of the path is a file, not a directory.
  ELOOP, ENAMETOOLONG  symlink loop, or a component over NAME_MAX.
``bind()``
  EADDRINUSE    the path (or abstract name) is taken. sockfile.py decides whether the
                owner is alive; here it only reaches abstract names.
  EACCES        no write permission on the directory.
  EROFS         read-only file system.
claiming a path (sockfile.py): ``chown`` EPERM when a user other than root gives the file
  away or names a group they are not in; removing a stale socket EPERM/EACCES when it is
  another user's file in a sticky directory (/tmp) or the directory is not writable.
``send()``
  EPIPE         the peer closed (we pass MSG_NOSIGNAL, and Python ignores SIGPIPE, so this
                is an error return, never a signal death).
  ECONNRESET    the peer closed with unread data; same meaning for us.
  EMSGSIZE      a datagram (or seqpacket message) larger than the send buffer allows.
  ECONNREFUSED, ENOTCONN  a datagram peer went away (its socket file is gone or unbound).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shlex
import socket
import stat
from collections.abc import Iterator
from typing import Final

from .address import Address, one_line, sun_path, unexpanded_home
from .errors import (
    AddressError,
    AddressInUse,
    ConnectError,
    ConnectionClosed,
    FrameTooLarge,
    SocketFileError,
    Timeout,
    UdsError,
)

__all__ = ["RESOURCE_ADVICE", "explain_connect", "translating", "unreachable_directory"]

#: What running out of a resource means, and what to do about it.
RESOURCE_ADVICE: Final = {
    errno.EMFILE: "this process has no descriptor left (raise its open-file limit: ulimit -n, "
    "or LimitNOFILE= under systemd)",
    errno.ENFILE: "the system has no descriptor left (raise fs.file-max, or end other "
    "processes' files)",
    errno.ENOBUFS: "the kernel is out of memory for sockets",
    errno.ENOMEM: "the kernel is out of memory for sockets",
}

_CLOSED_ERRNOS = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN})


@contextlib.contextmanager
def translating(
    op: str, address: Address | str | None = None, *, tried: int | None = None
) -> Iterator[None]:
    """Run a socket operation; re-raise any ``OSError`` as the matching udskit error.

    ``op`` is one of ``connect``, ``bind``, ``listen``, ``accept``, ``send``, ``recv`` or a
    free phrase; it picks the reading of the errno and starts the message. ``tried`` is the
    type of the socket that connects, so that a connect refused for the wrong type can
    name the right one.
    """
    try:
        yield
    except UdsError:
        raise
    except OSError as exc:
        raise translate(exc, op, address, tried=tried) from exc


def translate(
    exc: OSError, op: str, address: Address | str | None, *, tried: int | None = None
) -> Exception:
    """The udskit error for ``exc`` raised by ``op`` on ``address`` (not raised here)."""
    code = exc.errno
    shown = address.shown() if isinstance(address, Address) else address
    where = f" {shown}" if address is not None else ""
    on = f" on {shown}" if address is not None else ""
    if isinstance(exc, TimeoutError):  # socket.settimeout() expired: errno is None
        return Timeout(f"{op}{on} timed out: the peer did not answer in time")
    if isinstance(exc, BlockingIOError) and op in ("send", "recv", "accept"):
        # EAGAIN on a socket with timeout 0 (non-blocking): "not within the timeout".
        return Timeout(f"{op}{on} would block: nothing ready and the timeout is 0")
    reason = os.strerror(code) if code else str(exc)
    if isinstance(exc, socket.gaierror) and isinstance(address, Address):
        # getaddrinfo's EAI_* codes are not errnos: os.strerror() would say "unknown error".
        return ConnectError(
            f"cannot {op} to {shown}: cannot resolve {address.host!r}: {exc.strerror}"
        )
    if op == "connect" and isinstance(address, Address):
        return ConnectError(explain_connect(code, address, tried), errno=code)
    # " to ADDR" / " from ADDR", or nothing for an unnamed peer (a pair, say).
    to, from_ = (f" to{where}", f" from{where}") if where else ("", "")
    if op in ("send", "recv") and code in _CLOSED_ERRNOS:
        verb = f"send{to}" if op == "send" else f"receive{from_}"
        return ConnectionClosed(f"cannot {verb}: the peer closed the connection")
    if op == "send" and code == errno.EMSGSIZE:
        return FrameTooLarge(
            f"message{to} is larger than the socket's send buffer allows (EMSGSIZE): "
            "send smaller messages, raise sndbuf, or use type='stream' for large payloads"
        )
    if op == "send" and code in (errno.ECONNREFUSED, errno.ENOENT):
        return ConnectionClosed(f"cannot send{to}: nothing is bound there any more")
    if op == "bind" and code == errno.EADDRINUSE:
        return AddressInUse(f"cannot bind{where}: the address is in use by another socket")
    if op == "bind" and code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return SocketFileError(
            f"cannot create socket{where}: {reason.lower()} (need write and search "
            "permission on its directory)",
            errno=code,
        )
    if op == "bind" and code in (errno.ENOENT, errno.ENOTDIR):
        why = "its directory does not exist; create it first"
        if isinstance(address, Address) and address.kind == "path":
            why = unreachable_directory(os.path.dirname(address.raw) or b".", create=True)
        return SocketFileError(f"cannot create socket{where}: {why}", errno=code)
    if op == "chown":
        return SocketFileError(
            f"cannot give socket{where} the requested owner or group: {reason.lower()}; only "
            "root may give a file to another user, and others may only choose a group they "
            "are in: run as root, or do not ask for that owner or group",
            errno=code,
        )
    if op == "remove the stale socket" and code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return SocketFileError(
            f"cannot remove the stale socket file{where}: {reason.lower()} (it belongs to "
            "another user in a sticky directory, or the directory is not writable for us); "
            "remove it as its owner, or choose another path",
            errno=code,
        )
    if code in RESOURCE_ADVICE:  # not a matter of permissions, whatever the step
        return _generic(exc, f"{op}{where} failed: {RESOURCE_ADVICE[code]}")
    if op == "claim":
        return SocketFileError(
            f"cannot claim the socket path{where}: {reason.lower()}; check the permissions "
            f"of its directory (udskit doctor{where})",
            errno=code,
        )
    if code == errno.ENAMETOOLONG:
        return AddressError(f"{op}{where}: a path component is longer than NAME_MAX (255)")
    return _generic(exc, f"{op}{where} failed: {reason}")


def _generic(exc: OSError, message: str) -> Exception:
    if isinstance(exc, ConnectionError):
        return ConnectionClosed(message)
    return SocketFileError(message, errno=exc.errno)


def explain_connect(code: int | None, address: Address, tried: int | None = None) -> str:
    """One line on why connecting to ``address`` failed with ``code``, and what to do;
    ``tried`` is the connecting socket's type, when known."""
    head = f"cannot connect to {address.shown()}"
    if address.kind == "abstract":
        if code == errno.ECONNREFUSED:
            return f"{head}: nothing listens on that abstract name; start the server first"
        if code == errno.EPROTOTYPE:
            return f"{head}: {_wrong_type(address, tried)}"
        return f"{head}: {os.strerror(code or 0).lower()}"
    if address.kind != "path":
        return f"{head}: {os.strerror(code or 0).lower()}"
    path = address.path
    if code in (errno.ENOENT, errno.ENOTDIR):
        missing = _first_missing(address.raw)  # absolute, so the path's is made so too
        if missing is not None and os.fsencode(missing) != os.path.abspath(address.raw):
            directory = os.path.dirname(address.raw) or b"."
            return f"{head}: {unreachable_directory(directory, create=False)}"
        try:
            link = os.readlink(address.raw)
        except OSError:  # not a symlink (or gone): nothing is there
            return f"{head}: no such file; is the server running, and is the path right?"
        # "no such file" of a name that ls shows: the symlink there leads nowhere
        return (
            f"{head}: {path} is a symlink to {one_line(os.fsdecode(link))}, which leads to no "
            "file; is the server running, and does the link point where it serves?"
        )
    if code == errno.ECONNREFUSED:
        try:
            info = os.stat(address.raw)
        except OSError:
            return f"{head}: connection refused; run 'udskit doctor {path}'"
        if not stat.S_ISSOCK(info.st_mode):
            return f"{head}: {path} is not a socket (it is a {_kind(info.st_mode)}); check the path"
        return (
            f"{head}: the socket file exists but nothing is listening (a stale file left by "
            "a server that exited); restart the server"
        )
    if code in (errno.EACCES, errno.EPERM):
        return (
            f"{head}: permission denied (needs write permission on the socket and search "
            f"permission on every directory above it); run 'udskit doctor {path}'"
        )
    if code == errno.EAGAIN:
        return f"{head}: the server's backlog is full; it is not accepting fast enough"
    if code == errno.EPROTOTYPE:
        return f"{head}: {_wrong_type(address, tried)}"
    return f"{head}: {os.strerror(code or 0).lower()}"


#: The socket types, as ``type=`` names them.
_TYPE_NAMES: Final[dict[int, str]] = {
    socket.SOCK_STREAM: "stream",
    socket.SOCK_SEQPACKET: "seqpacket",
    socket.SOCK_DGRAM: "dgram",
}
_CONNECTED_TYPES: Final[frozenset[int]] = frozenset({socket.SOCK_STREAM, socket.SOCK_SEQPACKET})


def _wrong_type(address: Address, tried: int | None) -> str:
    """EPROTOTYPE: the socket at ``address`` is of another type than ``tried``. Which one,
    if we can tell without reaching the server (then pass that type=)."""
    kind = -1 if tried is None else tried & ~(socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    ours = _TYPE_NAMES.get(kind)
    if ours is None:
        return (
            "it is a socket of another type; pass the server's type= (stream, seqpacket or dgram)"
        )
    theirs = _server_type(address, kind)
    if theirs is not None:
        return f"it is a socket of another type ({theirs}, not {ours}); pass type='{theirs}'"
    return (
        f"it is a socket of another type (stream or seqpacket, not {ours}); pass "
        "type='stream' or type='seqpacket'"
    )


def _server_type(address: Address, tried: int) -> str | None:
    """The type of the socket at ``address``, which refused a connect of type ``tried``.

    Learnt without a connection reaching the server: a datagram connect only records the
    peer's address, and a connect of the wrong type fails before anything is queued; the
    type that is neither ``tried`` nor dgram follows by elimination. A datagram client
    facing a stream or seqpacket server could only tell them apart by connecting for real
    (the server would accept it): None, then.
    """
    if tried not in _CONNECTED_TYPES:
        return None
    flags = socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
    try:
        with sun_path(address) as where, socket.socket(socket.AF_UNIX, flags) as probe:
            code = probe.connect_ex(where)
    except OSError:
        return None
    if code == 0:
        return "dgram"
    if code == errno.EPROTOTYPE:
        (other,) = _CONNECTED_TYPES - {tried}
        return _TYPE_NAMES[other]
    return None


def unreachable_directory(directory: bytes, *, create: bool) -> str:
    """Why ``directory`` cannot be reached (after ENOENT or ENOTDIR), and what to do: the
    first component on the way that is a file of another kind ("notes.txt is a regular
    file, not a directory": creating it would not help), or the first that does not exist
    (``create``: the directory to create, for a server; else the first component missing
    and to check the path, for a client)."""
    absolute = os.path.abspath(directory)
    parts = absolute.split(b"/")
    for i in range(2, len(parts) + 1):
        prefix = b"/".join(parts[:i])
        shown = os.fsdecode(prefix)
        try:
            info = os.stat(prefix)  # follows symlinks, as the kernel's lookup does
        except FileNotFoundError:
            home = unexpanded_home(prefix)
            if home is not None:
                return f"there is no directory {shown}: {home}"
            if create:  # mkdir -p makes the whole directory: name it all
                whole = os.fsdecode(absolute)
                fix = f"create it first (mkdir -p {shlex.quote(whole)})"
                return f"directory {whole} does not exist; {fix}"
            return f"directory {shown} does not exist; check the path"
        except OSError as exc:
            return f"cannot reach {shown}: {os.strerror(exc.errno or 0).lower()}"
        if not stat.S_ISDIR(info.st_mode):
            return f"{shown} is a {_kind(info.st_mode)}, not a directory; check the path"
    # Nothing in the way any more: it changed since the call failed.
    return f"directory {os.fsdecode(absolute)} was not there; try again"


def _first_missing(raw: bytes) -> str | None:
    """The shortest prefix of ``raw`` that does not exist (or is not a directory)."""
    absolute = os.path.abspath(raw)
    parts = absolute.split(b"/")
    for i in range(2, len(parts) + 1):
        prefix = b"/".join(parts[:i])
        if not os.path.lexists(prefix):
            return os.fsdecode(prefix)
        if i < len(parts) and not os.path.isdir(prefix):
            return os.fsdecode(prefix)
    return None


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISREG(mode):
        return "regular file"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "file of unknown type"


def kind_of(mode: int) -> str:
    """Human name of a file type (``regular file``, ``directory``, ``socket``...)."""
    return "socket" if stat.S_ISSOCK(mode) else _kind(mode)
