"""The socket file's life: a safe claim before bind(), a safe release at close().

The tutorial way (``if os.path.exists(p): os.remove(p)`` then ``bind``) deletes a live
server's socket, deletes whatever else sits at the path, and leaves the file visible with
the umask's mode until a later chmod. Here, for a listener at PATH:

1. ``flock`` PATH.lock, so that claims and releases of one path never interleave;
2. if PATH exists and is not a socket: refuse (SocketFileError), never unlink;
3. if it is a socket, probe-connect: accepted (or backlog full) means a live owner:
   AddressInUse naming its pid and uid; refused means stale: unlink it;
4. bind inside a private 0700 directory next to PATH, set mode and ownership there, then
   ``link()`` it to PATH: link never replaces an existing file, so a file that appeared
   despite the lock is never clobbered, and PATH is never visible with another mode;
5. on release, unlink PATH only if (st_dev, st_ino) are still the ones we bound, only in the
   process that bound it (a forked child closing its copy must not delete the parent's).

The lock file is removed after each claim and release; a waiter that locked a removed lock
file notices (its inode no longer matches the path) and retries on the new one.

Paths longer than sun_path work throughout: every step goes through an O_PATH descriptor of
the directory, and bind/connect use ``/proc/self/fd/N/NAME``.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import secrets
import socket
import stat
import time
from dataclasses import dataclass
from typing import Final

from .address import MAX_DIRECT_PATH, Address
from .creds import PeerCred, peer_cred
from .errors import AddressError, AddressInUse, SocketFileError, Timeout
from .translate import kind_of, translating, unreachable_directory

__all__ = ["Claim", "Probe", "claim", "probe", "resolve_owner"]

log = logging.getLogger("udskit")

#: How long a claim waits for another process's claim or release of the same path. Both
#: hold the lock for a few system calls; a holder that takes longer is stuck (stopped or
#: swapped out), and we say so instead of hanging.
CLAIM_LOCK_TIMEOUT: Final = 10.0

#: Attempts at locking a lock file that keeps being replaced under us before giving up.
_LOCK_ATTEMPTS: Final = 50

#: The private directory's name: recognisable, so ``udskit ls`` can map a listener's bound
#: name (``DIR/.udskit-XXXX/NAME``, what /proc/net/unix shows) back to ``DIR/NAME``.
PRIVATE_PREFIX: Final = b".udskit-"

#: The socket types a probe tries, in order, until one is not EPROTOTYPE.
_PROBE_TYPES: Final = (socket.SOCK_STREAM, socket.SOCK_SEQPACKET, socket.SOCK_DGRAM)


@dataclass(frozen=True, slots=True)
class Probe:
    """What a probe-connect found at a socket file."""

    live: bool
    cred: PeerCred | None = None  # the owner, where the kernel told us
    errno: int = 0


def probe(target: str | bytes) -> Probe:
    """Try to connect to ``target`` (a sun_path) with each socket type; never blocks."""
    code = errno.EPROTOTYPE
    for kind in _PROBE_TYPES:
        with socket.socket(socket.AF_UNIX, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC) as s:
            code = s.connect_ex(target)
            # EPROTOTYPE: a socket file of another type. ECONNREFUSED: stale, or (abstract
            # names are looked up per type) no socket of *this* type: try the next type.
            if code in (errno.EPROTOTYPE, errno.ECONNREFUSED):
                continue
            if code == 0:
                cred = peer_cred(s) if kind != socket.SOCK_DGRAM else None
                return Probe(True, cred if cred is None or cred.pid > 0 else None)
            # EAGAIN: the listener's backlog is full; it is alive, just busy.
            return Probe(code == errno.EAGAIN, None, code)
    return Probe(False, None, code)


def resolve_owner(target: str | bytes, file_uid: int | None) -> str:
    """'pid 123, uid 1000' for messages, from a probe or, failing that, the file's owner."""
    found = probe(target)
    if found.cred is not None:
        return f"pid {found.cred.pid}, uid {found.cred.uid}"
    return f"uid {file_uid}" if file_uid is not None else "an unknown process"


