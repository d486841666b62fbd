"""Putting a relay in front of a live server's socket file, and the server's socket back.

Interposing at PATH (the claim lock of :mod:`udskit.sockfile` held throughout):

1. PATH is opened ``O_PATH|O_NOFOLLOW`` and held: every later check compares (st_dev, st_ino)
   with this descriptor, and while we hold it the inode number cannot be reused;
2. the server's socket gets a second name, ``DIR/.NAME.udskit-tapped`` (``link()``, which
   never replaces anything): connections keep reaching it through that name;
3. the relay's socket is bound in a private 0700 directory with the server socket's mode and
   owner (sockfile's ``bind_private``), listening before it is visible;
4. ``renameat2(RENAME_EXCHANGE)`` swaps the relay's file and PATH in one step: PATH never
   disappears, so a connect at any moment reaches the server or the relay, and what came out
   of PATH lands in our private directory, where we check that it is the server's socket
   (else the exchange is undone and the tap refuses).

Restoring is the same exchange between the tapped name and PATH, after checking that both
are still what the tap put there; the relay's file that comes out is removed only if it is
still the relay's. File systems without RENAME_EXCHANGE (EINVAL) get a check and a plain
``rename()``, which replaces PATH atomically but leaves a moment between check and rename.

A tap killed by SIGKILL leaves the server's socket at the tapped name and the dead relay's
stale socket at PATH; :func:`restore_displaced` (``udskit tap --restore PATH``) puts the
server's socket back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import socket
import stat
from dataclasses import dataclass
from typing import Final

from ..address import Address
from ..creds import PeerCred, peer_cred
from ..errors import AddressInUse, ConnectError, SocketFileError, UdsError
from ..sockfile import (
    _Directory,
    _Lock,
    _Private,
    _remove_if,
    bind_private,
    probe,
    tapped_name,
)
from ..translate import kind_of, translating

__all__ = ["SOCKET_TYPES", "Interposed", "interpose", "restore_displaced"]

log = logging.getLogger("udskit")

#: renameat2() flag (linux/fs.h): exchange the two names atomically.
_RENAME_EXCHANGE: Final = 2

#: AT_FDCWD is not needed: both names are always given relative to directory descriptors.
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)

#: The socket types, by name, in the order a probe tries them.
SOCKET_TYPES: Final = {
    "stream": socket.SOCK_STREAM,
    "seqpacket": socket.SOCK_SEQPACKET,
    "dgram": socket.SOCK_DGRAM,
}

#: Listen backlog of the relay: that of a udskit listener (options.DEFAULT_BACKLOG's value
#: is the kernel's usual somaxconn); clients queue here while the relay accepts.
_BACKLOG: Final = 4096


def _exchange(src_fd: int, src: bytes, dst_fd: int, dst: bytes) -> None:
    """Swap two names atomically (renameat2 RENAME_EXCHANGE); OSError on failure."""
    if _libc.renameat2(src_fd, src, dst_fd, dst, _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


@dataclass(frozen=True, slots=True)
class _Found:
    type: str | None  # stream, seqpacket, dgram; None when nothing answers
    errno: int
    cred: PeerCred | None


def _find_type(target: str, wanted: str | None) -> _Found:
    """Which socket type answers at ``target``: one connect per type (as a claim's probe)."""
    code = errno.ECONNREFUSED
    for name, kind in SOCKET_TYPES.items():
        if wanted is not None and name != wanted:
            continue
        with socket.socket(socket.AF_UNIX, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC) as s:
            code = s.connect_ex(target)
            if code == errno.EPROTOTYPE:
                continue
            if code == 0:
                cred = peer_cred(s) if kind != socket.SOCK_DGRAM else None
                return _Found(name, 0, cred)
            if code == errno.EAGAIN:  # alive, its backlog full
                return _Found(name, code, None)
            return _Found(None, code, None)
    return _Found(None, code, None)


class Interposed:
    """The relay's socket, in place at PATH, and how to put the server's socket back."""

    __slots__ = (
        "_directory",
        "_held",
        "_relay_id",
        "_server_id",
        "address",
        "aside",
        "relay",
        "server",
        "type",
    )

    def __init__(
        self,
        address: Address,
        directory: _Directory,
        held: int,
        relay: socket.socket,
        kind: str,
        server: PeerCred | None,
        relay_id: tuple[int, int],
    ) -> None:
        self.address = address
        self._directory = directory
        self._held = held
        self.relay = relay
        self.type = kind
        self.server = server
        self._relay_id = relay_id
        info = os.fstat(held)
        self._server_id = (info.st_dev, info.st_ino)
        self.aside = os.fsdecode(
            os.path.join(os.path.dirname(directory.path), tapped_name(directory.name))
        )

    @property
    def server_sun_path(self) -> str:
        """The server's socket, through our descriptor of it: no rename redirects it."""
        return f"/proc/self/fd/{self._held}"

    @property
    def directory_fd(self) -> int:
        return self._directory.fd

    @property
    def aside_name(self) -> bytes:
        return tapped_name(self._directory.name)

    def server_alive(self) -> bool:
        return probe(self.server_sun_path).live

    def in_place(self) -> bool:
        """True while PATH holds the relay's socket, so that new clients reach the tap. A
        server that removes its socket file by name as it exits (redis, nginx, PostgreSQL)
        removes the relay's; a file put at PATH replaces it. One lstat: the server is not
        disturbed (a probe's connect shows in its log, as PostgreSQL's "incomplete startup
        packet")."""
        return _same(self._directory.lstat(), self._relay_id)

    def restore(self) -> str:
        """Put the server's socket back at PATH; what happened, in one line.

        Never raises for what it finds: a PATH or tapped name that someone else changed is
        left as it is, and the line says so.
        """
        directory = self._directory
        name, aside = directory.name, self.aside_name
        try:
            with translating("restore", self.address), _Lock(directory):
                at_path = directory.lstat()
                at_aside = directory.lstat(aside)
                relay_there = _same(at_path, self._relay_id)
                server_there = _same(at_aside, self._server_id)
                alive = self.server_alive()
                if server_there and relay_there:
                    _swap_back(directory, aside, name, self._server_id)
                    _remove_if(directory, aside, self._relay_id)
                    if alive:
                        return f"restored {self.address}: the server's socket is back in place"
                    return (
                        f"restored {self.address}: the server exited while tapped; its socket "
                        "file is back in place, stale (a udskit server started there reclaims it)"
                    )
                if server_there and at_path is None and not alive:
                    # The server removed its socket file as it exited: putting its stale
                    # socket back would leave what the server itself took away.
                    _remove_if(directory, aside, self._server_id)
                    return (
                        f"did not restore {self.address}: the server exited while tapped and "
                        f"removed its socket file; its stale socket at {self.aside} is removed"
                    )
                if server_there and at_path is None:
                    _link_held(self._held, directory, name)
                    _remove_if(directory, aside, self._server_id)
                    return f"restored {self.address} (it had been removed while tapped)"
                if server_there:
                    other = kind_of(at_path.st_mode) if at_path else "file"
                    if not alive:
                        # The server exited (removing PATH by name, which took the relay's
                        # file, as redis and nginx do) and something else took PATH: a new
                        # server, most often. Its old socket, stale, has the tapped name
                        # only because the tap moved it there; left, ls, doctor and
                        # --restore would take it for a tap still running.
                        _remove_if(directory, aside, self._server_id)
                        return (
                            f"did not restore {self.address}: the server exited while tapped "
                            f"and a {other} the tap did not create took its place; the old "
                            f"server's stale socket at {self.aside} is removed"
                        )
                    return (
                        f"did not restore {self.address}: it was replaced while tapped by a "
                        f"{other} the tap did not create; the server's socket stays at "
                        f"{self.aside}"
                    )
                if relay_there:
                    _remove_if(directory, name, self._relay_id)
                return (
                    f"did not restore {self.address}: the server's socket is no longer at "
                    f"{self.aside} (removed or replaced while tapped); the tap's relay is removed"
                )
        except (OSError, UdsError) as exc:
            return (
                f"could not restore {self.address}: {exc}; run 'udskit tap --restore "
                f"{self.address}'"
            )

    def close(self) -> None:
        """Close the descriptors (after :meth:`restore`)."""
        os.close(self._held)
        self._directory.close()


def _link_held(held: int, directory: _Directory, name: bytes) -> None:
    """Give ``name`` to the file we hold open, never to what its tapped name (which another
    user may rename or replace, without the sticky bit) now leads to: linking that name
    would follow a symlink planted there, or link the wrong file."""
    os.link(
        f"/proc/self/fd/{held}",
        name,
        dst_dir_fd=directory.fd,
        follow_symlinks=True,  # the magic link to the very inode we hold
    )


def _same(info: os.stat_result | None, dev_ino: tuple[int, int]) -> bool:
    return info is not None and (info.st_dev, info.st_ino) == dev_ino


def _swap_back(directory: _Directory, aside: bytes, name: bytes, server: tuple[int, int]) -> None:
    """Exchange the tapped name and PATH (or rename, where exchange is not supported)."""
    try:
        _exchange(directory.fd, aside, directory.fd, name)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOSYS):
            raise
        os.rename(aside, name, src_dir_fd=directory.fd, dst_dir_fd=directory.fd)
        return
    if not _same(directory.lstat(), server):  # replaced between our look and the exchange
        _exchange(directory.fd, aside, directory.fd, name)
        raise SocketFileError(
            f"{os.fsdecode(directory.path)} changed while we restored it; nothing was moved",
            errno=errno.EEXIST,
        )


