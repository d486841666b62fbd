"""The socket file's life: a safe claim before bind(), a safe release at close().

The tutorial way (``if os.path.exists(p): os.remove(p)`` then ``bind``) deletes a live
server's socket, deletes whatever else sits at the path, and leaves the file visible with
the umask's mode until a later chmod. Here, for a listener at PATH:

1. ``flock`` PATH.lock, so that claims and releases of one path never interleave;
2. if PATH exists and is not a socket: refuse (SocketFileError), never unlink;
3. if it is a socket, probe-connect: accepted (or backlog full) means a live owner:
   AddressInUse naming its pid and uid; refused means stale: remove it (below);
4. bind inside a private 0700 directory next to PATH, set mode and ownership there, then
   ``link()`` it to PATH: link never replaces an existing file, so a file that appeared
   despite the lock is never clobbered, and PATH is never visible with another mode;
5. on release, remove PATH only if it is still the file we bound, only in the process that
   bound it (a forked child closing its copy must not delete the parent's).

Another user who may write to the directory (a group-writable /run/app, or any directory
without the sticky bit) can rename, replace or plant a symlink at any name in it between
two of our system calls, and the lock binds only processes that take it. So no step acts on
a name that may have changed:

* removing a file (a stale socket, our socket at release, our lock file) where another
  user could swap it first renames it into a private directory only we can write, checks
  there that it is the very file we meant (st_dev, st_ino), and only then unlinks it;
  anything else is put back and left;
* the mode and owner are set through an ``O_PATH|O_NOFOLLOW`` descriptor of the bound file,
  checked to be the file our bind() created (:mod:`udskit.sockdiag`), with chmod/chown on
  ``/proc/self/fd/N``, which reach that inode whatever the name now points at;
* the private directories are used through descriptors and checked to be ours (a directory
  swapped in under their name is never entered);
* the lock file is created with ``O_EXCL`` and removed only if we created it.

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
import socket
import stat
import time
from dataclasses import dataclass
from typing import Final

from .address import MAX_DIRECT_PATH, Address
from .creds import PeerCred, peer_cred
from .errors import AddressError, AddressInUse, SocketFileError, Timeout, UdsError
from .sockdiag import bound_file
from .translate import RESOURCE_ADVICE, kind_of, translate, translating, unreachable_directory

__all__ = [
    "Claim",
    "Probe",
    "adopt",
    "claim",
    "is_bound_at",
    "probe",
    "resolve_owner",
    "tapped_name",
    "untapped_name",
]

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

#: Random names tried for a private directory before giving up: with 32 random bits a
#: second collision means someone is creating them on purpose.
_PRIVATE_ATTEMPTS: Final = 10


def _random_suffix() -> bytes:
    """32 random bits, as 8 hex digits: for a private directory, or a file moved aside."""
    return os.urandom(4).hex().encode()


#: The suffix of the name ``udskit tap`` gives a server's socket while its relay holds the
#: path: ``DIR/.NAME.udskit-tapped``, hidden and next to PATH, so that a claim, ``udskit ls``
#: and ``udskit doctor`` can map it back to PATH and say how to put it back.
TAPPED_SUFFIX: Final = b".udskit-tapped"

#: The socket types a probe tries, in order, until one is not EPROTOTYPE.
_PROBE_TYPES: Final = (socket.SOCK_STREAM, socket.SOCK_SEQPACKET, socket.SOCK_DGRAM)

#: What a failed claim says it could not do: a server listens on its path, a client binds
#: its own (for replies).
_LISTEN_ON: Final = "listen on"
_BIND_TO: Final = "bind to"


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


def tapped_name(name: bytes) -> bytes:
    """The name a tap gives the server's socket file ``name`` while it is tapped."""
    return b"." + name + TAPPED_SUFFIX


