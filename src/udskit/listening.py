"""Listening endpoints: ``listen()``, the stream/seqpacket ``Listener`` and the
``DatagramListener``.

The socket file is claimed safely (:mod:`udskit.sockfile`) and released on close; the access
policy is enforced at accept (or per datagram), before any handler sees the peer.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal, Protocol, TypeVar, overload

from .accepting import AcceptVerdict, classify
from .address import Address, AddressLike, sun_path
from .admission import Admitted, admit, sender_address
from .adopting import adopt_listener
from .ancillary import (
    RECV_FLAGS,
    ControlDataError,
    ancillary_size,
    close_fds,
    descriptors,
    discard,
    refuse_descriptors,
    rights,
    unpack,
)
from .channel import CLOSE_WAIT, Buffer, Channel
from .creds import PeerCred, Policy
from .errors import AddressInUse, ConnectionClosed, ProtocolError
from .handover import Upgrader
from .options import (
    DEFAULT_BACKLOG,
    ListenOptions,
    SocketType,
    base_type,
    check_message,
    check_shared_memory,
    check_timeout,
    listen_options,
    max_frame_for,
    tune_buffers,
    type_name,
)
from .proto.framing import default_max_frame
from .proto.shm import is_marker
from .shm import offered
from .sockfile import Claim, claim, probe
from .translate import translate, translating
from .wakeup import WakeUp

__all__ = ["Datagram", "DatagramListener", "Listener", "listen"]

_T = TypeVar("_T")
_Self = TypeVar("_Self", bound="_Endpoint")

log = logging.getLogger("udskit")


@dataclass(frozen=True, slots=True)
class Datagram:
    """One received datagram: its bytes, who sent it (address and credentials), and any
    descriptors that came with it (owned by the receiver: close them).

    ``peer`` is None for a datagram that carries no credentials (see :func:`admits`); a
    listener with an access policy never returns one.

    ``DatagramListener.session(datagram)`` takes the descriptors over, once: the datagram
    records that, and refuses a second session.
    """

    data: bytes
    sender: Address | None
    peer: PeerCred | None
    fds: tuple[int, ...] = field(default=())
    # Whether the descriptors have passed to a session (see session_fds): a descriptor has
    # one owner. Not part of the value: left out of comparisons and the repr.
    _passed: bool = field(default=False, init=False, repr=False, compare=False)


def session_fds(datagram: Datagram) -> list[int]:
    """The descriptors of ``datagram``, passing to the session being made of it (both
    layers' ``DatagramListener.session``): once only, and only while they are open."""
    if not datagram.fds:
        return []
    with _PASSING:  # two threads' session() of one datagram: one of them gets the fds
        if datagram._passed:
            raise RuntimeError(
                "session(datagram): the datagram's descriptors already passed to a session, "
                "which owns them (recv_fds() hands them on, close() closes them); make one "
                "session per datagram"
            )
        fds = descriptors(
            datagram.fds,
            "session(datagram)",
            "the session takes datagram.fds over and closes them itself: do not close them first",
        )
        object.__setattr__(datagram, "_passed", True)  # frozen: the one field that changes
    return fds


#: Held while a datagram's descriptors pass to a session (see session_fds): brief, and
#: rare (only datagrams that carry descriptors), so one lock serves every datagram.
_PASSING: Final = threading.Lock()


class _Owned(Protocol):
    """What owns the socket file: a Claim, or an Upgrader (which also hands it over)."""

    def release(self) -> None: ...

    def disown(self) -> None: ...


class _Endpoint:
    """What the two listener kinds share: socket, address, claim, close, context manager."""

    __slots__ = (
        "_claim",
        "_closed",
        "_inside",
        "_left",
        "_owner_pid",
        "_shared",
        "_sock",
        "_state",
        "_waiters",
        "_wakeup",
        "address",
        "policy",
    )

    def __init__(
        self, sock: socket.socket, address: Address, claim: _Owned | None, policy: Policy | None
    ) -> None:
        self._sock = sock
        self._claim = claim
        self._closed = False
        self._owner_pid = os.getpid()
        # A socket another process may hold too: inherited (fd:N, systemd keeps its copy)
        # or handed over. shutdown() would break it for them as well.
        self._shared = address.kind == "fd" or isinstance(claim, Upgrader)
        # Without shutdown(), close() wakes a thread waiting on a shared socket through this
        # pipe (made by the first such wait), closed by close() or the last waiter after it.
        # Reentrant: close() from a signal handler that interrupted this thread in a call.
        self._state = threading.RLock()
        self._wakeup: WakeUp | None = None
        self._waiters = 0
        # Threads inside accept() or send_to() (their idents, once per call):
        # close() waits for the others to leave before it gives up the socket's number.
        self._inside: list[int] = []
        self._left = threading.Condition(self._state)
        self.address = address
        self.policy = policy

    @property
    def upgrader(self) -> Upgrader | None:
        """The :class:`udskit.Upgrader` of a listener made with ``handover=True``."""
        return self._claim if isinstance(self._claim, Upgrader) else None

    @property
    def type(self) -> SocketType:
        return type_name(base_type(self._sock))

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def socket(self) -> socket.socket:
        return self._sock

    def fileno(self) -> int:
        return self._sock.fileno()

    def settimeout(self, timeout: float | None) -> None:
        """Seconds accept()/recv() wait before raising ``Timeout`` (None: forever)."""
        timeout = check_timeout(timeout)
        self._check_open()
        try:
            self._sock.settimeout(timeout)
        except OSError:
            self._check_open()  # closed by another thread meanwhile: EBADF
            raise

    def remove_file(self) -> None:
        """Remove the socket file now (only if it is still ours); the socket stays open until
        ``close()``, so a datagram server's last replies still leave through it."""
        if self._claim is not None:
            self._claim.release()

    def disown(self) -> None:
        """Give up the removal of the socket file: ``close()`` leaves it at its path.

        For a listener whose descriptor lives on in another process (systemd's descriptor
        store keeps it across a restart): the file stays the way in for that socket, and
        ``close()`` only closes this copy, without the ``shutdown()`` that would stop the
        socket for every process. A thread that calls ``accept()`` or ``recv()`` after this
        is woken by ``close()`` another way and raises ConnectionClosed; one already blocked
        there when ``disown()`` is called stays blocked: stop such threads first.
        """
        self._shared = True  # close() shuts down only a socket this process alone holds
        if self._claim is not None:
            self._claim.disown()
            self._claim = None

    def close(self) -> None:
        """Stop listening and remove the socket file (only if it is still ours)."""
        with self._state:
            if self._closed:
                return
            self._closed = True
            wakeup, idle = self._wakeup, self._waiters == 0
        if wakeup is not None:
            wakeup.wake()
            if idle:
                wakeup.close()  # else the last waiter does, once it has stopped using it
        if self._claim is not None:
            self._claim.release()  # first, so no client connects to a closing socket
        if os.getpid() == self._owner_pid:
            if not self._shared:
                # shutdown() acts on the socket every forked copy shares: a child closing
                # its copy must leave the parent's listener working, so only the creator
                # does it. It wakes a thread blocked in accept()/recv() (close alone does not).
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            # Not in a forked child: the threads it inherited from our list are not in it
            # (gone with the fork: waiting for them would cost each such close() the whole
            # CLOSE_WAIT), nor the parent's hold of the read lock; and none of its own was
            # woken, as no shutdown() was made.
            self._until_left()
        self._sock.close()

    def _until_left(self) -> None:
        """Wait (briefly: close() has woken them) for the threads inside a call to leave.
        The next open() in any thread may get the socket's number once it is closed, and a
        thread that had taken it (between the socket module's read of it and the system
        call) would accept that socket's client, or read its datagram."""
        me = threading.get_ident()  # a signal handler's close() cannot wait for its thread
        with self._left:
            self._left.wait_for(lambda: all(t == me for t in self._inside), CLOSE_WAIT)

    def _enter(self) -> None:
        """A call that uses the socket begins (see _until_left)."""
        with self._state:
            self._check_open()
            self._inside.append(threading.get_ident())

    def _leave(self) -> None:
        with self._state:
            self._inside.remove(threading.get_ident())
            if self._closed:
                self._left.notify_all()

    def _wait_readable(self) -> bool:
        """Wait until the socket is readable if this listener blocks (no timeout) but its
        descriptor does not: O_NONBLOCK belongs to the open socket, which a process it is
        shared with (handed over, or inherited) may have set. False: it does not block.

        On a shared socket it also waits for close(), which cannot wake a thread blocked
        in accept()/recv() there with shutdown() (that would stop the other processes'
        copies too): then it raises ConnectionClosed.
        """
        if self._sock.gettimeout() is not None:
            return False
        poller = select.poll()
        if not self._shared:
            poller.register(self._sock, select.POLLIN)
            poller.poll()
            return True
        with self._state:
            self._check_open()
            if self._wakeup is None:
                self._wakeup = WakeUp()
            wakeup = self._wakeup
            self._waiters += 1
        try:
            poller.register(self._sock, select.POLLIN)
            poller.register(wakeup.fd, select.POLLIN)
            poller.poll()
        except (OSError, ValueError):
            self._check_open()  # closed meanwhile: the socket has no descriptor left
            raise
        finally:
            with self._state:
                self._waiters -= 1
                last = self._closed and self._waiters == 0
            if last:
                wakeup.close()
        self._check_open()
        return True

    def _check_open(self) -> None:
        if self._closed:
            raise ConnectionClosed(f"listener on {self.address} is closed")

    def _until_closed(self, receive: Callable[[], _T]) -> Iterator[_T]:
        """Call ``receive`` until the listener is closed (then stop, not raise)."""
        while True:
            try:
                item = receive()
            except ConnectionClosed:
                if self.closed:
                    return
                raise
            yield item

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self._sock.fileno()}"
        return f"<{type(self).__name__} {self.type} {self.address} {state}>"