def interpose(address: Address, wanted: str | None) -> Interposed:
    """Move the server's socket at ``address`` aside and put a relay socket in its place.

    ``wanted``: the socket type the caller expects (None: whichever answers). Raises udskit
    errors that say why the path cannot be tapped.
    """
    path = address.absolute().raw
    directory = _Directory(path)
    try:
        with translating("tap", address), _Lock(directory):
            return _interpose(address, directory, wanted)
    except BaseException:
        directory.close()
        raise


def _interpose(address: Address, directory: _Directory, wanted: str | None) -> Interposed:
    try:
        held = os.open(
            directory.name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory.fd
        )
    except FileNotFoundError:
        raise ConnectError(
            f"cannot tap {address}: no such file; start its server first (udskit wait "
            f"{address} waits for it)",
            errno=errno.ENOENT,
        ) from None
    try:
        info = os.fstat(held)
        _require_socket(address, info)
        aside = tapped_name(directory.name)
        _check_not_tapped(address, directory, aside, info)
        found = _find_type(f"/proc/self/fd/{held}", wanted)
        if found.type is None:
            _refuse_unreachable(address, found, wanted, held)
        assert found.type is not None
        relay = _interpose_as(address, directory, held, info, aside, found.type)
        return Interposed(address, directory, held, relay[0], found.type, found.cred, relay[1])
    except BaseException:
        os.close(held)
        raise