def untapped_name(name: bytes) -> bytes | None:
    """The socket name that ``name`` is the tapped name of, or None."""
    if (
        name.startswith(b".")
        and name.endswith(TAPPED_SUFFIX)
        and len(name) > 1 + len(TAPPED_SUFFIX)
    ):
        return name[1 : -len(TAPPED_SUFFIX)]
    return None


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
            shown = os.fsdecode(path)
            raise AddressError(
                f"socket path {shown} names a directory, not a file; give the socket's file "
                f"name too, e.g. {shown.rstrip('/')}/app.sock"
            )
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
            advice = RESOURCE_ADVICE.get(exc.errno or 0)
            raise SocketFileError(
                f"cannot create socket {os.fsdecode(path)}: cannot open directory {shown}: "
                f"{advice or os.strerror(exc.errno or 0).lower()}",
                errno=exc.errno,
            ) from exc

    @property
    def parent(self) -> str:
        """The directory, for messages."""
        return os.fsdecode(os.path.dirname(self.path) or b".")

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

    def lstat(self, name: bytes | None = None) -> os.stat_result | None:
        """What is at ``name`` (default: the socket's name), without following a symlink."""
        try:
            return os.stat(
                self.name if name is None else name, dir_fd=self.fd, follow_symlinks=False
            )
        except FileNotFoundError:
            return None

    def close(self) -> None:
        os.close(self.fd)


class _Lock:
    """flock() on NAME.lock in the directory, robust against the lock file being removed.

    Only a lock file we created (``O_EXCL``) is removed afterwards, and only if it is still
    that file: one that another user created stays where it is.
    """

    __slots__ = ("_created", "_directory", "_fd", "_name")

    def __init__(self, directory: _Directory) -> None:
        self._directory = directory
        self._name = directory.name + b".lock"
        self._fd = -1
        self._created = False

    def __enter__(self) -> _Lock:
        deadline = time.monotonic() + CLAIM_LOCK_TIMEOUT
        for _ in range(_LOCK_ATTEMPTS):
            fd, created = self._open()
            delay = 0.001
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        owner = os.fstat(fd).st_uid
                        os.close(fd)
                        whose = (
                            "" if owner == os.geteuid() else f" (its file belongs to uid {owner})"
                        )
                        raise Timeout(
                            f"another process has held the lock {self._shown()}{whose} for "
                            f"over {CLAIM_LOCK_TIMEOUT:.0f} s; is it stopped? (see: fuser "
                            f"{self._shown()})"
                        ) from None
                    time.sleep(delay)
                    delay = min(delay * 2, 0.05)
            current = self._directory.lstat(self._name)
            mine = os.fstat(fd)
            if current is not None and (current.st_dev, current.st_ino) == (
                mine.st_dev,
                mine.st_ino,
            ):
                self._fd, self._created = fd, created
                return self
            os.close(fd)  # the holder before us removed it: lock the new one
        raise Timeout(f"could not lock {self._shown()}: it is replaced faster than we can lock")

    def _open(self) -> tuple[int, bool]:
        """A descriptor of the lock file, and whether we created it."""
        for _ in range(_LOCK_ATTEMPTS):
            try:
                fd = os.open(
                    self._name,
                    os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                    0o600,
                    dir_fd=self._directory.fd,
                )
                return fd, True
            except FileExistsError:
                pass
            except OSError as exc:
                raise self._cannot(exc) from exc
            try:
                # Another claimant's lock file, or one another user put there: flock needs
                # no write access, O_NONBLOCK keeps a planted FIFO from hanging the open.
                fd = os.open(
                    self._name,
                    os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK,
                    dir_fd=self._directory.fd,
                )
            except FileNotFoundError:
                continue  # removed since: create it
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # what open() says of a socket file
                    raise self._not_a_lock_file(stat.S_IFSOCK) from exc
                if exc.errno != errno.EACCES:
                    raise self._cannot(exc) from exc
                owner = self._directory.lstat(self._name)
                raise SocketFileError(
                    f"cannot open the lock file {self._shown()}"
                    + (f" (it belongs to uid {owner.st_uid})" if owner is not None else "")
                    + ": permission denied; remove it as its owner, or choose another path",
                    errno=exc.errno,
                ) from exc
            kind = os.fstat(fd).st_mode
            if not stat.S_ISREG(kind):
                os.close(fd)
                raise self._not_a_lock_file(kind)
            return fd, False
        raise Timeout(f"could not lock {self._shown()}: it is replaced faster than we can lock")

    def _not_a_lock_file(self, kind: int) -> SocketFileError:
        return SocketFileError(
            f"cannot lock {self._shown()}: a {kind_of(kind)} is there, not a lock file; "
            "remove it (udskit never deletes what it did not create)",
            errno=errno.EEXIST,
        )

    def _cannot(self, exc: OSError) -> SocketFileError:
        if exc.errno == errno.ELOOP:
            reason = "a symlink is there (udskit never follows one at this path); remove it"
        elif exc.errno in RESOURCE_ADVICE:
            reason = RESOURCE_ADVICE[exc.errno]  # not a matter of permissions
        else:
            advice = _what_to_do(exc.errno, "need write permission on the directory")
            reason = f"{os.strerror(exc.errno or 0).lower()} ({advice})"
        return SocketFileError(
            f"cannot create lock file {self._shown()}: {reason}", errno=exc.errno
        )

    def _shown(self) -> str:
        return os.fsdecode(self._directory.path) + ".lock"

    def __exit__(self, *exc_info: object) -> None:
        fd, self._fd = self._fd, -1
        try:
            if self._created:
                mine = os.fstat(fd)
                _remove_if(self._directory, self._name, (mine.st_dev, mine.st_ino))
        except OSError as exc:
            log.debug("could not remove lock file %s: %s", self._shown(), exc)
        finally:
            os.close(fd)