class Listener(_Endpoint):
    """A listening stream or seqpacket socket. ``accept()`` returns a Channel per client.

    Threads may share it: several may accept at once, and ``close()`` from another thread
    wakes them."""

    __slots__ = ("_buffers", "_framing", "_max_fds", "_max_frame", "_shared_memory")

    def __init__(
        self,
        sock: socket.socket,
        address: Address,
        claim: _Owned | None,
        *,
        policy: Policy | None,
        framing: str,
        max_frame: int | None,
        max_fds: int,
        buffers: tuple[int | None, int | None] = (None, None),
        shared_memory: int = 0,
    ) -> None:
        super().__init__(sock, address, claim, policy)
        self._shared_memory = shared_memory
        self._framing = framing
        self._max_frame = max_frame
        self._max_fds = max_fds
        self._buffers = buffers
        if max_fds == 0 and base_type(sock) == socket.SOCK_STREAM:
            # Accepted sockets inherit it: no client can queue a descriptor before accept(),
            # and every channel reads without a control buffer (see Channel._read).
            refuse_descriptors(sock)

    @property
    def framing(self) -> str:
        """The framing of this listener's stream channels."""
        return self._framing

    @property
    def max_frame(self) -> int:
        """The largest message a client may send (a line, with 'lines' framing)."""
        if self._max_frame is None and self.type == "stream":
            return default_max_frame(self._framing)  # as each accepted channel's framing
        return max_frame_for(self.type, self._max_frame)

    @property
    def max_fds(self) -> int:
        """Descriptors accepted with one message."""
        return self._max_fds

    @property
    def shared_memory(self) -> int:
        """The pool size offered to clients that opt in to shared memory (0: off)."""
        return self._shared_memory

    @property
    def buffers(self) -> tuple[int | None, int | None]:
        """SO_SNDBUF and SO_RCVBUF given to each connection (None: our default)."""
        return self._buffers

    def accept(self) -> Channel:
        """Wait for the next client the policy allows; refused peers are closed and logged.

        Threads may accept at once: each client goes to one of them. ``close()`` wakes
        those waiting, which raise ConnectionClosed."""
        self._enter()
        try:
            return self._accept()
        finally:
            self._leave()

    def _accept(self) -> Channel:
        while True:
            self._check_open()
            if self._shared:
                self._wait_readable()  # close() cannot wake a blocked accept() here
            try:
                conn, _ = self._sock.accept()
            except OSError as exc:
                if self._closed:
                    raise ConnectionClosed(f"listener on {self.address} is closed") from None
                if isinstance(exc, BlockingIOError) and self._wait_readable():
                    continue  # see _wait_readable
                if classify(exc) is AcceptVerdict.RETRY and not isinstance(exc, BlockingIOError):
                    continue  # the queued client is gone (see udskit.accepting): the next one
                raise translate(exc, "accept", self.address) from exc  # EAGAIN: Timeout
            if self._closed:  # close() came as this client arrived: no channel from it
                conn.close()
                raise ConnectionClosed(f"listener on {self.address} is closed")
            channel = self.admit(conn)
            if channel is not None:
                return channel

    def admit(self, conn: socket.socket) -> Channel | None:
        """Wrap a freshly accepted socket, or close it if the policy refuses its peer."""
        admitted = admit(conn, self.address, self.policy, self._buffers, blocking=True)
        if not isinstance(admitted, Admitted):
            return None
        # Shared memory only with a client that opted in too (its name says so): the
        # OFFER is then the first thing it receives; any other client sees a plain socket.
        pool = self._shared_memory if self._shared_memory and opted_in(conn) else 0
        channel = Channel(
            conn,
            framing=self._framing,
            max_frame=self._max_frame,
            max_fds=self._max_fds,
            remote=admitted.remote,
            peer=admitted.peer,
            shared_memory=pool,
            peer_opted=bool(pool),
        )
        if pool and not offered(channel, self.address):
            return None
        return channel

    def __iter__(self) -> Iterator[Channel]:
        """Accept clients until the listener is closed."""
        return self._until_closed(self.accept)


