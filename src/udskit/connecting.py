"""Client endpoints: ``connect()`` and ``pair()``."""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
import tempfile
import time
from typing import Final

from .address import Address, AddressLike, sun_path
from .channel import Channel
from .creds import peer_cred, require_uid
from .errors import SocketFileError, Timeout
from .options import (
    check_client_shared_memory,
    check_shared_memory,
    connect_options,
    pair_options,
    tune_buffers,
)
from .proto.shm import MARKER_PREFIX
from .sockfile import Claim, bind_reply_path
from .tcp import connect_tcp
from .translate import translate, translating

__all__ = ["connect", "pair"]

#: Name of a datagram client's own socket inside its private directory.
_REPLY_NAME = b"reply.sock"

#: Tries at a free opt-in name (see proto.shm.MARKER_PREFIX) before giving up: with 64
#: random bits a second try is already a curiosity.
_MARKER_TRIES: Final = 4


def connect(
    address: AddressLike,
    *,
    type: str = "stream",  # noqa: A002 - the natural name for the socket type
    framing: str = "length",
    max_frame: int | None = None,
    max_fds: int = 16,
    timeout: float | None = None,
    bind: AddressLike | None = None,
    expect_uid: int | None = None,
    sndbuf: int | None = None,
    rcvbuf: int | None = None,
    shared_memory: bool | int = False,
) -> Channel:
    """Connect to ``address`` and return a Channel.

    ``timeout`` bounds the connect (a server's full backlog is waited out that long, as a
    blocking connect waits; 0 does not wait) and becomes the channel's send/recv timeout.
    ``bind`` gives the client its own path first (S7). A datagram client always has one, so
    that the server can answer: without ``bind``, a private path in a fresh 0700 directory,
    removed on close. ``expect_uid`` refuses a server that does not run as that uid (PeerRejected).
    ``sndbuf``/``rcvbuf`` size the socket buffers (None: 1 MiB for streams, the kernel's
    default otherwise; 0: the kernel's default).
    ``shared_memory`` (True, or a pool size in bytes) opts in to moving large messages
    through shared memory, if the listener opted in too (docs/shared-memory.md); it needs
    a stream with length framing or seqpacket, and cannot be combined with ``bind``.
    """
    opts = connect_options(
        address,
        type=type,
        framing=framing,
        max_frame=max_frame,
        max_fds=max_fds,
        timeout=timeout,
        bind=bind,
        expect_uid=expect_uid,
        sndbuf=sndbuf,
        rcvbuf=rcvbuf,
    )
    target, kind, own = opts.target, opts.kind, opts.bind
    pool = check_client_shared_memory(
        shared_memory,
        type=type,
        framing=framing,
        max_fds=max_fds,
        max_frame=max_frame,
        address_kind=target.kind,
        binds=own is not None,
    )
    if target.kind == "fd":
        return _adopt(target, framing=framing, max_frame=max_frame, max_fds=max_fds)
    if target.kind == "tcp":
        return _connect_tcp(target, framing, max_frame, opts.timeout)
    sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
    reply: Claim | None = None
    reply_dir: bytes | None = None
    try:
        reply, reply_dir = name_client(sock, kind, own)
        if pool:
            bind_marker(sock)
        tune_buffers(sock, sndbuf, rcvbuf)
        sock.settimeout(timeout)
        with translating("connect", target, tried=kind), sun_path(target) as where:
            _connect_waiting(sock, where, timeout, target)
        if kind == socket.SOCK_DGRAM:
            peer = None
        else:
            peer = peer_cred(sock)
            if expect_uid is not None:
                require_uid(peer, expect_uid, target)
        channel = Channel(
            sock,
            framing=framing,
            max_frame=max_frame,
            max_fds=max_fds,
            remote=target,
            peer=peer,
            claim=reply,
            shared_memory=pool,
        )
    except BaseException:
        release_name(reply, reply_dir)
        sock.close()
        raise
    if reply_dir is not None:
        channel._adopt_reply_dir(reply_dir)
    return channel


