"""Control messages: SCM_RIGHTS (descriptors) and SCM_CREDENTIALS, with fd hygiene.

Rules kept here, for every receive path:

* descriptors arrive close-on-exec (MSG_CMSG_CLOEXEC), so a fork+exec elsewhere in the
  program never leaks them into a child;
* if the kernel had to drop control data (MSG_CTRUNC: more descriptors than our buffer had
  room for), or sent control data we did not ask for, every descriptor that did arrive is
  closed and ProtocolError is raised: half a set of descriptors is worse than none;
* a truncated datagram (MSG_TRUNC) is an error too, never a silently shortened message;
* a stream that takes no descriptors (``max_fds=0``) asks the kernel to refuse them
  (``refuse_descriptors``): then no control data can arrive, and it reads without any.
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import platform
import socket
from collections.abc import Iterable, Sequence
from typing import Final

from .creds import UCRED, PeerCred, unpack_ucred
from .errors import ProtocolError

__all__ = [
    "MAX_FDS_PER_MESSAGE",
    "ControlDataError",
    "Received",
    "ancillary_size",
    "close_fds",
    "descriptors",
    "discard",
    "refuse_descriptors",
    "rights",
    "unpack",
]

#: Descriptors accepted in (and sent with) one message by default. The kernel allows 253
#: (SCM_MAX_FD); every descriptor in flight is charged to the sender's RLIMIT_NOFILE and
#: must be closed by the receiver, so a small default bounds what a peer can make us hold.
MAX_FDS_PER_MESSAGE: Final = 16

_INT_SIZE: Final = array.array("i").itemsize

#: recvmsg flags: descriptors arrive with FD_CLOEXEC already set.
RECV_FLAGS: Final = int(socket.MSG_CMSG_CLOEXEC)

#: MSG_CTRUNC as a plain int: ``flags & socket.MSG_CTRUNC`` would go through IntFlag's
#: ``__rand__`` (the right operand subclasses int), a Python call on every receive.
_CTRUNC: Final = int(socket.MSG_CTRUNC)

#: Machines whose socket option numbers are asm-generic/socket.h's. Alpha, MIPS, PA-RISC
#: and SPARC number them their own way; there SO_PASSRIGHTS is left alone unless Python
#: knows its number.
_GENERIC_SOCKOPTS: Final = frozenset(
    {"x86_64", "i386", "i686", "aarch64", "arm64", "armv7l", "riscv64", "s390x", "ppc64le"}
)

#: SO_PASSRIGHTS (Linux 6.16): set to 0, the kernel refuses SCM_RIGHTS sent to the socket
#: (the sender's sendmsg() fails with EPERM), so no descriptor can arrive; an accepted socket
#: inherits it from its listener. 83 in asm-generic/socket.h; Python has no name for it yet.
SO_PASSRIGHTS: Final[int | None] = getattr(
    socket, "SO_PASSRIGHTS", 83 if platform.machine() in _GENERIC_SOCKOPTS else None
)


def ancillary_size(max_fds: int) -> int:
    """The control buffer size that holds ``max_fds`` descriptors and credentials.

    Room for credentials is kept whether or not the caller asked for them: a socket with
    SO_PASSCRED (an adopted descriptor, or one accepted from a systemd listener with
    PassCredentials=yes, which accepted sockets inherit) gets SCM_CREDENTIALS with every
    read, placed before the descriptors. Without room for them the kernel cuts them short
    and drops the descriptors that follow (MSG_CTRUNC): every read would fail.
    """
    size = socket.CMSG_SPACE(max_fds * _INT_SIZE) if max_fds > 0 else 0
    return size + socket.CMSG_SPACE(UCRED.size)


def refuse_descriptors(sock: socket.socket) -> bool:
    """Ask the kernel to refuse descriptors sent to Unix socket ``sock``; whether it will.

    setsockopt(SO_PASSRIGHTS) fails with ENOPROTOOPT on a kernel before 6.16, and with
    EOPNOTSUPP on a socket that is not AF_UNIX: either way the answer is no, and the caller
    keeps reading with a control buffer, so descriptors that arrive are still reported.
    Descriptors queued before the call are not refused: a reader without a control buffer
    gets their bytes, and the kernel closes the descriptors.
    """
    if SO_PASSRIGHTS is None or sock.family != socket.AF_UNIX:
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_PASSRIGHTS, 0)
    except OSError:
        return False
    return True


def descriptors(fds: object, what: str, hint: str = "pass descriptors of open files") -> list[int]:
    """``fds`` as a list of open descriptors, or an error that says what ``what`` takes
    (a closed one: ValueError, naming it, then ``hint``).

    A descriptor that is not open would fail the sendmsg() with EBADF, which the kernel
    also gives for a closed socket: checked here (one fcntl each), so that the error names
    the descriptor instead of blaming the socket.
    """
    try:
        listed: list[int] = list(fds)  # type: ignore[call-overload]
    except TypeError:
        raise TypeError(
            f"{what}: fds is a sequence of open descriptors (ints), not {type(fds).__name__}"
        ) from None
    for fd in listed:
        if isinstance(fd, int) and not isinstance(fd, bool) and fd >= 0:
            try:
                fcntl.fcntl(fd, fcntl.F_GETFD)
            except OSError:
                raise ValueError(f"{what}: descriptor {fd} is not open; {hint}") from None
    return listed


def rights(fds: Sequence[int], limit: int) -> list[tuple[int, int, bytes]]:
    """The ancillary list for sendmsg() that passes ``fds`` (checked against ``limit``)."""
    if len(fds) > limit:
        raise ProtocolError(
            f"cannot send {len(fds)} descriptors in one message: the limit is {limit} "
            "(max_fds); send them in several messages"
        )
    for fd in fds:
        if isinstance(fd, bool) or not isinstance(fd, int) or fd < 0:
            raise ValueError(f"descriptors to send must be non-negative ints, not {fd!r}")
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


class Received:
    """What a recvmsg() brought besides data: descriptors and credentials."""

    __slots__ = ("cred", "creds_sent", "fds")

    def __init__(self, fds: list[int], cred: PeerCred | None, creds_sent: bool = False) -> None:
        self.fds = fds
        self.cred = cred
        #: An SCM_CREDENTIALS message came (``cred`` is None if it held none: pid 0).
        self.creds_sent = creds_sent


_NOTHING: Final = Received([], None)


class ControlDataError(ProtocolError):
    """``unpack`` refused a message's control data. ``cred`` is the sender's credentials
    if they came with it, so that a listener can drop what its policy refuses anyway
    rather than let a refused sender raise errors in the server."""

    def __init__(self, message: str, cred: PeerCred | None) -> None:
        super().__init__(message)
        self.cred = cred


def unpack(
    ancdata: Iterable[tuple[int, int, bytes]],
    flags: int,
    where: object,
    max_fds: int | None = None,
) -> Received:
    """Parse recvmsg()'s control data; on any problem close what arrived and raise.

    Pass the receiver's ``max_fds``: the control buffer has room to spare (CMSG_SPACE
    alignment, and a credentials slot the kernel leaves unused without SO_PASSCRED), so
    the kernel may deliver more descriptors than that without setting MSG_CTRUNC.
    """
    fds: list[int] = []
    cred: PeerCred | None = None
    creds_sent = False
    foreign: tuple[int, int] | None = None
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % _INT_SIZE
            fds.extend(array.array("i", data[:usable]))
        elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            if len(data) < UCRED.size:  # cut short (MSG_CTRUNC): no credentials to read
                foreign = (level, kind)
                continue
            cred = unpack_ucred(data)
            creds_sent = True
        else:
            foreign = (level, kind)
    if flags & _CTRUNC:
        # Asked before closing what arrived, while the table is as the kernel found it.
        why = (
            "this process had no descriptor free to receive them into (its open-file limit, "
            "ulimit -n, is reached): close descriptors or raise the limit"
            if _out_of_descriptors()
            else "the peer sent more descriptors than max_fds"
        )
        close_fds(fds)
        raise ControlDataError(
            f"message from {where} carried more control data than allowed (MSG_CTRUNC): "
            f"{why}; all received descriptors closed",
            cred,
        )
    if max_fds is not None and len(fds) > max_fds:
        close_fds(fds)
        raise ControlDataError(
            f"message from {where} carried {len(fds)} descriptors, more than max_fds "
            f"({max_fds}); all received descriptors closed",
            cred,
        )
    if foreign is not None:
        close_fds(fds)
        raise ControlDataError(
            f"message from {where} carried unexpected control data (level {foreign[0]}, "
            f"type {foreign[1]}); all received descriptors closed",
            cred,
        )
    if not fds and not creds_sent:
        return _NOTHING
    return Received(fds, cred, creds_sent)


def _out_of_descriptors() -> bool:
    """Whether this process can open no descriptor now. The kernel sets MSG_CTRUNC, and
    drops the rest, also when installing a received descriptor fails with EMFILE or ENFILE
    (scm_detach_fds() in net/core/scm.c): the peer is not to blame then."""
    try:
        fd = os.open("/", os.O_PATH | os.O_CLOEXEC)
    except OSError as exc:
        return exc.errno in (errno.EMFILE, errno.ENFILE)
    os.close(fd)
    return False


def discard(ancdata: Iterable[tuple[int, int, bytes]], flags: int, where: object) -> None:
    """Close every descriptor that came with a message nobody will take."""
    try:
        close_fds(unpack(ancdata, flags, where).fds)
    except ProtocolError:
        pass  # unpack closed what came


def close_fds(fds: Iterable[int]) -> None:
    """Close every descriptor, ignoring ones already closed."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