class _Directory:
    """An O_PATH descriptor of a socket file's directory, and the file's name in it."""

    __slots__ = ("fd", "name", "path")

    def __init__(self, path: bytes) -> None:
        self.path = path
        directory, self.name = os.path.split(path)
        if not self.name:
            raise AddressError(f"socket path {os.fsdecode(path)} names a directory, not a file")
        try:
            self.fd = os.open(directory or b".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            shown = os.fsdecode(directory)
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                raise SocketFileError(
                    f"cannot create socket {os.fsdecode(path)}: "
                    f"{unreachable_directory(directory or b'.', create=True)}",
                    errno=exc.errno,
                ) from exc
            raise SocketFileError(
                f"cannot create socket {os.fsdecode(path)}: cannot open directory {shown}: "
                f"{os.strerror(exc.errno or 0).lower()}",
                errno=exc.errno,
            ) from exc

    def sun_path(self, name: bytes, full: bytes) -> bytes:
        """``full`` if it fits sun_path, else the same file through our descriptor."""
        if len(full) <= MAX_DIRECT_PATH:
            return full
        via = b"/proc/self/fd/%d/%s" % (self.fd, name)
        if len(via) > MAX_DIRECT_PATH:
            raise AddressError(
                f"socket path {os.fsdecode(full)} is {len(full)} bytes; sun_path holds "
                f"{MAX_DIRECT_PATH}, and its file name alone ({len(name)} bytes) is too long "
                "to reach through its directory: use a shorter file name"
            )
        return via

    def lstat(self) -> os.stat_result | None:
        try:
            return os.stat(self.name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def close(self) -> None:
        os.close(self.fd)


class _Lock:
    """flock() on NAME.lock in the directory, robust against the lock file being removed."""

    __slots__ = ("_directory", "_fd", "_name")

    def __init__(self, directory: _Directory) -> None:
        self._directory = directory
        self._name = directory.name + b".lock"
        self._fd = -1

    def __enter__(self) -> _Lock:
        deadline = time.monotonic() + CLAIM_LOCK_TIMEOUT
        delay = 0.001
        for _ in range(_LOCK_ATTEMPTS):
            fd = self._open()
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        os.close(fd)
                        raise Timeout(
                            f"another process has held the lock {self._shown()} for over "
                            f"{CLAIM_LOCK_TIMEOUT:.0f} s; is it stopped? (see: fuser "
                            f"{self._shown()})"
                        ) from None
                    time.sleep(delay)
                    delay = min(delay * 2, 0.05)
            try:
                current = os.stat(self._name, dir_fd=self._directory.fd, follow_symlinks=False)
            except FileNotFoundError:
                current = None
            mine = os.fstat(fd)
            if current is not None and (current.st_dev, current.st_ino) == (
                mine.st_dev,
                mine.st_ino,
            ):
                self._fd = fd
                return self
            os.close(fd)  # the holder before us removed it: lock the new one
        raise Timeout(f"could not lock {self._shown()}: it is replaced faster than we can lock")

    def _open(self) -> int:
        try:
            return os.open(
                self._name,
                os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                0o600,
                dir_fd=self._directory.fd,
            )
        except OSError as exc:
            raise SocketFileError(
                f"cannot create lock file {self._shown()}: {os.strerror(exc.errno or 0).lower()}"
                " (need write permission on the directory)",
                errno=exc.errno,
            ) from exc

    def _shown(self) -> str:
        return os.fsdecode(self._directory.path) + ".lock"

    def __exit__(self, *exc_info: object) -> None:
        try:
            os.unlink(self._name, dir_fd=self._directory.fd)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = -1


class Claim:
    """Ownership of a socket file this process created. ``release()`` is idempotent."""

    __slots__ = ("_dev_ino", "_directory", "_owner_pid", "address")

    def __init__(self, address: Address, directory: _Directory, dev_ino: tuple[int, int]) -> None:
        self.address = address
        self._directory: _Directory | None = directory
        self._dev_ino = dev_ino
        self._owner_pid = os.getpid()

    @property
    def sun_path(self) -> bytes:
        """How to reach the socket (through our directory descriptor for long paths)."""
        assert self._directory is not None, "claim already released"
        return self._directory.sun_path(self._directory.name, self._directory.path)

    def still_ours(self) -> bool:
        """True while the file at the path is the one we bound."""
        if self._directory is None:
            return False
        found = self._directory.lstat()
        return found is not None and (found.st_dev, found.st_ino) == self._dev_ino

    def release(self) -> None:
        """Unlink the socket file if it is still ours and we are the process that bound it."""
        directory, self._directory = self._directory, None
        if directory is None:
            return
        try:
            if os.getpid() != self._owner_pid:
                return  # a forked child: the file belongs to the parent
            with _Lock(directory):
                found = directory.lstat()
                if found is not None and (found.st_dev, found.st_ino) == self._dev_ino:
                    os.unlink(directory.name, dir_fd=directory.fd)
                elif found is not None:
                    log.info("%s was replaced by another file; leaving it in place", self.address)
        except (OSError, Timeout) as exc:
            log.warning("could not remove socket file %s: %s", self.address, exc)
        finally:
            directory.close()


def claim(
    sock: socket.socket,
    address: Address,
    *,
    mode: int = 0o600,
    uid: int = -1,
    gid: int = -1,
    backlog: int = 128,
) -> Claim:
    """Bind ``sock`` (unbound, AF_UNIX) to the path of ``address`` safely; see module doc.

    A stream or seqpacket socket is also put into the listening state (``backlog``) before
    it appears at the path: a bound socket that is not yet listening refuses connections,
    and the next claimant's probe would take it for a stale file and unlink it.
    """
    path = address.absolute().raw
    directory = _Directory(path)
    try:
        # A name no client can reach (too long even through /proc/self/fd) is an error
        # here, not a listener that every connect() later fails to find.
        directory.sun_path(directory.name, path)
        with _Lock(directory):
            _make_room(directory, address)
            if sock.type & ~(socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC) == socket.SOCK_DGRAM:
                dev_ino = _bind_in_place(sock, directory, address, mode, uid, gid)
            else:
                dev_ino = _bind_private(sock, directory, address, mode, uid, gid, backlog)
        return Claim(address, directory, dev_ino)
    except BaseException:
        directory.close()
        raise


def _make_room(directory: _Directory, address: Address) -> None:
    """Leave PATH free, or raise: never unlink anything but a stale socket."""
    found = directory.lstat()
    if found is None:
        return
    if not stat.S_ISSOCK(found.st_mode):
        raise SocketFileError(
            f"cannot listen on {address}: a {kind_of(found.st_mode)} is in the way, and udskit "
            "never deletes what is not a socket; move it away or choose another path",
            errno=errno.EEXIST,
        )
    target = directory.sun_path(directory.name, directory.path)
    found_probe = probe(target)
    if found_probe.live:
        _raise_in_use(address, found_probe, found.st_uid)
    if found_probe.errno in (errno.EACCES, errno.EPERM):
        raise AddressInUse(
            f"cannot listen on {address}: a socket owned by uid {found.st_uid} is there and we "
            "may not connect to it to see whether it is alive; stop its server or remove it "
            "as that user",
            uid=found.st_uid,
        )
    # Refused: a stale file. Unlink it only if it is still the very file we probed.
    again = directory.lstat()
    if again is not None and (again.st_dev, again.st_ino) == (found.st_dev, found.st_ino):
        log.info("removing stale socket file %s (nothing was listening)", address)
        os.unlink(directory.name, dir_fd=directory.fd)


def _raise_in_use(address: Address, found: Probe, file_uid: int | None) -> None:
    if found.cred is not None:
        owner = f"pid {found.cred.pid} ({found.cred.process_name}), uid {found.cred.uid}"
        pid: int | None = found.cred.pid
        uid: int | None = found.cred.uid
    else:
        owner, pid, uid = f"uid {file_uid}", None, file_uid
    busy = " (its backlog is full)" if found.errno == errno.EAGAIN else ""
    raise AddressInUse(
        f"cannot listen on {address}: a live server owns it{busy}: {owner}; stop it first, or "
        "choose another path",
        pid=pid,
        uid=uid,
    )


def _bind_private(
    sock: socket.socket,
    directory: _Directory,
    address: Address,
    mode: int,
    uid: int,
    gid: int,
    backlog: int,
) -> tuple[int, int]:
    """Bind in a private directory, set mode and owner there, link into place."""
    private = _make_private_dir(directory, address)
    private_fd = os.open(private, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=directory.fd)
    inner = directory.name
    bound = False
    try:
        full = b"%s/%s/%s" % (os.path.dirname(directory.path), private, inner)
        via = b"/proc/self/fd/%d/%s" % (private_fd, inner)
        if len(full) > MAX_DIRECT_PATH and len(via) > MAX_DIRECT_PATH:
            inner = b"s"
            via = b"/proc/self/fd/%d/s" % private_fd
        with translating("bind", address):
            sock.bind(full if len(full) <= MAX_DIRECT_PATH else via)
        bound = True
        os.chmod(inner, mode, dir_fd=private_fd)
        if uid != -1 or gid != -1:
            os.chown(inner, uid, gid, dir_fd=private_fd)
        info = os.stat(inner, dir_fd=private_fd, follow_symlinks=False)
        with translating("listen", address):
            sock.listen(backlog)  # live before it is visible: see claim()
        try:
            os.link(inner, directory.name, src_dir_fd=private_fd, dst_dir_fd=directory.fd)
        except FileExistsError:
            # Someone ignored the lock and created the path since we looked.
            _make_room(directory, address)
            raise AddressInUse(
                f"cannot listen on {address}: another process created it while we claimed it; "
                "try again"
            ) from None
        return (info.st_dev, info.st_ino)
    finally:
        if bound:
            try:
                os.unlink(inner, dir_fd=private_fd)
            except OSError:
                pass
        os.close(private_fd)
        os.rmdir(private, dir_fd=directory.fd)


def _bind_in_place(
    sock: socket.socket, directory: _Directory, address: Address, mode: int, uid: int, gid: int
) -> tuple[int, int]:
    """Bind at PATH itself (datagram servers, clients' own paths), never visible with more
    permission than ``mode``.

    A datagram carries its sender's bound name, and peers that check where a reply came
    from (socat's UNIX-SENDTO, clients comparing recvfrom()'s address with the server's
    path) drop replies from any other name: a datagram server cannot bind in a private
    directory and be linked into place like a listener. Instead the mode goes on the socket
    before bind(), since Linux creates the file with the socket inode's mode minus the
    umask; owner-only bits first, so that until chown() has run nobody in the creating
    user's group gets in; then the full mode.
    """
    os.fchmod(sock.fileno(), mode & 0o700)
    with translating("bind", address):
        sock.bind(directory.sun_path(directory.name, directory.path))
    os.chmod(directory.name, mode & 0o700, dir_fd=directory.fd)
    if uid != -1 or gid != -1:
        os.chown(directory.name, uid, gid, dir_fd=directory.fd)
    os.chmod(directory.name, mode, dir_fd=directory.fd)
    info = os.stat(directory.name, dir_fd=directory.fd, follow_symlinks=False)
    return (info.st_dev, info.st_ino)


def _make_private_dir(directory: _Directory, address: Address) -> bytes:
    for _ in range(10):
        name = PRIVATE_PREFIX + secrets.token_hex(4).encode()
        try:
            os.mkdir(name, 0o700, dir_fd=directory.fd)
            return name
        except FileExistsError:
            continue
        except OSError as exc:
            raise SocketFileError(
                f"cannot create socket {address}: {os.strerror(exc.errno or 0).lower()} in its "
                "directory (need write and search permission there)",
                errno=exc.errno,
            ) from exc
    raise SocketFileError(f"cannot create a private directory next to {address}")


def bind_reply_path(sock: socket.socket, address: Address, mode: int = 0o600) -> Claim:
    """Bind a client's own path (datagram replies, S7) under its real name.

    Peers answer the name getsockname() reports, so a client binds in place, like a
    datagram server (see _bind_in_place), never visible with more permission than ``mode``.
    """
    path = address.absolute().raw
    if len(path) > MAX_DIRECT_PATH and sock.type == socket.SOCK_DGRAM:
        # Bound through /proc/self/fd/N, the name peers would answer means another
        # descriptor (or nothing) in *their* process: replies would go astray.
        raise AddressError(
            f"cannot bind datagram reply path {address}: it is {len(path)} bytes and sun_path "
            f"holds {MAX_DIRECT_PATH}; peers answer the name the kernel reports, so it must "
            "fit: use a shorter path"
        )
    directory = _Directory(path)
    try:
        with _Lock(directory):
            _make_room(directory, address)
            dev_ino = _bind_in_place(sock, directory, address, mode, -1, -1)
        return Claim(address, directory, dev_ino)
    except BaseException:
        directory.close()
        raise