def _require_socket(address: Address, info: os.stat_result) -> None:
    if not stat.S_ISSOCK(info.st_mode):
        raise SocketFileError(
            f"cannot tap {address}: it is a {kind_of(info.st_mode)}, not a socket",
            errno=errno.ENOTSOCK,
        )


def _refuse_unreachable(address: Address, found: _Found, wanted: str | None, held: int) -> None:
    if found.errno == errno.EPROTOTYPE and wanted is not None:
        actual = _find_type(f"/proc/self/fd/{held}", None).type
        raise ConnectError(
            f"cannot tap {address}: it is a {actual or 'non-' + wanted} socket, not a {wanted} "
            f"one (--type {actual or 'stream'})",
            errno=errno.EPROTOTYPE,
        )
    if found.errno == errno.ECONNREFUSED:
        raise ConnectError(
            f"cannot tap {address}: nothing is listening there (a stale socket file); start "
            "its server first",
            errno=errno.ECONNREFUSED,
        )
    raise ConnectError(
        f"cannot tap {address}: connecting to it failed: {os.strerror(found.errno).lower()}",
        errno=found.errno,
    )


def _check_not_tapped(
    address: Address, directory: _Directory, aside: bytes, server: os.stat_result
) -> None:
    found = directory.lstat(aside)
    if found is None:
        return
    if not stat.S_ISSOCK(found.st_mode) or found.st_uid != server.st_uid:
        # Not a tap's: it keeps the server's socket there and puts a relay with the same
        # owner at the path. Another user's file planted at the name (in a directory others
        # may write), taken for a killed tap's, would be put at the path by --restore.
        raise SocketFileError(
            f"cannot tap {address}: a {kind_of(found.st_mode)} of uid {found.st_uid} is at "
            f"{os.fsdecode(aside)}, the name the tap needs for the server's socket; remove it "
            "as its owner, or as root (udskit never deletes what it did not create)",
            errno=errno.EEXIST,
        )
    at_path = probe(directory.sun_path(directory.name, directory.path))
    if at_path.live:
        who = f" (pid {at_path.cred.pid})" if at_path.cred is not None else ""
        raise AddressInUse(
            f"cannot tap {address}: it is already tapped{who}; its server's socket is at "
            f"{os.fsdecode(aside)}; stop that tap first",
            pid=at_path.cred.pid if at_path.cred is not None else None,
        )
    raise SocketFileError(
        f"cannot tap {address}: a tap that was killed left its server's socket at "
        f"{os.fsdecode(aside)}; run 'udskit tap --restore {address}' first",
        errno=errno.EEXIST,
    )


