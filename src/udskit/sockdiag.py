"""Which file a bound AF_UNIX socket created: sock_diag's UNIX_DIAG_VFS, asked over netlink.

After ``bind()`` the socket file sits at a name in a directory, and in a directory others may
write, that name can point at another file a moment later (the fresh socket renamed away, a
symlink planted). Nothing on the socket's own descriptor names the file's inode (``fstat``
reports the socket's inode in sockfs; ``getsockname`` only the path string), but the
kernel's socket diagnostics do: a ``SOCK_DIAG_BY_FAMILY`` request for our socket's inode
with ``UDIAG_SHOW_VFS`` answers the device and inode of the file bind() created
(net/unix/diag.c, ``sk_diag_dump_vfs``). ``ss -x`` reads the same.

Two details of that answer: the inode is a ``u32`` (the file's inode number, truncated on
file systems with 64-bit inode numbers), and the device is the kernel's internal ``dev_t``
(major in the top 12 bits, minor in the low 20), not the encoding ``stat`` reports.

Where the kernel lacks sock_diag for AF_UNIX (built without CONFIG_UNIX_DIAG, or a sandbox
without netlink), :func:`bound_file` returns None and the caller falls back to what ``stat``
can tell.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass
from typing import Final

__all__ = ["BoundFile", "UnixSocket", "bound_file", "unix_sockets"]

#: linux/netlink.h and linux/sock_diag.h / linux/unix_diag.h constants.
_NETLINK_SOCK_DIAG: Final = 4
_SOCK_DIAG_BY_FAMILY: Final = 20
_NLM_F_REQUEST: Final = 0x01
#: NLM_F_ROOT | NLM_F_MATCH: every socket of the family, in as many answers as it takes.
_NLM_F_DUMP: Final = 0x300
_NLMSG_ERROR: Final = 2
_NLMSG_DONE: Final = 3
_UDIAG_SHOW_NAME: Final = 0x01
_UDIAG_SHOW_VFS: Final = 0x02
_UDIAG_SHOW_ICONS: Final = 0x08
_UNIX_DIAG_NAME: Final = 0
_UNIX_DIAG_VFS: Final = 1
_UNIX_DIAG_ICONS: Final = 3
#: Every socket state (a bit per TCP-style state number; AF_UNIX uses a few of them).
_ALL_STATES: Final = 0xFFFFFFFF
#: INET_DIAG_NOCOOKIE: "any cookie" (we look the socket up by inode).
_NO_COOKIE: Final = 0xFFFFFFFF

_NLMSGHDR: Final = struct.Struct("=IHHII")
#: struct unix_diag_req: family, protocol, pad, states, ino, show, cookie[2].
_REQUEST: Final = struct.Struct("=BBHIIIII")
#: struct unix_diag_msg: family, type, state, pad, ino, cookie[2].
_ANSWER: Final = struct.Struct("=BBBBIII")
_RTATTR: Final = struct.Struct("=HH")
#: struct unix_diag_vfs: ino, dev.
_VFS: Final = struct.Struct("=II")

#: The kernel's internal dev_t keeps the minor number in the low 20 bits.
_MINOR_BITS: Final = 20

#: Ample for one socket's answer (header, message, one attribute).
_ANSWER_SIZE: Final = 8192

#: One read of a dump: the kernel fills each with as many sockets' answers as fit.
_DUMP_READ: Final = 1 << 16

#: sk_state of a listening socket (TCP_LISTEN) and of a connected one (TCP_ESTABLISHED).
_TCP_LISTEN: Final = 10
_TCP_ESTABLISHED: Final = 1

#: How long the kernel may take to answer a request about our own socket; it answers at
#: once, so this only bounds a misbehaving netlink.
_ANSWER_TIMEOUT: Final = 5.0


@dataclass(frozen=True, slots=True)
class BoundFile:
    """The device and (low 32 bits of the) inode of the file a socket's bind() created."""

    dev: int
    ino32: int

    @classmethod
    def of(cls, info: os.stat_result) -> BoundFile:
        """The file ``info`` (a stat of it) describes, as sock_diag names files."""
        return cls(info.st_dev, info.st_ino & 0xFFFFFFFF)

    def matches(self, info: os.stat_result) -> bool:
        """True if ``info`` (a stat of some file) describes this very file."""
        return BoundFile.of(info) == self


def bound_file(sock: socket.socket) -> BoundFile | None:
    """The file ``sock`` (a bound AF_UNIX socket) created, or None if the kernel cannot say.

    None also for a socket with no file (unbound, abstract, or bound in another way).
    """
    inode = os.fstat(sock.fileno()).st_ino
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as diag:
            diag.settimeout(_ANSWER_TIMEOUT)
            request = _REQUEST.pack(
                socket.AF_UNIX, 0, 0, _ALL_STATES, inode, _UDIAG_SHOW_VFS, _NO_COOKIE, _NO_COOKIE
            )
            header = _NLMSGHDR.pack(
                _NLMSGHDR.size + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0
            )
            diag.send(header + request)
            answer = diag.recv(_ANSWER_SIZE)
    except OSError:  # EAFNOSUPPORT, EPROTONOSUPPORT, EPERM: no sock_diag here
        return None
    return _parse(answer, inode)