class Claim:
    """Ownership of a socket file this process created. ``release()`` is idempotent.

    Release it before closing the socket: "same (st_dev, st_ino)" at release proves the
    file ours only while that inode cannot be freed and its number given to a new file,
    and the bound socket is what keeps it (another user who may write to the directory
    could remove the name, then make files until one got the number: ext4 hands out the
    lowest free one). Every owner in udskit does so; holding the file open instead would
    cost a descriptor more for each listener and each datagram client.
    """

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

    def disown(self) -> None:
        """Give up the removal of the file without removing it: another process now owns it.

        A listener handed over to another process, or kept in systemd's descriptor store
        across a restart, must stay at its path when this process closes its copy.
        """
        directory, self._directory = self._directory, None
        if directory is not None:
            directory.close()

    def release(self) -> None:
        """Unlink the socket file if it is still ours and we are the process that bound it
        (call it while the socket is still open: see the class)."""
        directory, self._directory = self._directory, None
        if directory is None:
            return
        try:
            if os.getpid() != self._owner_pid:
                return  # a forked child: the file belongs to the parent
            with _Lock(directory):
                other = _remove_if(directory, directory.name, self._dev_ino)
                if other is not None:
                    log.info("%s was replaced by another file; leaving it in place", self.address)
        except (OSError, UdsError) as exc:
            # A udskit error's text is already one line; a bare OSError's str() would
            # show the file name as a bytes repr.
            reason = exc if isinstance(exc, UdsError) else os.strerror(exc.errno or 0).lower()
            log.warning("could not remove socket file %s: %s", self.address, reason)
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
        # Every step below names its own failures; this catches what none foresaw, so that
        # no bare OSError (with a bytes file name in its repr) reaches the user.
        with translating("claim", address), _Lock(directory):
            _refuse_if_tapped(directory, address)
            _make_room(directory, address)
            if sock.type & ~(socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC) == socket.SOCK_DGRAM:
                dev_ino = _bind_in_place(sock, directory, address, mode, uid, gid)
            else:
                dev_ino = _bind_private(sock, directory, address, mode, uid, gid, backlog)
        return Claim(address, directory, dev_ino)
    except BaseException:
        directory.close()
        raise


def adopt(sock: socket.socket, address: Address) -> Claim:
    """Own the removal of the socket file at ``address`` that ``sock``, received from its
    first owner, is bound to: a listener taken over by handover or from systemd.

    The file at the path must be the very file the socket's bind() created (sock_diag; see
    :func:`_is_our_file`), so that a file another user put at the path is never adopted and
    later removed as ours.
    """
    path = address.absolute().raw
    directory = _Directory(path)
    try:
        with translating("adopt", address), _Lock(directory):
            found = _bound_file_at(sock, directory, address)
        return Claim(address, directory, (found.st_dev, found.st_ino))
    except BaseException:
        directory.close()
        raise