def _connect_waiting(
    sock: socket.socket, where: str | bytes, timeout: float | None, target: Address
) -> None:
    """connect(2), waiting up to ``timeout`` while the listener's backlog is full.

    A socket with a timeout is non-blocking to the kernel, and a non-blocking Unix connect
    never waits: a full backlog fails it with EAGAIN at once, where a blocking connect
    sleeps until the server accepts (a burst of clients, a server at max_clients). So the
    connect is made blocking, bounded by SO_SNDTIMEO, which is the kernel's bound for
    exactly that sleep (net/unix/af_unix.c, unix_stream_connect: unix_wait_for_peer); it
    fails with EAGAIN once that has passed, which can be up to a clock tick before the
    deadline, so the deadline alone decides. A datagram connect never waits on a backlog.

    A signal whose handler returns ends that sleep with EINTR, and CPython then takes the
    connect for one in progress: it polls the socket, which an unconnected Unix socket
    answers at once (POLLHUP, no error), and reports success. So a connect is checked
    (getpeername) and made again, for what is left of the timeout, until it is one.
    """
    if timeout == 0 or sock.type == socket.SOCK_DGRAM:  # 0 must not wait
        sock.connect(where)
        return
    deadline = None if timeout is None else time.monotonic() + timeout
    full: BlockingIOError | None = None  # the kernel's last word on the backlog
    while True:
        if deadline is None:
            sock.connect(where)
        else:
            assert timeout is not None  # the deadline's
            left = deadline - time.monotonic()
            if left <= 0:
                raise _backlog_timeout(target, timeout) from full
            sock.settimeout(None)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(left))
            try:
                sock.connect(where)
            except BlockingIOError as exc:
                full = exc  # the kernel counts in clock ticks, may end one early: look again
                continue
            finally:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(0))
                sock.settimeout(timeout)
        try:
            sock.getpeername()
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise
            continue  # interrupted by a signal (see above): not connected, so again
        return


def _backlog_timeout(target: Address, timeout: float) -> Timeout:
    return Timeout(
        f"connect to {target} timed out: the server's backlog stayed full for "
        f"{timeout:g} s; it is not accepting fast enough"
    )


def _timeval(seconds: float) -> bytes:
    """A struct timeval of ``seconds`` (0: no bound), at least a microsecond otherwise."""
    micros = max(1, round(seconds * 1_000_000)) if seconds else 0
    return struct.pack("@ll", *divmod(micros, 1_000_000))


def bind_marker(sock: socket.socket) -> None:
    """Bind a client that opts in to shared memory to a fresh marker name (abstract: no
    file to clean up, gone with the socket)."""
    for _ in range(_MARKER_TRIES):
        name = MARKER_PREFIX + os.urandom(8).hex().encode()
        try:
            sock.bind(name)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise translate(exc, "bind", None) from exc
            continue
        return
    raise translate(OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE)), "bind", None)


def name_client(
    sock: socket.socket, kind: int, own: Address | None
) -> tuple[Claim | None, bytes | None]:
    """Give a Unix client socket, before it connects, the name its peer sees: ``own``
    (``bind=``) or, for a datagram client, which needs one for the server to answer, a
    private path in a fresh 0700 directory. Returns the claim of a path bound and the
    directory made, for :func:`release_name`; leaves nothing behind if it raises."""
    if kind == socket.SOCK_DGRAM:
        # Before bind: a reply that arrives earlier would carry no credentials.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    if own is not None:
        return _bind_own(sock, own), None
    if kind != socket.SOCK_DGRAM:
        return None, None
    reply_dir = tempfile.mkdtemp(prefix="udskit-", dir=_runtime_dir()).encode()
    try:
        claim = bind_reply_path(sock, Address("path", os.path.join(reply_dir, _REPLY_NAME)))
    except BaseException:
        os.rmdir(reply_dir)
        raise
    return claim, reply_dir


def release_name(claim: Claim | None, reply_dir: bytes | None) -> None:
    """Undo :func:`name_client` for a client that did not get connected: remove the path
    it bound (if still ours), then the directory made for it."""
    if claim is not None:
        claim.release()
    if reply_dir is not None:
        os.rmdir(reply_dir)