class DatagramListener(_Endpoint):
    """A bound datagram socket: ``recv()`` returns a :class:`Datagram`; reply with
    ``send_to(datagram.sender, data)``."""

    __slots__ = ("_ancsize", "_max_fds", "_rbuf", "_reading", "_rlock", "_rview")

    def __init__(
        self,
        sock: socket.socket,
        address: Address,
        claim: _Owned | None,
        *,
        policy: Policy | None,
        max_frame: int,
        max_fds: int,
    ) -> None:
        super().__init__(sock, address, claim, policy)
        # Set before bind() for the sockets listen() creates (see _bind); here again for an
        # adopted descriptor (fd:N), whose creator may not have set it.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._max_fds = max_fds
        self._ancsize = ancillary_size(max_fds)
        self._rbuf = bytearray(max_frame)
        self._rview = memoryview(self._rbuf)
        # The receive buffer is shared: one reader at a time. close() waits for the reader
        # as for the threads in _inside (a reentrant lock: not for the reader that a signal
        # handler's close() interrupted).
        self._rlock = threading.RLock()
        self._reading = False  # a recv() holds the buffer: one of this thread, if reentered

    @property
    def max_frame(self) -> int:
        """The largest datagram received whole."""
        return len(self._rbuf)

    @property
    def max_fds(self) -> int:
        """Descriptors accepted with one datagram."""
        return self._max_fds

    def recv(self) -> Datagram:
        """The next datagram the policy allows (others are dropped and logged).

        Threads may share a listener: each gets whole datagrams of its own."""
        with self._rlock:
            if self._reading:
                # The lock is reentrant (for close()): only a recv() of this very thread
                # can be under way, interrupted (by a signal handler, say) with its datagram
                # in the buffer that this one would overwrite.
                raise RuntimeError(
                    f"recv() on {self.address} called inside another recv() of the same "
                    "thread (from a signal handler?): it would overwrite that one's "
                    "datagram; receive outside the handler"
                )
            self._reading = True
            try:
                return self._recv()
            finally:
                self._reading = False

    def _recv(self) -> Datagram:
        while True:
            self._check_open()
            if self._shared:
                self._wait_readable()  # close() cannot wake a blocked recvmsg() here
            try:
                size, ancdata, flags, sender = self._sock.recvmsg_into(
                    [self._rview], self._ancsize, RECV_FLAGS
                )
            except OSError as exc:
                if self._closed:
                    raise ConnectionClosed(f"listener on {self.address} is closed") from None
                if isinstance(exc, BlockingIOError) and self._wait_readable():
                    continue  # see _wait_readable
                raise translate(exc, "recv", self.address) from exc
            if self._closed:  # close() in another thread woke us, or came as this arrived
                discard(ancdata, flags, self.address)
                raise ConnectionClosed(f"listener on {self.address} is closed")
            named = sender_address(sender)
            where = named.shown() if named is not None else "an unbound sender"
            policy = self.policy
            try:
                got = unpack(ancdata, flags, where, self._max_fds)
            except ControlDataError as exc:
                # The policy first: a sender it refuses never makes recv() raise.
                if policy is not None and not admits(policy, exc.cred, self.address, where):
                    continue
                raise
            peer = got.cred
            if policy is not None and not admits(policy, peer, self.address, where):
                close_fds(got.fds)
                continue
            if flags & socket.MSG_TRUNC:
                close_fds(got.fds)
                raise ProtocolError(
                    f"datagram from {where} to {self.address} was larger than max_frame "
                    f"({len(self._rbuf)} bytes) and arrived truncated; raise max_frame"
                )
            data = self._rview[:size].tobytes()
            return Datagram(data, sender_address(sender), peer, tuple(got.fds))

    def send_to(self, address: AddressLike, data: Buffer, fds: Sequence[int] = ()) -> None:
        """Send one datagram (with descriptors, if given) to ``address``."""
        self._check_open()
        check_message(data, "send_to")
        target = Address.parse(address)
        ancillary = rights(descriptors(fds, "send_to"), self._max_fds)
        self._enter()
        try:
            with sun_path(target) as where:
                self._sock.sendmsg([data], ancillary, socket.MSG_NOSIGNAL, where)
        except OSError as exc:
            self._check_open()  # closed by another thread meanwhile: EBADF says nothing
            raise translate(exc, "send", target) from exc
        finally:
            self._leave()

    def _until_left(self) -> None:
        deadline = time.monotonic() + CLOSE_WAIT
        super()._until_left()
        if self._rlock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            self._rlock.release()  # a reader that comes now finds the listener closed

    def session(self, datagram: Datagram) -> Channel:
        """A Channel view of one datagram: ``recv()`` returns it, ``send()`` replies to its
        sender. This lets one handler serve stream, seqpacket and datagram alike.

        The datagram's descriptors pass to the session: ``recv_fds()`` hands them on, and
        ``close()`` closes them if nobody took them; do not close ``datagram.fds``, before
        or after (one already closed: ValueError). They pass once: a second session of a
        datagram that carries descriptors raises RuntimeError (one without makes as many
        as asked, each replying to its sender)."""
        return Channel(
            self._sock,
            remote=datagram.sender,
            peer=datagram.peer,
            max_fds=self._max_fds,
            max_frame=len(self._rbuf),
            owns_socket=False,
            inbox=[(datagram.data, session_fds(datagram))],
        )

    def __iter__(self) -> Iterator[Datagram]:
        """Receive datagrams until the listener is closed."""
        return self._until_closed(self.recv)