def is_bound_at(sock: socket.socket, address: Address) -> bool:
    """Whether the file at ``address`` now is the one ``sock`` (bound by another process) is
    bound to: a listener received from a process must be the one its path leads to."""
    directory = _Directory(address.absolute().raw)
    try:
        _bound_file_at(sock, directory, address)
    except SocketFileError:
        return False
    finally:
        directory.close()
    return True


def _bound_file_at(sock: socket.socket, directory: _Directory, address: Address) -> os.stat_result:
    """The file at the path if it is the one ``sock`` is bound to (another process bound it).

    Without sock_diag, the most ``stat`` can say is that it is a socket file.
    """
    found = directory.lstat()
    if found is not None:
        created = bound_file(sock)
        if created.matches(found) if created is not None else stat.S_ISSOCK(found.st_mode):
            return found
    what = "no file" if found is None else "another file"
    raise SocketFileError(
        f"cannot take over {address}: there is {what} at the path, not the socket this "
        "listener is bound to; start the server without taking over"
    )


def _refuse_if_tapped(directory: _Directory, address: Address) -> None:
    """Refuse PATH while a tap's displaced copy of its server's socket is alive next to it:
    a server started there would hide the real one for good once the tap restores it (or
    the restore would have to replace the new server's socket)."""
    aside = tapped_name(directory.name)
    try:
        held = os.open(aside, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory.fd)
    except OSError:
        return  # nothing there (or a name too long to have one): not tapped
    try:
        info = os.fstat(held)
        if not stat.S_ISSOCK(info.st_mode) or info.st_uid not in (os.geteuid(), 0):
            # Not a tap's (which keeps the server's socket, ours if we may claim its path):
            # another user's socket planted at the name must not keep us from the path.
            return
        found = probe(f"/proc/self/fd/{held}")
    finally:
        os.close(held)
    if not found.live:
        return
    owner = f" (pid {found.cred.pid}, uid {found.cred.uid})" if found.cred is not None else ""
    raise AddressInUse(
        f"cannot listen on {address}: its server{owner} is still running, its socket moved "
        f"aside to {os.fsdecode(aside)} by udskit tap; stop the tap, or if it was killed run "
        f"'udskit tap --restore {address}'",
        pid=found.cred.pid if found.cred is not None else None,
        uid=found.cred.uid if found.cred is not None else info.st_uid,
    )


def _make_room(directory: _Directory, address: Address, doing: str = _LISTEN_ON) -> None:
    """Leave PATH free, or raise: never unlink anything but a stale socket.

    The file at PATH is held open (O_PATH, not following a symlink) from the first look to
    its removal: the probe connects to that very file (through /proc/self/fd/N), and while
    we hold it its inode number cannot be reused, so "same (st_dev, st_ino)" at removal
    means "the file we probed", not a new file that took over a freed number.
    """
    try:
        held = os.open(
            directory.name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory.fd
        )
    except FileNotFoundError:
        return
    try:
        found = os.fstat(held)
        if not stat.S_ISSOCK(found.st_mode):
            raise SocketFileError(
                f"cannot {doing} {address}: a {kind_of(found.st_mode)} is in the way, and "
                "udskit never deletes what is not a socket; move it away or choose another path",
                errno=errno.EEXIST,
            )
        found_probe = probe(f"/proc/self/fd/{held}")
        if found_probe.live:
            _raise_in_use(address, found_probe, found.st_uid, doing)
        if found_probe.errno in (errno.EACCES, errno.EPERM):
            raise AddressInUse(
                f"cannot {doing} {address}: a socket owned by uid {found.st_uid} is there and "
                "we may not connect to it to see whether it is alive; stop its server or remove "
                "it as that user",
                uid=found.st_uid,
            )
        # Refused: a stale file. Remove it only if it is still the very file we probed.
        log.info("removing stale socket file %s (nothing was listening)", address)
        with translating("remove the stale socket", address):
            other = _remove_if(directory, directory.name, (found.st_dev, found.st_ino))
    finally:
        os.close(held)
    if other is not None:
        raise SocketFileError(
            f"cannot {doing} {address}: the stale socket there was replaced by a "
            f"{kind_of(other.st_mode)} (uid {other.st_uid}) while we removed it; it is left in "
            f"place: another user can write to {directory.parent}; make it writable only by "
            "the server's user, or choose another path",
            errno=errno.EEXIST,
        )


