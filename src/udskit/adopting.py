"""Taking over an inherited listening descriptor (``fd:N``, ``fd:listen``, ``fd:listen:NAME``).

The descriptor must be a socket udskit can serve: AF_UNIX of the requested type, or TCP
for ``type='stream'``; listening, unless it is a datagram socket. What else a parent or
systemd may pass (a file, a FIFO, a netlink socket, a connection systemd accepted with
``Accept=yes``) is refused with an error that names the descriptor and, when systemd
passed it, the unit setting that makes the right one.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from typing import Final

from . import activation
from .address import Address
from .errors import SocketFileError
from .options import base_type, type_name
from .translate import kind_of

__all__ = ["adopt_listener"]

#: The .socket unit setting that makes a listening socket of each type (systemd.socket(5)).
UNIT_SETTING: Final[dict[int, str]] = {
    socket.SOCK_STREAM: "ListenStream=",
    socket.SOCK_SEQPACKET: "ListenSequentialPacket=",
    socket.SOCK_DGRAM: "ListenDatagram=",
}

_FAMILIES: Final[dict[int, str]] = {
    socket.AF_UNIX: "Unix",
    socket.AF_INET: "IPv4",
    socket.AF_INET6: "IPv6",
    socket.AF_NETLINK: "netlink",
}


def adopt_listener(target: Address, kind: int) -> socket.socket:
    """The socket of descriptor ``target.fd``, checked, blocking and close-on-exec.

    On any refusal the descriptor is left open and untouched: it still belongs to whoever
    passed it.
    """
    fd = target.fd
    passed = activation.origin(fd)
    where = _describe(target, passed)
    try:
        found = os.fstat(fd)
    except OSError as exc:
        hint = (
            "LISTEN_FDS says systemd passed it: something in this process closed it"
            if passed is not None
            else "check what the parent process passed"
        )
        raise SocketFileError(
            f"{where} is not open ({os.strerror(exc.errno or errno.EBADF).lower()}); {hint}",
            errno=exc.errno,
        ) from None
    if not stat.S_ISSOCK(found.st_mode):
        hint = (
            f"; the .socket unit passes a socket with {_settings()}, not with "
            "ListenFIFO=, ListenSpecial= or ListenMessageQueue="
            if passed is not None
            else ""
        )
        raise SocketFileError(
            f"{where} is a {kind_of(found.st_mode)}, not a socket{hint}", errno=errno.ENOTSOCK
        )
    sock = socket.socket(fileno=fd)
    try:
        _check(sock, kind, where, systemd=passed is not None)
    except BaseException:
        sock.detach()  # not ours to close
        raise
    os.set_inheritable(fd, False)  # as sd_listen_fds(3) does: children must not inherit it
    sock.setblocking(True)
    return sock


def _check(sock: socket.socket, kind: int, where: str, *, systemd: bool) -> None:
    family = sock.family
    actual = base_type(sock)
    if family not in (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6) or (
        family != socket.AF_UNIX and actual != socket.SOCK_STREAM
    ):
        name = _FAMILIES.get(family, f"family {int(family)}")
        raise SocketFileError(
            f"{where} is a{'n' if name[0] in 'AEIOUaeiou' else ''} {name} "
            f"{_type_word(actual)} socket; udskit serves Unix sockets (.socket unit: "
            f"{_settings()} with a path or @name) and TCP stream sockets "
            "(ListenStream=PORT)"
        )
    wanted = type_name(kind)
    if actual != kind:
        fix = (
            f", or change the .socket unit's {UNIT_SETTING.get(actual, '?')} to "
            f"{UNIT_SETTING[kind]}"
            if systemd and actual in UNIT_SETTING
            else ""
        )
        raise SocketFileError(
            f"{where} is a {_type_word(actual)} socket, not the {wanted} socket "
            f"type='{wanted}' asks for: pass type='{_type_word(actual)}'{fix}"
        )
    if kind == socket.SOCK_DGRAM or sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        return
    try:
        sock.getpeername()
    except OSError:
        raise SocketFileError(
            f"{where} is a {wanted} socket that is not listening (bound, but listen() was "
            "never called); pass a listening socket"
        ) from None
    fix = (
        ": set Accept=no in the .socket unit (Accept=yes passes one accepted connection "
        "to each service instance)"
        if systemd
        else ": pass the listening socket, not an accepted connection"
    )
    raise SocketFileError(f"{where} is a connected {wanted} socket, not a listening one{fix}")


def _describe(target: Address, passed: activation.Activated | None) -> str:
    if passed is None:
        return f"{target}: descriptor {target.fd}"
    return (
        f"{target}: descriptor {target.fd} (socket-activated, named {passed.name!r} in "
        "LISTEN_FDNAMES)"
    )


def _type_word(kind: int) -> str:
    try:
        return type_name(kind)
    except ValueError:
        return f"type-{kind}"


def _settings() -> str:
    return ", ".join(UNIT_SETTING.values())