def _interpose_as(
    address: Address,
    directory: _Directory,
    held: int,
    info: os.stat_result,
    aside: bytes,
    kind: str,
) -> tuple[socket.socket, tuple[int, int]]:
    server = (info.st_dev, info.st_ino)
    try:
        os.link(
            f"/proc/self/fd/{held}",
            aside,
            dst_dir_fd=directory.fd,
            follow_symlinks=True,  # the magic link to the very inode we hold
        )
    except OSError as exc:
        raise _cannot_link(address, info, exc) from exc
    relay = socket.socket(socket.AF_UNIX, SOCKET_TYPES[kind] | socket.SOCK_CLOEXEC)
    moved = False
    try:
        if kind == "dgram":
            # Before PATH leads here: a datagram queued before the relay starts reading
            # carries its sender's credentials only if the option was on when it came, and
            # the relay passes on no datagram without them (see tap.datagrams).
            relay.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        me = os.geteuid()
        uid = info.st_uid if info.st_uid != me else -1
        gid = info.st_gid if info.st_gid != os.getegid() else -1
        private = _Private(directory, address)
        inner = b""
        try:
            inner, relay_id = bind_private(
                relay,
                directory,
                private,
                address,
                stat.S_IMODE(info.st_mode),
                uid,
                gid,
                None if kind == "dgram" else _BACKLOG,
            )
            _put_in_place(directory, private, inner, server, address)
            moved = True
            os.unlink(inner, dir_fd=private.fd)  # the server's second name: its first is aside
            inner = b""
        finally:
            if inner:
                os.unlink(inner, dir_fd=private.fd)
            private.close()
    except BaseException:
        relay.close()
        if not moved:
            _remove_if(directory, aside, server)
        raise
    return relay, relay_id


def _put_in_place(
    directory: _Directory,
    private: _Private,
    inner: bytes,
    server: tuple[int, int],
    address: Address,
) -> None:
    """Exchange the relay's file (in ``private``) with PATH; check what came out."""
    try:
        _exchange(private.fd, inner, directory.fd, directory.name)
    except OSError as exc:
        if exc.errno == errno.ENOENT:  # removed or moved away since we looked
            raise _changed(address) from None
        if exc.errno not in (errno.EINVAL, errno.ENOSYS):
            raise
        # No RENAME_EXCHANGE on this file system: check, then replace.
        if not _same(directory.lstat(), server):
            raise _changed(address) from None
        os.rename(inner, directory.name, src_dir_fd=private.fd, dst_dir_fd=directory.fd)
        os.link(directory.name, inner, src_dir_fd=directory.fd, dst_dir_fd=private.fd)
        return
    out = os.stat(inner, dir_fd=private.fd, follow_symlinks=False)
    if (out.st_dev, out.st_ino) != server:
        _exchange(private.fd, inner, directory.fd, directory.name)  # undo
        raise _changed(address)


def _changed(address: Address) -> SocketFileError:
    return SocketFileError(
        f"cannot tap {address}: it was replaced while we tapped it; nothing was changed, try again",
        errno=errno.EEXIST,
    )


def _cannot_link(address: Address, info: os.stat_result, exc: OSError) -> UdsError:
    if exc.errno == errno.EPERM:
        return SocketFileError(
            f"cannot tap {address}: it belongs to uid {info.st_uid}, and the kernel lets "
            "only its owner or root give it a second name (fs.protected_hardlinks); run the "
            "tap as that user or as root",
            errno=exc.errno,
        )
    if exc.errno in (errno.EACCES, errno.EROFS):
        return SocketFileError(
            f"cannot tap {address}: cannot add a name in {os.path.dirname(address.absolute().path)}"
            f" ({os.strerror(exc.errno).lower()}): the tap needs write permission on the "
            "socket's directory",
            errno=exc.errno,
        )
    return SocketFileError(
        f"cannot tap {address}: cannot move its socket aside: "
        f"{os.strerror(exc.errno or 0).lower()}",
        errno=exc.errno,
    )


def restore_displaced(target: str | os.PathLike[str] | bytes) -> str:
    """Put back a server's socket that a killed tap left at its tapped name; what was done.

    Refuses (udskit errors) when there is nothing to restore, or while a tap still runs.
    """
    address = Address.parse(target)
    if address.kind != "path":
        raise ValueError(f"cannot restore {address}: only a socket file can be tapped")
    directory = _Directory(address.absolute().raw)
    try:
        with translating("restore", address), _Lock(directory):
            return _restore_displaced(address, directory)
    finally:
        directory.close()


