"""Listening endpoints for asyncio: ``listen()``, ``Listener`` and ``DatagramListener``.

``listen()`` is the blocking :func:`udskit.listen` (same options, same validation, same safe
claim of the socket file, same errors) with the socket handed to the event loop. The access
policy is enforced at accept, or per datagram, before anyone sees the peer.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Final, Generic, Literal, TypeVar, overload

from .. import listening as blocking
from ..accepting import AcceptVerdict, classify
from ..address import Address, AddressLike, sun_path
from ..admission import Admitted, admit, sender_address
from ..ancillary import (
    RECV_FLAGS,
    ControlDataError,
    ancillary_size,
    close_fds,
    descriptors,
    rights,
    unpack,
)
from ..creds import Policy
from ..errors import ConnectionClosed, ProtocolError
from ..handover import Upgrader
from ..listening import Datagram
from ..options import (
    DEFAULT_BACKLOG,
    SocketType,
    check_message,
    check_timeout,
    max_frame_for,
)
from ..shm import offered
from ..translate import translate, translating
from .buffers import FDS_AHEAD, READ_AHEAD, check_write_limit, scratch
from .channel import Buffer, Channel
from .waiting import EXPIRED, RetryPause, Waiters

__all__ = ["DatagramListener", "Listener", "listen"]

_Item = TypeVar("_Item")
_Self = TypeVar("_Self", bound="_Endpoint[Any]")

log = logging.getLogger("udskit")

#: Datagrams received but not yet taken before the listener stops reading (besides
#: READ_AHEAD bytes): the kernel's queue holds the rest, and senders feel the backpressure.
_DATAGRAMS_AHEAD: Final = 256

_CTRUNC: Final = int(socket.MSG_CTRUNC)
_TRUNC: Final = int(socket.MSG_TRUNC)
_SEND_FLAGS: Final = int(socket.MSG_NOSIGNAL)


class _Endpoint(Generic[_Item]):
    """What both listener kinds share: the blocking endpoint (socket, claim, policy), the
    loop, waiting for readiness with a timeout, closing, iteration, context management."""

    __slots__ = ("_inner", "_loop", "_reading", "_receiving", "_timeout", "_waiters")

    def __init__(self, inner: blocking.Listener | blocking.DatagramListener) -> None:
        self._inner = inner
        inner.socket.setblocking(False)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading = False
        self._receiving = True  # False: stop_receiving() was called (datagrams)
        self._timeout: float | None = None
        self._waiters = Waiters("receive")

    @property
    def address(self) -> Address:
        return self._inner.address

    @property
    def policy(self) -> Policy | None:
        return self._inner.policy

    @property
    def type(self) -> SocketType:
        return self._inner.type

    @property
    def closed(self) -> bool:
        return self._inner.closed

    @property
    def upgrader(self) -> Upgrader | None:
        """The :class:`udskit.Upgrader` of a listener made with ``handover=True``."""
        return self._inner.upgrader

    async def _next(self) -> _Item:
        raise NotImplementedError

    def __aiter__(self: _Self) -> _Self:
        return self

    async def __anext__(self) -> _Item:
        """The next client or datagram; iteration ends when the listener is closed."""
        try:
            return await self._next()
        except ConnectionClosed:
            if self.closed or not self._receiving:
                raise StopAsyncIteration from None
            raise

    async def __aenter__(self: _Self) -> _Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def socket(self) -> socket.socket:
        """The listening socket (non-blocking), for socket options."""
        return self._inner.socket

    def fileno(self) -> int:
        return self._inner.fileno()

    def settimeout(self, timeout: float | None) -> None:
        """Seconds accept()/recv() wait before raising ``Timeout`` (None: forever)."""
        self._timeout = check_timeout(timeout)

    def remove_file(self) -> None:
        """Remove the socket file now (only if it is still ours), as
        :meth:`udskit.Listener.remove_file` does; the socket stays open until ``close()``."""
        self._inner.remove_file()

    def disown(self) -> None:
        """Give up the removal of the socket file, as :meth:`udskit.Listener.disown` does:
        for a listener that another process (systemd's descriptor store) keeps open."""
        self._inner.disown()

    def close(self) -> None:
        """Stop listening and remove the socket file (only if it is still ours). Tasks
        waiting in accept()/recv() get ConnectionClosed."""
        if self._inner.closed:
            return
        self._stop_reading()
        self._inner.close()
        self._waiters.wake_all()

    async def aclose(self) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<aio.{type(self).__name__} {self._inner!r}>"

    def _check_open(self) -> None:
        if self._inner.closed:
            raise ConnectionClosed(f"listener on {self.address} is closed")

    async def _wait_readable(self, op: str) -> None:
        """Wait until the socket is readable (or the timeout passed: Timeout)."""
        self._check_open()
        loop = asyncio.get_running_loop()
        if self._reading and self._loop is not loop:
            if self._loop is not None and not self._loop.is_closed():
                raise RuntimeError(
                    f"{self!r} is in use by another event loop; a listener belongs to one "
                    "loop at a time"
                )
            self._reading = False  # that loop closed, and its registrations with it
        if not self._reading:
            self._loop = loop
            loop.add_reader(self._inner.fileno(), self._on_readable)
            self._reading = True
        if await self._waiters.wait(loop, self._timeout) is EXPIRED:
            with translating(op, self.address):
                raise TimeoutError
        self._check_open()

    def _on_readable(self) -> None:
        if self._waiters:
            self._waiters.wake_all()
        else:
            self._stop_reading()  # nobody is waiting: the kernel queues meanwhile

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            loop = self._loop
            if loop is not None and not loop.is_closed():
                loop.remove_reader(self._inner.fileno())


class Listener(_Endpoint[Channel]):
    """A listening stream or seqpacket socket: ``await accept()`` returns a Channel per
    client the policy allows. ``async for channel in listener`` accepts until closed."""

    __slots__ = ("_options",)

    def __init__(
        self,
        inner: blocking.Listener,
        *,
        framing: str,
        max_frame: int | None,
        max_fds: int,
        sndbuf: int | None,
        rcvbuf: int | None,
        write_limit: int | None,
    ) -> None:
        super().__init__(inner)
        self._options = (framing, max_frame, max_fds, sndbuf, rcvbuf, write_limit)

    async def accept(self) -> Channel:
        """Wait for the next client the policy allows; refused peers are closed and logged."""
        while True:
            try:
                conn = await self.accept_socket()
            except OSError as exc:
                if isinstance(exc, ConnectionClosed):
                    raise
                raise translate(exc, "accept", self.address) from exc
            channel = self.admit(conn)
            if channel is not None:
                return channel

    async def accept_socket(self) -> socket.socket:
        """The next connected socket, not yet checked against the policy (see ``admit``).

        Raises the accept(2) error as OSError (a server decides what each errno means),
        ConnectionClosed once the listener is closed, Timeout after ``settimeout``.
        """
        sock = self._inner.socket
        while True:
            self._check_open()
            try:
                conn, _ = sock.accept()
                return conn
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                if self._inner.closed:
                    raise ConnectionClosed(f"listener on {self.address} is closed") from None
                if classify(exc) is not AcceptVerdict.RETRY:
                    raise  # out of resources, or fatal: the caller decides
                continue  # the queued client is gone (see udskit.accepting): the next one
            await self._wait_readable("accept")

    def admit(self, conn: socket.socket) -> Channel | None:
        """A Channel for a freshly accepted socket, or None (and the socket closed) if its
        peer is gone already or the policy refuses it."""
        framing, max_frame, max_fds, sndbuf, rcvbuf, write_limit = self._options
        admitted = admit(conn, self.address, self.policy, (sndbuf, rcvbuf), blocking=False)
        if not isinstance(admitted, Admitted):
            return None
        peer, remote = admitted.peer, admitted.remote
        # Shared memory only with a client that opted in too (see udskit.listening).
        size = self._inner.shared_memory  # type: ignore[union-attr]
        pool = size if size and blocking.opted_in(conn) else 0
        channel = Channel(
            conn,
            framing=framing,
            max_frame=max_frame,
            max_fds=max_fds,
            remote=remote,
            peer=peer,
            write_limit=write_limit,
            shared_memory=pool,
            peer_opted=bool(pool),
        )
        if pool and not offered(channel, self.address):
            return None
        return channel

    _next = accept  # what async iteration yields


class DatagramListener(_Endpoint[Datagram]):
    """A bound datagram socket: ``await recv()`` returns a :class:`udskit.Datagram`; reply
    with ``await send_to(datagram.sender, data)``.

    A reader callback queues datagrams as they arrive (each with its sender's credentials,
    checked against the policy first), pausing once 256 of them or READ_AHEAD bytes wait.
    """

    __slots__ = ("_ancsize", "_max_fds", "_max_frame", "_ready", "_ready_bytes", "_ready_fds")

    def __init__(self, inner: blocking.DatagramListener, *, max_frame: int, max_fds: int) -> None:
        super().__init__(inner)
        self._max_frame = max_frame
        self._max_fds = max_fds
        self._ancsize = ancillary_size(max_fds)
        # datagrams, and errors to raise in their place (a truncated one, say), in order
        self._ready: deque[Datagram | Exception] = deque()
        self._ready_bytes = 0
        self._ready_fds = 0  # descriptors of the datagrams in _ready

    async def recv(self) -> Datagram:
        """The next datagram the policy allows (others are dropped and logged). Its
        descriptors, if any, belong to the caller."""
        while True:
            if self._ready:
                item = self._ready.popleft()
                if isinstance(item, Exception):
                    raise item
                self._ready_bytes -= len(item.data)
                self._ready_fds -= len(item.fds)
                return item
            if not self._receiving:
                self._check_open()
                raise ConnectionClosed(
                    f"listener on {self.address} takes no more datagrams (stop_receiving())"
                )
            await self._wait_readable("recv")

    def stop_receiving(self) -> None:
        """Take no more datagrams from the socket, but keep it open: ``recv()`` returns
        those already read, then raises ConnectionClosed (``async for`` ends), while
        ``send_to()`` and sessions still reply through it until ``close()``.

        For a listener handed over (``handover=True``): both processes hold the socket
        until this one closes its copy, and what arrives is the successor's. The reader
        callback reads ahead, so close() alone would drop the datagrams already read, and
        the replies of handlers still running; staying open and reading, this process
        would go on taking datagrams from the successor."""
        self._receiving = False
        self._stop_reading()
        self._waiters.wake_all()

    async def send_to(self, address: AddressLike, data: Buffer, fds: Sequence[int] = ()) -> None:
        """Send one datagram (with descriptors, if given) to ``address``.

        If the receiver's queue is full, retries after growing pauses until it has room
        (or the timeout passes): the kernel gives an unconnected sender no event to wait for.
        """
        self._check_open()
        check_message(data, "send_to")
        target = Address.parse(address)
        ancillary = rights(descriptors(fds, "send_to"), self._max_fds)
        pause: RetryPause | None = None
        while True:
            try:
                with sun_path(target) as where:
                    self._inner.socket.sendmsg([data], ancillary, _SEND_FLAGS, where)
                return
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                raise translate(exc, "send", target) from exc
            if pause is None:
                pause = RetryPause(self._timeout, "send", target)
            await pause.pause()
            self._check_open()

    def session(self, datagram: Datagram) -> Channel:
        """A Channel view of one datagram: ``recv()`` returns it, ``send()`` replies to its
        sender. This lets one handler serve stream, seqpacket and datagram alike.

        The datagram's descriptors pass to the session, once, as in
        :meth:`udskit.DatagramListener.session`: ``recv_fds()`` hands them on, ``close()``
        closes them if nobody took them; do not close ``datagram.fds``, before or after (one
        already closed: ValueError); a second session of a datagram that carries
        descriptors raises RuntimeError."""
        return Channel(
            self._inner.socket,
            remote=datagram.sender,
            peer=datagram.peer,
            max_fds=self._max_fds,
            max_frame=self._max_frame,
            owns_socket=False,
            inbox=[(datagram.data, blocking.session_fds(datagram), datagram.peer)],
        )

    def _on_readable(self) -> None:
        """Reader callback: queue what arrived, drop what the policy refuses."""
        if not self._receiving:
            return  # a call the loop had queued before stop_receiving() removed the reader
        view = scratch(self._max_frame)[: self._max_frame]
        sock = self._inner.socket
        ready = self._ready
        while True:
            try:
                size, ancdata, flags, name = sock.recvmsg_into([view], self._ancsize, RECV_FLAGS)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                ready.append(translate(exc, "recv", self.address))
                self._stop_reading()
                break
            sender = sender_address(name)
            where = sender.shown() if sender is not None else "an unbound sender"
            policy = self.policy
            try:
                got = unpack(ancdata, flags, where, self._max_fds)
            except ControlDataError as exc:
                # The policy first: a sender it refuses never makes recv() raise.
                if policy is None or blocking.admits(policy, exc.cred, self.address, where):
                    ready.append(exc)
                continue
            peer = got.cred
            if policy is not None and not blocking.admits(policy, peer, self.address, where):
                close_fds(got.fds)
                continue
            if flags & _TRUNC:
                close_fds(got.fds)
                ready.append(
                    ProtocolError(
                        f"datagram from {where} to {self.address} was larger than max_frame "
                        f"({self._max_frame} bytes) and arrived truncated; raise max_frame"
                    )
                )
                continue
            ready.append(Datagram(view[:size].tobytes(), sender, peer, tuple(got.fds)))
            self._ready_bytes += size
            self._ready_fds += len(got.fds)
            if (
                len(ready) >= _DATAGRAMS_AHEAD
                or self._ready_bytes > READ_AHEAD
                or self._ready_fds > FDS_AHEAD
            ):
                self._stop_reading()  # resumed by the next recv() that finds nothing
                break
        if ready:
            self._waiters.wake_all()

    def close(self) -> None:
        """Stop listening, remove the socket file (if still ours), and close descriptors
        of datagrams nobody took."""
        for item in self._ready:
            if isinstance(item, Datagram):
                close_fds(item.fds)
        self._ready.clear()
        self._ready_fds = 0
        super().close()

    _next = recv  # what async iteration yields


@overload
async def listen(
    address: AddressLike,
    *,
    type: Literal["stream", "seqpacket"] = ...,
    backlog: int = ...,
    mode: int = ...,
    owner: int | str | None = ...,
    group: int | str | None = ...,
    allow: Policy | None = ...,
    framing: str = ...,
    max_frame: int | None = ...,
    max_fds: int = ...,
    sndbuf: int | None = ...,
    rcvbuf: int | None = ...,
    write_limit: int | None = ...,
    handover: bool = ...,
    shared_memory: bool | int = ...,
) -> Listener: ...
@overload
async def listen(
    address: AddressLike,
    *,
    type: Literal["dgram"],
    backlog: int = ...,
    mode: int = ...,
    owner: int | str | None = ...,
    group: int | str | None = ...,
    allow: Policy | None = ...,
    framing: str = ...,
    max_frame: int | None = ...,
    max_fds: int = ...,
    sndbuf: int | None = ...,
    rcvbuf: int | None = ...,
    write_limit: int | None = ...,
    handover: bool = ...,
    shared_memory: bool | int = ...,
) -> DatagramListener: ...
@overload
async def listen(
    address: AddressLike,
    *,
    type: str,
    backlog: int = ...,
    mode: int = ...,
    owner: int | str | None = ...,
    group: int | str | None = ...,
    allow: Policy | None = ...,
    framing: str = ...,
    max_frame: int | None = ...,
    max_fds: int = ...,
    sndbuf: int | None = ...,
    rcvbuf: int | None = ...,
    write_limit: int | None = ...,
    handover: bool = ...,
    shared_memory: bool | int = ...,
) -> Listener | DatagramListener: ...
async def listen(
    address: AddressLike,
    *,
    type: str = "stream",  # noqa: A002 - the natural name for the socket type
    backlog: int = DEFAULT_BACKLOG,
    mode: int = 0o600,
    owner: int | str | None = None,
    group: int | str | None = None,
    allow: Policy | None = None,
    framing: str = "length",
    max_frame: int | None = None,
    max_fds: int = 16,
    sndbuf: int | None = None,
    rcvbuf: int | None = None,
    write_limit: int | None = None,
    handover: bool = False,
    shared_memory: bool | int = False,
) -> Listener | DatagramListener:
    """Listen on ``address``, as :func:`udskit.listen` does, for asyncio.

    The options are :func:`udskit.listen`'s (``sndbuf``/``rcvbuf`` size every accepted
    connection's socket buffers; ``shared_memory``: large messages through shared memory
    with clients that opt in too), plus ``write_limit``: each channel's send-queue
    high-water mark (see :class:`Channel`). Claiming the socket file takes a few system
    calls; it waits only while another process is in the middle of claiming the same path,
    and does so in a worker thread: the event loop keeps running meanwhile.
    """
    check_write_limit(write_limit)
    listen_now: Callable[[], blocking.Listener | blocking.DatagramListener] = functools.partial(
        blocking.listen,
        address,
        type=type,
        backlog=backlog,
        mode=mode,
        owner=owner,
        group=group,
        allow=allow,
        framing=framing,
        max_frame=max_frame,
        max_fds=max_fds,
        sndbuf=sndbuf,
        rcvbuf=rcvbuf,
        handover=handover,
        shared_memory=shared_memory,
    )
    inner = await claim_in_thread(listen_now)
    try:
        if isinstance(inner, blocking.DatagramListener):
            limit = max_frame_for("dgram", max_frame)
            return DatagramListener(inner, max_frame=limit, max_fds=max_fds)
        return Listener(
            inner,
            framing=framing,
            max_frame=max_frame,
            max_fds=max_fds,
            sndbuf=sndbuf,
            rcvbuf=rcvbuf,
            write_limit=write_limit,
        )
    except BaseException:
        inner.close()
        raise


_Claimed = TypeVar("_Claimed")


async def claim_in_thread(listen_now: Callable[[], _Claimed]) -> _Claimed:
    """Run a blocking ``listen`` in a worker thread: claiming a path waits (up to
    sockfile.CLAIM_LOCK_TIMEOUT) while another process claims or releases the same path,
    and the event loop must keep running meanwhile. If the caller is cancelled, what the
    thread claims is closed once it is done (the thread itself cannot be stopped)."""
    claiming = asyncio.get_running_loop().run_in_executor(None, listen_now)
    try:
        return await asyncio.shield(claiming)
    except asyncio.CancelledError:
        claiming.add_done_callback(_close_unwanted)
        raise


def _close_unwanted(claiming: asyncio.Future[Any]) -> None:
    """Close a listener claimed for a listen() that was cancelled meanwhile."""
    if not claiming.cancelled() and claiming.exception() is None:
        claiming.result().close()
