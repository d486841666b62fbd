"""Client endpoints for asyncio: ``connect()`` and ``pair()``.

The same steps as the blocking :mod:`udskit.connecting` (own reply path for datagram
clients, ``bind=``, ``expect_uid``, buffer sizes, descriptor adoption), with the one wait a
Unix connect can have made asynchronous: a listener whose backlog is full.
"""

from __future__ import annotations

import errno
import socket

from .. import connecting as blocking
from ..address import Address, AddressLike, sun_path
from ..creds import PeerCred, peer_cred, require_uid
from ..errors import ConnectError
from ..options import (
    check_client_shared_memory,
    check_shared_memory,
    connect_options,
    pair_options,
    tune_buffers,
)
from ..sockfile import Claim
from ..tcp import open_tcp
from ..translate import translating
from .buffers import check_write_limit
from .channel import Channel
from .waiting import RetryPause

__all__ = ["connect", "pair"]


async def connect(
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
    write_limit: int | None = None,
    shared_memory: bool | int = False,
) -> Channel:
    """Connect to ``address`` and return a Channel, as :func:`udskit.connect` does.

    ``timeout`` bounds the connect (a full backlog makes a Unix connect wait) and becomes
    the channel's send/recv timeout. ``bind``, ``expect_uid``, ``sndbuf``, ``rcvbuf``: as
    for :func:`udskit.connect`. ``write_limit``: the send queue's high-water mark.
    ``shared_memory``: as for :func:`udskit.connect` (docs/shared-memory.md).
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
    check_write_limit(write_limit)
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
        adopted = blocking._adopt(target, framing=framing, max_frame=max_frame, max_fds=max_fds)
        channel = Channel(
            adopted.socket,
            framing=framing,
            max_frame=max_frame,
            max_fds=max_fds,
            remote=target,
            peer=adopted.peer,
            write_limit=write_limit,
        )
    elif target.kind == "tcp":
        channel = await _connect_tcp(target, framing, max_frame, timeout, write_limit)
    else:
        channel = await _connect_unix(
            target,
            kind,
            own,
            expect_uid,
            (sndbuf, rcvbuf),
            framing=framing,
            max_frame=max_frame,
            max_fds=max_fds,
            timeout=timeout,
            write_limit=write_limit,
            shared_memory=pool,
        )
    channel.settimeout(timeout)
    return channel


async def _connect_unix(
    target: Address,
    kind: int,
    own: Address | None,
    expect_uid: int | None,
    buffers: tuple[int | None, int | None],
    *,
    framing: str,
    max_frame: int | None,
    max_fds: int,
    timeout: float | None,
    write_limit: int | None,
    shared_memory: int = 0,
) -> Channel:
    sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    reply: Claim | None = None
    reply_dir: bytes | None = None
    try:
        reply, reply_dir = blocking.name_client(sock, kind, own)
        if shared_memory:
            blocking.bind_marker(sock)
        tune_buffers(sock, *buffers)
        await connect_waiting(sock, target, timeout)
        peer: PeerCred | None = None
        if kind != socket.SOCK_DGRAM:
            peer = peer_cred(sock)
            if expect_uid is not None:
                require_uid(peer, expect_uid, target)
        return Channel(
            sock,
            framing=framing,
            max_frame=max_frame,
            max_fds=max_fds,
            remote=target,
            peer=peer,
            claim=reply,
            cleanup_dir=reply_dir,
            write_limit=write_limit,
            shared_memory=shared_memory,
        )
    except BaseException:  # CancelledError included: nothing may be left behind
        blocking.release_name(reply, reply_dir)
        sock.close()
        raise


async def connect_waiting(sock: socket.socket, target: Address, timeout: float | None) -> None:
    """connect(), retried while the listener's backlog is full.

    A non-blocking Unix connect never answers EINPROGRESS: it completes at once, or fails
    with EAGAIN when the backlog is full (where a blocking connect would sleep). No event
    tells us when a slot frees up, so we retry after growing pauses, until ``timeout``.
    """
    pause: RetryPause | None = None
    while True:
        try:
            with translating("connect", target, tried=sock.type), sun_path(target) as where:
                sock.connect(where)
            return
        except ConnectError as exc:
            if exc.errno != errno.EAGAIN:
                raise
        if pause is None:
            pause = RetryPause(timeout, "connect", target)
        await pause.pause()


async def _connect_tcp(
    target: Address,
    framing: str,
    max_frame: int | None,
    timeout: float | None,
    write_limit: int | None,
) -> Channel:
    """A TCP connection (for bridging), with the blocking API's errors."""
    with translating("connect", target):
        sock = await open_tcp(target, timeout)
    return Channel(
        sock,
        framing=framing,
        max_frame=max_frame,
        max_fds=0,
        remote=target,
        write_limit=write_limit,
    )


def pair(
    type: str = "stream",  # noqa: A002
    *,
    framing: str = "length",
    max_frame: int | None = None,
    max_fds: int = 16,
    sndbuf: int | None = None,
    rcvbuf: int | None = None,
    write_limit: int | None = None,
    shared_memory: bool | int = False,
) -> tuple[Channel, Channel]:
    """Two connected Channels (socketpair), as :func:`udskit.pair` makes.

    Needs no running loop: each channel joins the loop it is first used on, so a pair can be
    made before ``os.fork()`` (each process closes the end it does not use) and used by
    whichever loop each process runs. ``shared_memory``: both ends opt in (see
    :func:`udskit.pair`).
    """
    kind = pair_options(
        type=type,
        framing=framing,
        max_frame=max_frame,
        max_fds=max_fds,
        sndbuf=sndbuf,
        rcvbuf=rcvbuf,
    )
    check_write_limit(write_limit)
    pool = check_shared_memory(
        shared_memory, type=type, framing=framing, max_fds=max_fds, max_frame=max_frame
    )
    left, right = socket.socketpair(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
    ends = []
    try:
        for sock in (left, right):
            tune_buffers(sock, sndbuf, rcvbuf)
            # socketpair() records the creator's credentials for every type, dgram included.
            ends.append(
                Channel(
                    sock,
                    framing=framing,
                    max_frame=max_frame,
                    max_fds=max_fds,
                    peer=peer_cred(sock),
                    write_limit=write_limit,
                    shared_memory=pool,
                    peer_opted=True,
                )
            )
    except BaseException:
        left.close()
        right.close()
        raise
    return ends[0], ends[1]