def _raise_in_use(
    address: Address, found: Probe, file_uid: int | None, doing: str = _LISTEN_ON
) -> None:
    if found.cred is not None:
        owner = f"pid {found.cred.pid} ({found.cred.process_name}), uid {found.cred.uid}"
        pid: int | None = found.cred.pid
        uid: int | None = found.cred.uid
    else:
        owner, pid, uid = f"uid {file_uid}", None, file_uid
    busy = " (its backlog is full)" if found.errno == errno.EAGAIN else ""
    raise AddressInUse(
        f"cannot {doing} {address}: a live server owns it{busy}: {owner}; stop it first, or "
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
    private = _Private(directory, address)
    inner = b""
    try:
        inner, dev_ino = bind_private(sock, directory, private, address, mode, uid, gid, backlog)
        try:
            os.link(inner, directory.name, src_dir_fd=private.fd, dst_dir_fd=directory.fd)
        except FileExistsError:
            # Someone ignored the lock and created the path since we looked.
            _make_room(directory, address)
            raise AddressInUse(
                f"cannot listen on {address}: another process created it while we claimed it; "
                "try again"
            ) from None
        except OSError as exc:
            raise translate(exc, "put the socket in place at", address) from exc
        return dev_ino
    finally:
        if inner:
            try:
                os.unlink(inner, dir_fd=private.fd)  # in our 0700 directory: nobody swaps it
            except OSError:
                pass
        private.close()


def bind_private(
    sock: socket.socket,
    directory: _Directory,
    private: _Private,
    address: Address,
    mode: int,
    uid: int,
    gid: int,
    backlog: int | None,
) -> tuple[bytes, tuple[int, int]]:
    """Bind ``sock`` inside ``private`` with its final mode and owner (and listening, unless
    ``backlog`` is None): the name it has there and the file's (st_dev, st_ino). The caller
    puts it into place (link for a claim, an exchange for a tap) and unlinks the inner name.
    """
    inner = directory.name
    full = b"%s/%s/%s" % (os.path.dirname(directory.path), private.name, inner)
    via = b"/proc/self/fd/%d/%s" % (private.fd, inner)
    if len(full) > MAX_DIRECT_PATH and len(via) > MAX_DIRECT_PATH:
        inner = b"s"
        via = b"/proc/self/fd/%d/s" % private.fd
    # By the full name (what /proc/net/unix and `udskit ls` show) only if it fits and no
    # other user can rename our private directory away and plant a symlink at its name
    # in between; else through the directory's descriptor, which no rename redirects.
    by_name = len(full) <= MAX_DIRECT_PATH and _others_cannot_swap(directory, os.fstat(private.fd))
    with translating("bind", address):
        sock.bind(full if by_name else via)
    try:
        dev_ino = _set_mode_and_owner(sock, private.fd, inner, address, mode, uid, gid)
        if backlog is not None:
            with translating("listen", address):
                sock.listen(backlog)  # live before it is visible: see claim()
    except BaseException:
        try:
            os.unlink(inner, dir_fd=private.fd)
        except OSError:
            pass
        raise
    return inner, dev_ino


def _bind_in_place(
    sock: socket.socket,
    directory: _Directory,
    address: Address,
    mode: int,
    uid: int,
    gid: int,
    doing: str = _LISTEN_ON,
) -> tuple[int, int]:
    """Bind at PATH itself (datagram servers, clients' own paths), never visible with more
    permission than ``mode``.

    A datagram carries its sender's bound name, and peers that check where a reply came
    from (socat's UNIX-SENDTO, clients comparing recvfrom()'s address with the server's
    path) drop replies from any other name: a datagram server cannot bind in a private
    directory and be linked into place like a listener. Instead the mode goes on the socket
    before bind(), since Linux creates the file with the socket inode's mode minus the
    umask (fchmod on the socket after bind() would change the socket's inode in sockfs,
    not the file): owner-only bits first when the owner or group is to change, so that
    until chown() has run nobody in the creating user's group gets in; then the full mode,
    through the verified descriptor of the file bind() created (_set_mode_and_owner).
    """
    os.fchmod(sock.fileno(), mode & 0o700 if uid != -1 or gid != -1 else mode)
    where = directory.sun_path(directory.name, directory.path)
    with translating("bind", address):
        sock.bind(where)
    try:
        return _set_mode_and_owner(
            sock, directory.fd, directory.name, address, mode, uid, gid, doing
        )
    except BaseException:
        _remove_bound(sock, directory)  # a claim that failed leaves nothing behind
        if where == directory.path:
            _remove_stray(sock, where)
        raise


def _remove_stray(sock: socket.socket, path: bytes) -> None:
    """Remove the file ``sock``'s bind() by name created where ``path`` led at that moment,
    if that was not our directory: another user who may write to a directory on the way
    can rename ours and put a symlink in its place (which bind follows), and the file our
    bind made there is ours to remove; only it is (sock_diag: without it, the best stat
    can say might be another of our sockets, in whatever directory the symlink names)."""
    if bound_file(sock) is None:
        return
    try:
        stray = _Directory(path)  # where the name leads now, as bind() resolved it
    except UdsError:
        return
    try:
        _remove_bound(sock, stray)
    finally:
        stray.close()


def _remove_bound(sock: socket.socket, directory: _Directory) -> None:
    """Remove the file ``sock``'s bind() created at the socket's name, if it is there."""
    try:
        fd = os.open(directory.name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory.fd)
    except OSError:
        return
    try:
        info = os.fstat(fd)
        if _is_our_file(sock, info):
            _remove_if(directory, directory.name, (info.st_dev, info.st_ino))
    except OSError as exc:
        log.debug("could not remove %s: %s", os.fsdecode(directory.path), exc)
    finally:
        os.close(fd)


def _set_mode_and_owner(
    sock: socket.socket,
    dir_fd: int,
    name: bytes,
    address: Address,
    mode: int,
    uid: int,
    gid: int,
    doing: str = _LISTEN_ON,
) -> tuple[int, int]:
    """chmod/chown the file ``sock``'s bind() created at ``name``; its (st_dev, st_ino).

    The name is opened without following a symlink (O_PATH works on a socket file, which
    cannot be opened for I/O), the descriptor checked to be our socket's file, and the
    changes made through ``/proc/self/fd/N``: chmod and chown follow that magic link to the
    very inode we hold, whatever has happened to the name since. An O_PATH descriptor
    refuses fchmod/fchown (EBADF), hence the /proc path.
    """
    try:
        # With O_PATH, O_NOFOLLOW opens a symlink itself (no ELOOP): fstat then says so.
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        fd = -1
    except OSError as exc:
        raise translate(exc, "open the new socket file", address) from exc
    try:
        info = os.fstat(fd) if fd >= 0 else None
        if info is None or not _is_our_file(sock, info):
            raise SocketFileError(
                f"cannot {doing} {address}: the socket file was moved or replaced while we "
                f"created it, so its mode and owner were not set and it is not ours to remove: "
                f"another user can write to {os.fsdecode(os.path.dirname(address.absolute().raw))}"
                " or a directory on the way to it; make those writable only by the server's "
                "user (or set their sticky bit), or choose another path",
                errno=errno.EEXIST,
            )
        via = f"/proc/self/fd/{fd}"
        if uid != -1 or gid != -1:
            with translating("chown", address):
                os.chown(via, uid, gid)
        with translating("chmod", address):
            os.chmod(via, mode)
        return (info.st_dev, info.st_ino)
    finally:
        if fd >= 0:
            os.close(fd)


def _is_our_file(sock: socket.socket, info: os.stat_result) -> bool:
    """Whether ``info`` describes the file ``sock``'s bind() created.

    sock_diag says exactly. Without it (see udskit.sockdiag), the best ``stat`` can say: a
    socket file owned by us with a single name. Another user cannot make such a file; what
    is left is another of our own sockets renamed in from the same directory, or (with
    fs.protected_hardlinks off) a hard link to one.
    """
    created = bound_file(sock)
    if created is not None:
        return created.matches(info)
    return stat.S_ISSOCK(info.st_mode) and info.st_uid == os.geteuid() and info.st_nlink == 1


#: The name a file gets inside our private directory while we check it before unlinking.
_ASIDE: Final = b"aside"


def _remove_if(
    directory: _Directory, name: bytes, dev_ino: tuple[int, int]
) -> os.stat_result | None:
    """Remove ``name`` if it is the file ``dev_ino``; else leave it and return its stat.

    The caller keeps that file open (a claim's bound socket, our lock file, a held stale
    socket), so no other file can carry its inode number meanwhile. Nothing when the name
    is gone.

    Where another user could rename or replace the file, checking and then unlinking by
    name would delete whatever they swapped in between the two calls: there the file is
    first renamed into a private directory only we can write, checked there, and unlinked
    or put back. Where nobody else can (_others_cannot_swap), check and unlink suffice.
    """
    found = directory.lstat(name)
    if found is None:
        return None
    if _others_cannot_swap(directory, found):
        if (found.st_dev, found.st_ino) != dev_ino:
            return found
        try:
            os.unlink(name, dir_fd=directory.fd)
        except FileNotFoundError:
            pass
        return None
    private = _Private(directory, directory.path)
    try:
        try:
            os.rename(name, _ASIDE, src_dir_fd=directory.fd, dst_dir_fd=private.fd)
        except FileNotFoundError:
            return None
        aside = os.stat(_ASIDE, dir_fd=private.fd, follow_symlinks=False)
        if (aside.st_dev, aside.st_ino) == dev_ino:
            os.unlink(_ASIDE, dir_fd=private.fd)
            return None
        _put_back(directory, private, name)
        return aside
    finally:
        private.close()


def _others_cannot_swap(directory: _Directory, found: os.stat_result) -> bool:
    """Whether no user but us (and root) can rename or replace ``found`` in the directory.

    True when only the directory's owner may write in it and that is us or root, or when
    the directory is sticky (/tmp), owned by us or root, and ``found`` is ours: then others
    may create entries, but not remove or rename ours. (Write access that a POSIX ACL
    grants another user shows in the group bits, which then hold the ACL mask.) Setting a
    file aside costs a directory created and removed: where it protects from nobody, it
    is skipped.
    """
    info = os.fstat(directory.fd)
    me = os.geteuid()
    if info.st_uid not in (me, 0):
        return False  # the directory's owner may rename anything in it
    if not info.st_mode & 0o022:
        return True
    return bool(info.st_mode & stat.S_ISVTX) and found.st_uid == me


def _put_back(directory: _Directory, private: _Private, name: bytes) -> None:
    """Return a file we set aside to ``name`` or, if something new took that name
    meanwhile, to ``NAME.kept-XXXXXXXX`` beside it: never replacing anything, and never
    leaving another user's file where they cannot reach it."""
    if _move_out(directory, private, name):
        return
    for _ in range(_PRIVATE_ATTEMPTS):
        kept = name + b".kept-" + _random_suffix()
        if _move_out(directory, private, kept):
            log.warning(
                "%s was replaced again while we looked at it; the file that was there is now %s",
                os.fsdecode(directory.path),
                os.fsdecode(os.path.join(os.path.dirname(directory.path), kept)),
            )
            return
    private.keep()
    log.warning(
        "%s was replaced again while we looked at it; the file that was there is kept at %s",
        os.fsdecode(directory.path),
        os.fsdecode(os.path.join(os.path.dirname(directory.path), private.name, _ASIDE)),
    )


def _move_out(directory: _Directory, private: _Private, target: bytes) -> bool:
    """Move the file set aside to ``target`` unless something is there; True if moved.

    link() never replaces; it fails for a directory, and (fs.protected_hardlinks) for
    another user's file unless we are root. Then rename() if the name is still free: the
    instant between that check and the rename is the one place a file could be replaced.
    """
    try:
        os.link(
            _ASIDE, target, src_dir_fd=private.fd, dst_dir_fd=directory.fd, follow_symlinks=False
        )
    except FileExistsError:
        return False
    except OSError:
        if directory.lstat(target) is not None:
            return False
        os.rename(_ASIDE, target, src_dir_fd=private.fd, dst_dir_fd=directory.fd)
        return True
    os.unlink(_ASIDE, dir_fd=private.fd)
    return True


class _Private:
    """A private 0700 directory next to PATH, used through a checked descriptor.

    Its name is unpredictable, but the parent directory may be writable by others, who can
    see the name and swap another directory (or a symlink) in under it: so it is opened
    without following symlinks and checked to be ours (our uid, no access for others)
    before anything goes in; from then on only the descriptor is used.
    """

    __slots__ = ("_directory", "_keep", "fd", "name")

    def __init__(self, directory: _Directory, address: Address | bytes) -> None:
        self._directory = directory
        self._keep = False
        self.name = _make_private_dir(directory, address)
        try:
            self.fd = os.open(
                self.name,
                os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                dir_fd=directory.fd,
            )
        except OSError as exc:
            raise self._replaced(address) from exc
        info = os.fstat(self.fd)
        if info.st_uid != os.geteuid() or info.st_mode & 0o077:
            os.close(self.fd)
            raise self._replaced(address)

    def _replaced(self, address: Address | bytes) -> SocketFileError:
        shown = address if isinstance(address, Address) else os.fsdecode(address)
        return SocketFileError(
            f"cannot use {shown}: the private directory we made next to it "
            f"({os.fsdecode(self.name)}) was replaced at once: another user can write to "
            f"{self._directory.parent}; make it writable only by the server's user (or set "
            "its sticky bit), or choose another path",
            errno=errno.EEXIST,
        )

    def keep(self) -> None:
        """Leave the directory in place (it holds a file we must not delete)."""
        self._keep = True

    def close(self) -> None:
        """Remove the directory if its name still leads to it (an empty directory another
        user renamed in under the name is left alone)."""
        try:
            if not self._keep:
                found = self._directory.lstat(self.name)
                mine = os.fstat(self.fd)
                if found is not None and (found.st_dev, found.st_ino) == (
                    mine.st_dev,
                    mine.st_ino,
                ):
                    os.rmdir(self.name, dir_fd=self._directory.fd)
        except OSError as exc:
            log.debug("could not remove %s: %s", os.fsdecode(self.name), exc)
        finally:
            os.close(self.fd)


def _make_private_dir(directory: _Directory, address: Address | bytes) -> bytes:
    shown = address if isinstance(address, Address) else os.fsdecode(address)
    for _ in range(_PRIVATE_ATTEMPTS):
        name = PRIVATE_PREFIX + _random_suffix()
        try:
            os.mkdir(name, 0o700, dir_fd=directory.fd)
            return name
        except FileExistsError:
            continue
        except OSError as exc:
            raise SocketFileError(
                f"cannot create socket {shown}: {os.strerror(exc.errno or 0).lower()} in its "
                f"directory ({_what_to_do(exc.errno, 'need write and search permission there')})",
                errno=exc.errno,
            ) from exc
    raise SocketFileError(
        f"cannot create a private directory next to {shown}: every name we tried was taken "
        f"({_PRIVATE_ATTEMPTS} tries); look for .udskit-* entries in {directory.parent}"
    )


def _what_to_do(code: int | None, otherwise: str) -> str:
    """The advice for a failure to create a file (lock file, private directory) in the
    socket's directory: a full file system is not fixed with permissions."""
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "its file system or the user's quota is full: free space or inodes there"
    return otherwise


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
        with translating("claim", address), _Lock(directory):
            _make_room(directory, address, _BIND_TO)
            dev_ino = _bind_in_place(sock, directory, address, mode, -1, -1, _BIND_TO)
        return Claim(address, directory, dev_ino)
    except BaseException:
        directory.close()
        raise