def _bind_own(sock: socket.socket, own: Address) -> Claim | None:
    if own.kind == "abstract":
        with translating("bind", own):
            sock.bind(own.sockaddr())
        return None
    return bind_reply_path(sock, own)


def _runtime_dir() -> str:
    """$XDG_RUNTIME_DIR (private to the user, on tmpfs) when usable, else the temp dir.

    Usable means ours and closed to others, as the XDG spec requires: after ``su`` (or
    ``sudo -E``) it is still the user's, who could rename our reply directory in it and put
    one of theirs in its place, to read the server's replies."""
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    try:
        info = os.stat(runtime) if runtime else None
    except OSError:
        info = None
    if (
        info is not None
        and stat.S_ISDIR(info.st_mode)
        and info.st_uid == os.geteuid()
        and not info.st_mode & 0o022
        and os.access(runtime, os.W_OK | os.X_OK)
    ):
        return runtime
    return tempfile.gettempdir()


def _connect_tcp(
    target: Address, framing: str, max_frame: int | None, timeout: float | None
) -> Channel:
    with translating("connect", target):
        sock = connect_tcp(target, timeout)
    return Channel(sock, framing=framing, max_frame=max_frame, max_fds=0, remote=target)


def _adopt(target: Address, *, framing: str, max_frame: int | None, max_fds: int) -> Channel:
    """A Channel over an inherited connected descriptor (``fd:N``, e.g. from ``udskit pair``)."""
    try:
        sock = socket.socket(fileno=target.fd)
    except OSError as exc:
        raise SocketFileError(
            f"{target}: descriptor {target.fd} is not an open socket "
            f"({os.strerror(exc.errno or 0).lower()}); check what the parent process passed",
            errno=exc.errno,
        ) from exc
    try:
        sock.setblocking(True)
        _check_connected(sock, target)
        peer = peer_cred(sock) if sock.family == socket.AF_UNIX else None
    except SocketFileError:
        sock.detach()
        raise
    except OSError as exc:
        sock.detach()
        raise translate(exc, "connect", target) from exc
    return Channel(
        sock, framing=framing, max_frame=max_frame, max_fds=max_fds, remote=target, peer=peer
    )


def _check_connected(sock: socket.socket, target: Address) -> None:
    """An inherited descriptor must be connected: a send on a listening or unconnected
    socket fails with ENOTCONN (EDESTADDRREQ for a datagram), which reads as a peer gone."""
    try:
        sock.getpeername()
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        state = "a listening socket" if listening else "a socket that is not connected"
        raise SocketFileError(
            f"{target}: descriptor {target.fd} is {state}; pass a connected socket (one end "
            "of a socket pair, or a connection to the server)",
            errno=errno.ENOTCONN,
        ) from None


def pair(
    type: str = "stream",  # noqa: A002
    *,
    framing: str = "length",
    max_frame: int | None = None,
    max_fds: int = 16,
    sndbuf: int | None = None,
    rcvbuf: int | None = None,
    shared_memory: bool | int = False,
) -> tuple[Channel, Channel]:
    """Two connected Channels (socketpair). Works across ``os.fork()`` (each side closes the
    end it does not use) and ``multiprocessing`` (pass one end to the child process).
    ``shared_memory`` (True, or a pool size in bytes) opts both ends in to moving large
    messages through shared memory (docs/shared-memory.md)."""
    kind = pair_options(
        type=type,
        framing=framing,
        max_frame=max_frame,
        max_fds=max_fds,
        sndbuf=sndbuf,
        rcvbuf=rcvbuf,
    )
    pool = check_shared_memory(
        shared_memory, type=type, framing=framing, max_fds=max_fds, max_frame=max_frame
    )
    left, right = socket.socketpair(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
    ends = []
    for sock in (left, right):
        tune_buffers(sock, sndbuf, rcvbuf)
        # socketpair() records the creator's credentials for every type, dgram included.
        peer = peer_cred(sock)
        ends.append(
            Channel(
                sock,
                framing=framing,
                max_frame=max_frame,
                max_fds=max_fds,
                peer=peer,
                shared_memory=pool,
                peer_opted=True,
            )
        )
    return ends[0], ends[1]