def opted_in(conn: socket.socket) -> bool:
    """Whether an accepted client bound itself to the shared-memory marker name."""
    try:
        return is_marker(conn.getpeername())
    except OSError:
        return False


def admits(policy: Policy, peer: PeerCred | None, address: Address, where: object) -> bool:
    """Whether ``policy`` lets a datagram from ``peer`` (None: it carries no credentials)
    be served; a refusal is logged.

    A datagram without credentials was queued before SO_PASSCRED was set on either end:
    under socket activation (``systemd-socket-activate --datagram``, or a ``.socket`` unit
    without ``PassCredentials=yes``) the datagram that starts the server arrives that way.
    The kernel reports pid 0 and the overflow uid for it; udskit reports no peer rather than
    judge it as ``nobody``. Without a policy it is served (``peer`` None); a policy cannot
    vouch for an unknown sender, so a listener with one refuses it, saying why.
    """
    if peer is None:
        log.warning(
            "%s: refused a datagram from %s: it carries no sender credentials (it was queued "
            "before SO_PASSCRED was set; under systemd socket activation set "
            "PassCredentials=yes in the .socket unit), so the access policy cannot vouch for it",
            address,
            where,
        )
        return False
    return policy.check(peer, address)


@overload
def listen(
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
    handover: bool = ...,
    shared_memory: bool | int = ...,
) -> Listener: ...
@overload
def listen(
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
    handover: bool = ...,
    shared_memory: bool | int = ...,
) -> DatagramListener: ...
@overload
def listen(
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
    handover: bool = ...,
    shared_memory: bool | int = ...,
) -> Listener | DatagramListener: ...
def listen(
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
    handover: bool = False,
    shared_memory: bool | int = False,
) -> Listener | DatagramListener:
    """Listen on ``address``: a path (claimed safely), an abstract name, ``tcp:`` or ``fd:N``.

    ``mode``/``owner``/``group`` set the socket file's permissions before it becomes visible.
    ``allow`` is an access :class:`Policy` checked for every peer. ``type="dgram"`` returns a
    :class:`DatagramListener`; otherwise a :class:`Listener` whose channels use ``framing``.
    ``sndbuf``/``rcvbuf`` size each connection's socket buffers (None: 1 MiB for streams,
    the kernel's default otherwise; 0: the kernel's default).
    ``handover=True`` (socket paths): take the listener over from a udskit server that
    serves the path with handover, else claim it fresh; either way offer handover to the
    next (see :class:`udskit.Upgrader`, which ``listener.upgrader`` is). Its ``accept()``
    and ``recv()`` wait as usual though the socket is shared with the previous process,
    which may have made it non-blocking (udskit's servers do).
    ``shared_memory`` (True, or a pool size in bytes) moves large messages through shared
    memory with each client that opted in too (docs/shared-memory.md); other clients get a
    plain socket.
    """
    if not isinstance(handover, bool):
        raise TypeError(f"handover must be True or False, not {handover!r}")
    opts = listen_options(
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
    )
    target, kind, buffers = opts.target, opts.kind, opts.buffers
    pool = check_shared_memory(
        shared_memory,
        type=type,
        framing=framing,
        max_fds=max_fds,
        max_frame=max_frame,
        address_kind=target.kind,
    )
    bound: _Owned | None = None
    if handover:
        upgrader = Upgrader.for_listen(opts, bind_listener)
        sock, bound = upgrader.socket, upgrader
    elif target.kind == "fd":
        sock = adopt_listener(target, kind)
    else:
        sock, bound = bind_listener(opts)
    try:
        target = _bound_address(sock, target)
        if kind != socket.SOCK_DGRAM:
            return Listener(
                sock,
                target,
                bound,
                policy=allow,
                framing=framing,
                max_frame=max_frame,
                max_fds=max_fds,
                buffers=buffers,
                shared_memory=pool,
            )
        if any(buffers):
            tune_buffers(sock, *buffers)
        return DatagramListener(
            sock, target, bound, policy=allow, max_frame=opts.limit, max_fds=max_fds
        )
    except BaseException:
        if bound is not None:
            bound.release()
        sock.close()
        raise