def _restore_displaced(address: Address, directory: _Directory) -> str:
    aside = tapped_name(directory.name)
    try:
        held = os.open(aside, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory.fd)
    except FileNotFoundError:
        raise SocketFileError(
            f"nothing to restore at {address}: no tapped socket ({os.fsdecode(aside)}) next to it",
            errno=errno.ENOENT,
        ) from None
    dead = -1
    try:
        server = os.fstat(held)
        if not stat.S_ISSOCK(server.st_mode):
            raise SocketFileError(
                f"cannot restore {address}: {os.fsdecode(aside)} is a "
                f"{kind_of(server.st_mode)}, not a socket; udskit leaves it alone",
                errno=errno.ENOTSOCK,
            )
        if server.st_uid not in (os.geteuid(), 0) and os.geteuid() != 0:
            # Another user's socket at the tapped name: not ours to put at the path (in a
            # directory others may write, anyone can make one there).
            raise SocketFileError(
                f"cannot restore {address}: {os.fsdecode(aside)} belongs to uid "
                f"{server.st_uid}, not this user; its owner (or root) may restore it",
                errno=errno.EPERM,
            )
        alive = probe(f"/proc/self/fd/{held}").live
        # The dead relay's socket is held until it is removed: its inode number cannot be
        # freed meanwhile and taken by a file another user makes, which would pass for it.
        dead = _open_held(directory, directory.name)
        at_path = os.fstat(dead) if dead >= 0 else None
        if at_path is None:
            _link_held(held, directory, directory.name)
            _remove_if(directory, aside, (server.st_dev, server.st_ino))
            return _restored(address, alive)
        if not stat.S_ISSOCK(at_path.st_mode):
            raise SocketFileError(
                f"cannot restore {address}: a {kind_of(at_path.st_mode)} is there now; udskit "
                "never replaces what is not a socket: move it away first",
                errno=errno.EEXIST,
            )
        if at_path.st_uid != server.st_uid:
            # A tap's relay has its server's owner: this socket was planted at the tapped
            # name (as root, anyone's passes the check above), and must not take the path.
            raise SocketFileError(
                f"cannot restore {address}: {os.fsdecode(aside)} belongs to uid "
                f"{server.st_uid} and {address} to uid {at_path.st_uid}, so no tap moved it "
                "aside; remove it as its owner, or as root (udskit never deletes what it did "
                "not create)",
                errno=errno.EPERM,
            )
        relay = probe(f"/proc/self/fd/{dead}")
        if relay.live:
            who = f" (pid {relay.cred.pid})" if relay.cred is not None else ""
            raise AddressInUse(
                f"cannot restore {address}: a live socket is there{who}: the tap still runs; "
                "stop it (Ctrl-C, or kill -TERM its pid) and it restores the server's socket "
                "itself",
                pid=relay.cred.pid if relay.cred is not None else None,
            )
        stale = (at_path.st_dev, at_path.st_ino)
        try:
            _swap_back(directory, aside, directory.name, (server.st_dev, server.st_ino))
        except FileNotFoundError:
            # A name was removed since we looked, by another user who may write to the
            # directory. The path: give it the socket we hold, as when nothing was there.
            if directory.lstat() is not None:
                raise SocketFileError(
                    f"cannot restore {address}: its server's socket was moved away from "
                    f"{os.path.join(directory.parent, os.fsdecode(aside))} while we restored "
                    "it; nothing was moved: find it or restart its server (another user can "
                    f"write to {directory.parent})",
                    errno=errno.ENOENT,
                ) from None
            _link_held(held, directory, directory.name)
            _remove_if(directory, aside, (server.st_dev, server.st_ino))
            return _restored(address, alive)
        _remove_if(directory, aside, stale)  # the dead relay's socket, if still that file
        return _restored(address, alive)
    finally:
        os.close(held)
        if dead >= 0:
            os.close(dead)


def _open_held(directory: _Directory, name: bytes) -> int:
    """An O_PATH descriptor of the file at ``name`` (a symlink itself, never followed), or
    -1 if there is none."""
    try:
        return os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory.fd)
    except FileNotFoundError:
        return -1


def _restored(address: Address, alive: bool) -> str:
    if alive:
        return f"restored {address}: its server answers there again"
    return f"restored {address}; its server is not running (the socket file is stale)"
