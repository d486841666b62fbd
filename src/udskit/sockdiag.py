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

__all__ = ["BoundFile", "bound_file"]

#: linux/netlink.h and linux/sock_diag.h / linux/unix_diag.h constants.
_NETLINK_SOCK_DIAG: Final = 4
_SOCK_DIAG_BY_FAMILY: Final = 20
_NLM_F_REQUEST: Final = 0x01
_NLMSG_ERROR: Final = 2
_UDIAG_SHOW_VFS: Final = 0x02
_UNIX_DIAG_VFS: Final = 1
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

#: How long the kernel may take to answer a request about our own socket; it answers at
#: once, so this only bounds a misbehaving netlink.
_ANSWER_TIMEOUT: Final = 5.0


@dataclass(frozen=True, slots=True)
class BoundFile:
    """The device and (low 32 bits of the) inode of the file a socket's bind() created."""

    dev: int
    ino32: int

    def matches(self, info: os.stat_result) -> bool:
        """True if ``info`` (a stat of some file) describes this very file."""
        return info.st_dev == self.dev and info.st_ino & 0xFFFFFFFF == self.ino32


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
        if attr == _UNIX_DIAG_VFS and size >= _RTATTR.size + _VFS.size:
            ino, dev = _VFS.unpack_from(answer, offset + _RTATTR.size)
            major, minor = dev >> _MINOR_BITS, dev & ((1 << _MINOR_BITS) - 1)
            return BoundFile(os.makedev(major, minor), ino)
        offset += (size + 3) & ~3  # attributes are 4-byte aligned
    return None