def _bound_address(sock: socket.socket, target: Address) -> Address:
    """``target``, with the port the kernel chose for ``tcp:HOST:0``: the address a client
    can connect to."""
    if target.kind == "tcp" and target.port == 0:
        host, port = sock.getsockname()[:2]
        return Address("tcp", host=host, port=port)
    return target


def bind_listener(opts: ListenOptions) -> tuple[socket.socket, Claim | None]:
    """A socket bound to ``opts.target`` and, unless it is a datagram socket, listening."""
    target, kind = opts.target, opts.kind
    if target.kind == "tcp":
        if kind != socket.SOCK_STREAM:
            raise ValueError(f"{target}: TCP addresses take type='stream' only")
        family = socket.AF_INET6 if ":" in target.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            with translating("bind", target):
                sock.bind((target.host, target.port))
            _start_listening(sock, opts)
        except BaseException:
            sock.close()
            raise
        return sock, None
    sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
    try:
        if kind == socket.SOCK_DGRAM:
            # Before bind(): a datagram that arrives between bind() and this call would
            # carry no sender credentials (see admits()).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        if target.kind == "abstract":
            if opts.allow is None:
                log.warning(
                    "%s: abstract names have no file permissions; any process in this network "
                    "namespace can connect (pass allow= to restrict peers)",
                    target,
                )
            try:
                sock.bind(target.sockaddr())
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    _abstract_in_use(target)
                raise translate(exc, "bind", target) from exc
            _start_listening(sock, opts)
            return sock, None
        # The claim starts listening itself, before the socket appears at the path.
        bound = claim(
            sock, target, mode=opts.mode, uid=opts.uid, gid=opts.gid, backlog=opts.backlog
        )
        return sock, bound
    except BaseException:
        sock.close()
        raise


def _start_listening(sock: socket.socket, opts: ListenOptions) -> None:
    if opts.kind != socket.SOCK_DGRAM:
        with translating("listen", opts.target):
            sock.listen(opts.backlog)


def _abstract_in_use(target: Address) -> None:
    found = probe(target.sockaddr())
    owner = f": pid {found.cred.pid}, uid {found.cred.uid}" if found.cred else ""
    raise AddressInUse(
        f"cannot listen on {target}: the abstract name is taken by a live socket{owner}; "
        "choose another name",
        pid=found.cred.pid if found.cred else None,
        uid=found.cred.uid if found.cred else None,
    )