def _parse(answer: bytes, inode: int) -> BoundFile | None:
    if len(answer) < _NLMSGHDR.size + _ANSWER.size:
        return None  # NLMSG_ERROR (ENOENT: no unix_diag module) is shorter than an answer
    length, kind, _, _, _ = _NLMSGHDR.unpack_from(answer)
    if kind != _SOCK_DIAG_BY_FAMILY or length > len(answer):
        return None
    family, _, _, _, found, _, _ = _ANSWER.unpack_from(answer, _NLMSGHDR.size)
    if family != socket.AF_UNIX or found != inode & 0xFFFFFFFF:
        return None
    offset = _NLMSGHDR.size + _ANSWER.size
    while offset + _RTATTR.size <= length:
        size, attr = _RTATTR.unpack_from(answer, offset)
        if size < _RTATTR.size:
            return None
        if attr == _UNIX_DIAG_VFS:
            return _vfs(answer[offset + _RTATTR.size : offset + size])
        offset += (size + 3) & ~3  # attributes are 4-byte aligned
    return None


def _vfs(attribute: bytes) -> BoundFile | None:
    """A UNIX_DIAG_VFS attribute's file (None if it is missing or short)."""
    if len(attribute) < _VFS.size:
        return None
    ino, dev = _VFS.unpack_from(attribute)
    major, minor = dev >> _MINOR_BITS, dev & ((1 << _MINOR_BITS) - 1)
    return BoundFile(os.makedev(major, minor), ino)


@dataclass(frozen=True, slots=True)
class UnixSocket:
    """One AF_UNIX socket of this network namespace, as sock_diag describes it."""

    inode: int
    type: int  # socket.SOCK_STREAM, SOCK_DGRAM or SOCK_SEQPACKET
    listening: bool
    connected: bool
    #: the name it is bound to, as bytes (b"\0..." for an abstract name); b"" if none
    name: bytes
    #: for a listener: connections in its backlog, not yet accepted
    queued: int = 0
    #: the file its bind() created, if it has one
    file: BoundFile | None = None


def unix_sockets() -> list[UnixSocket] | None:
    """Every AF_UNIX socket of this network namespace, or None if the kernel cannot say.

    Unlike /proc/net/unix, where the kernel writes each name raw (a newline in a name a
    user bound starts what reads as another socket's line), every name comes here as a
    length-delimited attribute: nothing a user binds can forge or hide another socket.
    """
    request = _REQUEST.pack(
        socket.AF_UNIX,
        0,
        0,
        _ALL_STATES,
        0,
        _UDIAG_SHOW_NAME | _UDIAG_SHOW_VFS | _UDIAG_SHOW_ICONS,
        _NO_COOKIE,
        _NO_COOKIE,
    )
    header = _NLMSGHDR.pack(
        _NLMSGHDR.size + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0
    )
    found: list[UnixSocket] = []
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as diag:
            diag.settimeout(_ANSWER_TIMEOUT)
            diag.send(header + request)
            while True:
                answer = diag.recv(_DUMP_READ)
                if not answer:
                    return None
                done = _parse_dump(answer, found)
                if done is None:
                    return None
                if done:
                    return found
    except OSError:  # EAFNOSUPPORT, EPROTONOSUPPORT, EPERM, a timeout: no sock_diag here
        return None


def _parse_dump(answer: bytes, found: list[UnixSocket]) -> bool | None:
    """Add the sockets of one read of a dump to ``found``; True at the dump's end, None if
    the kernel answered with an error or with what does not parse."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(answer):
        length, kind, _, _, _ = _NLMSGHDR.unpack_from(answer, offset)
        if length < _NLMSGHDR.size or offset + length > len(answer):
            return None
        if kind == _NLMSG_DONE:
            return True
        if kind != _SOCK_DIAG_BY_FAMILY:
            return None  # NLMSG_ERROR: no unix_diag in this kernel, say
        body = offset + _NLMSGHDR.size
        if length < _NLMSGHDR.size + _ANSWER.size:
            return None
        family, kind_of, state, _, inode, _, _ = _ANSWER.unpack_from(answer, body)
        if family == socket.AF_UNIX:
            attrs = _attributes(answer, body + _ANSWER.size, offset + length)
            name = _bound_name(attrs.get(_UNIX_DIAG_NAME, b""))
            queued = len(attrs.get(_UNIX_DIAG_ICONS, b"")) // 4  # one u32 inode each
            listening, connected = state == _TCP_LISTEN, state == _TCP_ESTABLISHED
            file = _vfs(attrs.get(_UNIX_DIAG_VFS, b""))
            found.append(UnixSocket(inode, kind_of, listening, connected, name, queued, file))
        offset += (length + 3) & ~3  # messages are 4-byte aligned
    return False


def _attributes(answer: bytes, offset: int, end: int) -> dict[int, bytes]:
    """The attributes of one answer, by type (what does not parse ends the list)."""
    found: dict[int, bytes] = {}
    while offset + _RTATTR.size <= end:
        size, attr = _RTATTR.unpack_from(answer, offset)
        if size < _RTATTR.size or offset + size > end:
            break
        found[attr] = answer[offset + _RTATTR.size : offset + size]
        offset += (size + 3) & ~3  # attributes are 4-byte aligned
    return found


def _bound_name(raw: bytes) -> bytes:
    """A path's name ends at its NUL (the kernel keeps the length bind() was given, which
    may count one); an abstract name (b"\0...") is all of its bytes."""
    if raw.startswith(b"\0"):
        return raw
    return raw.split(b"\0", 1)[0]
