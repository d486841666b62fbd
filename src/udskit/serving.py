"""What both message servers (blocking :mod:`udskit.messageserver`, asyncio
:mod:`udskit.aio.messageserver`) share, whatever runs their loop: checking options, admitting
clients in batches with back-off, the table of connections, reading datagrams, calling the
handler and the hooks, and what a handler's failure does.

Every client's socket and the listener are in one epoll set; ``_on_events`` handles what a
wait on it found. A subclass supplies the loop that waits (the blocking server in a thread,
the asyncio one by watching the epoll descriptor from its event loop, so that one loop
callback serves every ready client), ``call_soon`` (run in the loop thread) and the timers
(``_retry_accept_in``, ``_retry_datagrams_in``).

Errors from accept(2), and what we do: see :mod:`udskit.accepting`.
"""

from __future__ import annotations

import itertools
import logging
import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from .accepting import AcceptVerdict, Backoff, classify
from .address import Address
from .admission import Admitted, admit
from .ancillary import close_fds
from .channel import RECV_CHUNK
from .connection import DEFAULT_MAX_OUTBOX, Connection
from .errors import ConnectionClosed, Timeout, UdsError
from .handover import Upgrader
from .listening import DatagramListener, Listener
from .options import DEFAULT_DRAIN_TIMEOUT, check_max_clients, check_seconds
from .proto import make_framing

__all__ = [
    "ACCEPT_BATCH",
    "DATAGRAMS_HANDED_OVER",
    "DATAGRAMS_LEFT",
    "DATAGRAMS_PER_WAKEUP",
    "DEFAULT_MAX_OUTBOX",
    "Hook",
    "MessageHandler",
    "MessageServing",
    "check_server_options",
]

log = logging.getLogger("udskit")

#: What a datagram server logs when handed over (both layers): it handles what it has read
#: already, for at most drain_timeout (the arguments: address, drain_timeout).
DATAGRAMS_HANDED_OVER: Final = (
    "%s: handed over; handling the datagrams already received, for at most %g s"
)
#: ... and when drain_timeout ran out before that was done (the same arguments).
DATAGRAMS_LEFT: Final = (
    "%s: still handling datagrams %g s after the handover; stopping (those not yet "
    "handled are dropped)"
)

MessageHandler = Callable[[Connection, bytes], Any]
Hook = Callable[[Connection], object]

#: Clients accepted per wake-up at most: a burst of thousands is taken in a few passes,
#: with the clients already connected served in between.
ACCEPT_BATCH: Final = 256

#: Datagrams read per wake-up at most, for the same reason.
DATAGRAMS_PER_WAKEUP: Final = 64

#: How long the replies to one datagram receiver wait for room in its queue, with nothing
#: taken, before they are dropped and logged: a receiver that lets its queue stay full this
#: long is gone or stuck.
DATAGRAM_REPLY_WAIT: Final = 1.0

#: The first and the longest pause between two tries of a datagram reply.
DATAGRAM_RETRY_FIRST: Final = 0.0005
DATAGRAM_RETRY_MAX: Final = 0.05


_IN: Final = select.EPOLLIN
_OUT: Final = select.EPOLLOUT
_ONE_SHOT: Final = select.EPOLLONESHOT
#: epoll reports a hang-up or an error whatever it is asked; reading then says which.
_READABLE: Final = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP


def check_server_options(
    handler: object, max_clients: int | None, max_outbox: int, hooks: dict[str, object]
) -> None:
    """One-line errors for a message server's bad arguments, before anything is claimed."""
    if not callable(handler):
        raise TypeError(f"handler must be a function of (conn, message), not {handler!r}")
    check_max_clients(max_clients)
    if isinstance(max_outbox, bool) or not isinstance(max_outbox, int) or max_outbox < 1:
        raise ValueError(f"max_outbox must be a positive number of bytes, not {max_outbox!r}")
    for name, hook in hooks.items():
        if hook is not None and not callable(hook):
            raise TypeError(f"{name} must be a function of a connection, not {hook!r}")


def refuse_shared_memory(listen_options: Mapping[str, object]) -> None:
    """A message server reads every client into one shared buffer and has no view to hand
    out: it cannot take ``shared_memory`` (the conversational servers can)."""
    if listen_options.get("shared_memory"):
        raise ValueError(
            "shared_memory is for Channels (listen/accept, Server, serve): a message server "
            "handles each message in its read loop and cannot take it"
        )


class UnsentReplies:
    """Datagram replies whose receiver's queue was full, kept per receiver, in order.

    An unconnected datagram socket is always writable to poll(), whoever's queue is full,
    so there is nothing to wait on: the driver calls ``retry()`` on a timer, pausing longer
    each time. A receiver that takes nothing for DATAGRAM_REPLY_WAIT seconds is stuck or
    gone: its replies are dropped and logged. Only its own replies wait; the others' go out
    at once. All of them together hold at most ``limit`` bytes.
    """

    __slots__ = ("_delay", "_limit", "_listener", "_queues", "_size")

    def __init__(self, listener: DatagramListener, limit: int) -> None:
        self._listener = listener
        self._limit = limit
        self._queues: dict[Address, tuple[list[float], deque[tuple[bytes, list[int]]]]] = {}
        self._size = 0
        self._delay = DATAGRAM_RETRY_FIRST

    def send(self, to: Address, data: bytes | bytearray | memoryview, fds: Sequence[int]) -> bool:
        """Send now, or queue behind ``to``'s waiting replies; True if it was queued.
        Raises Timeout if the queues are full."""
        queued = self._queues.get(to)
        if queued is None:
            try:
                self._listener.send_to(to, data, fds)
                return False
            except Timeout:
                pass
        owned = bytes(data)
        if self._size + len(owned) > self._limit:
            raise Timeout(
                f"{to}: {self._size} bytes of replies already wait for full receivers; "
                "this reply was not sent"
            )
        if queued is None:
            queued = self._queues[to] = ([time.monotonic() + DATAGRAM_REPLY_WAIT], deque())
            self._delay = DATAGRAM_RETRY_FIRST
        queued[1].append((owned, [os.dup(fd) for fd in fds]))
        self._size += len(owned)
        return True

    def retry(self) -> float | None:
        """Send what the receivers have room for now; drop the replies of a receiver that
        took nothing for too long. The pause before the next try, or None: none wait."""
        now = time.monotonic()
        for to, (deadline, waiting) in list(self._queues.items()):
            gone = False
            while waiting:
                data, fds = waiting[0]
                try:
                    self._listener.send_to(to, data, fds)
                except Timeout:
                    break
                except UdsError as exc:  # the listener closed, the receiver went away
                    log.debug("%s: %d replies not sent: %s", to, len(waiting), exc)
                    gone = True
                    break
                waiting.popleft()
                self._size -= len(data)
                close_fds(fds)
                deadline[0] = now + DATAGRAM_REPLY_WAIT  # it reads: give it time again
            if gone:
                self._drop(to)
            elif waiting and now >= deadline[0]:
                log.warning(
                    "%s: the receiver's queue stayed full for %g s; %d replies dropped",
                    to,
                    DATAGRAM_REPLY_WAIT,
                    len(waiting),
                )
                self._drop(to)
            elif not waiting:
                del self._queues[to]
        if not self._queues:
            return None
        delay, self._delay = self._delay, min(self._delay * 2, DATAGRAM_RETRY_MAX)
        return delay

    def _drop(self, to: Address) -> None:
        _, waiting = self._queues.pop(to)
        for data, fds in waiting:
            self._size -= len(data)
            close_fds(fds)

    def close(self) -> None:
        """Drop every waiting reply (the server stops)."""
        for to in list(self._queues):
            self._drop(to)

    def __bool__(self) -> bool:
        return bool(self._queues)


class MessageServing:
    """The loop-independent half of a message server (see the module docstring)."""

    def __init__(
        self,
        endpoint: Listener | DatagramListener,
        handler: MessageHandler,
        *,
        max_clients: int | None,
        max_outbox: int,
        on_connect: Hook | None,
        on_close: Hook | None,
        on_eof: Hook | None = None,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    ) -> None:
        self._endpoint = endpoint
        self._drain_timeout = check_seconds("drain_timeout", drain_timeout)
        self._draining = False  # handed over: serving the clients we have, accepting none
        self._handler = handler
        self._max_clients = max_clients
        self._max_outbox = max_outbox
        self._on_connect = on_connect
        self._on_close = on_close
        self._on_eof = on_eof
        self._conns: dict[int, Connection] = {}
        self._ids = itertools.count(1)
        size = RECV_CHUNK if endpoint.type == "stream" else endpoint.max_frame
        # One read buffer for every client. A packet is read whole into it; a larger one
        # is reported truncated (MSG_TRUNC) and refused.
        self._buffer = memoryview(bytearray(size))
        # Every client's socket and the listener, in one epoll set, whatever runs the loop:
        # the blocking server waits on it, the asyncio one watches its descriptor.
        self._epoll = select.epoll()
        self._loop_thread = 0
        self._stopping = False
        self._watching_listener = False
        self._backing_off = False
        self._backoff = Backoff()
        self._unsent: UnsentReplies | None = None  # datagram replies waiting for room
        self._retrying = False  # a timer will call _retry_datagrams

    @property
    def address(self) -> object:
        return self._endpoint.address

    @property
    def active_clients(self) -> int:
        """Clients connected now."""
        return len(self._conns)

    # -- the loop's part ------------------------------------------------------------------
    def call_soon(self, callback: Callable[..., object], *args: Any) -> None:
        raise NotImplementedError

    def _retry_accept_in(self, delay: float) -> None:
        raise NotImplementedError

    def _retry_datagrams_in(self, delay: float) -> None:
        raise NotImplementedError

    def _drain_expires_in(self, delay: float) -> None:
        raise NotImplementedError

    def _on_other(self, fd: int) -> None:
        """An event on a descriptor of the loop's own in the epoll set (a wake-up pipe)."""

    # -- the epoll set: every client's socket and the listener ------------------------------
    def _set_events(self, fd: int, mask: int) -> None:
        epoll = self._epoll
        try:
            if not mask:
                # Unwatched, not watched for nothing: epoll reports EPOLLHUP even then, and a
                # client that hung up while we do not read it would wake us in a loop.
                epoll.unregister(fd)
                return
            try:
                epoll.modify(fd, mask)
            except FileNotFoundError:
                epoll.register(fd, mask)
        except OSError:
            pass  # the socket was closed under us; its close removes it anyway

    def watch(self, conn: Connection, read: bool, write: bool, hang_up: bool) -> None:
        # EPOLLHUP is reported whatever the mask; one-shot: once, not on every wait.
        mask = _ONE_SHOT if hang_up else (_IN if read else 0) | (_OUT if write else 0)
        self._set_events(conn.fd, mask)

    def _set_listener_events(self, on: bool) -> None:
        self._set_events(self._endpoint.fileno(), _IN if on else 0)

    def _register(self, conn: Connection) -> None:
        self._epoll.register(conn.fd, _IN)

    def _unregister(self, conn: Connection) -> None:
        try:
            self._epoll.unregister(conn.fd)
        except OSError:
            pass

    def _on_events(self, ready: list[tuple[int, int]]) -> None:
        """What one epoll wait found: new clients, readable and writable ones."""
        conns = self._conns
        buffer = self._buffer
        for fd, events in ready:
            conn = conns.get(fd)
            if conn is None:
                if fd == self._endpoint.fileno():
                    self._on_listener()
                else:
                    self._on_other(fd)
                continue
            if events & _READABLE:
                conn.on_readable(buffer)
            if events & _OUT and not conn.closed:
                conn.on_writable()

    # -- the driver interface the connections use ------------------------------------------
    def in_loop(self) -> bool:
        return threading.get_ident() == self._loop_thread

    def dispatch(self, conn: Connection, message: bytes, fds: list[int]) -> None:
        self._handle(conn, message, fds)

    def ended(self, conn: Connection) -> None:
        if self._on_eof is not None:
            try:
                self._on_eof(conn)
            except Exception as exc:  # noqa: BLE001 - as a handler's
                self._handler_failed(conn, exc)

    def dropped(self, conn: Connection) -> None:
        if self._conns.pop(conn.fd, None) is None:
            return
        self._unregister(conn)
        if self._on_close is not None:
            try:
                self._on_close(conn)
            except Exception:
                log.exception("%s: on_close failed for %r", self.address, conn)
        if self._draining and not self._busy():
            self.stop()  # handed over, and the last client has gone
        elif not self._stopping and not self._backing_off:
            self._watch_listener(True)

    def send_datagram(
        self,
        listener: DatagramListener,
        to: Address,
        data: bytes | bytearray | memoryview,
        fds: Sequence[int],
    ) -> None:
        if not self.in_loop():  # a worker's reply: the loop owns the queues
            owned, dups = bytes(data), [os.dup(fd) for fd in fds]
            self.call_soon(self._send_datagram_now, listener, to, owned, dups, True)
            return
        self._send_datagram_now(listener, to, data, fds, False)

    def _send_datagram_now(
        self,
        listener: DatagramListener,
        to: Address,
        data: bytes | bytearray | memoryview,
        fds: Sequence[int],
        owned: bool,
    ) -> None:
        unsent = self._unsent
        if unsent is None:
            unsent = self._unsent = UnsentReplies(listener, self._max_outbox)
        try:
            if unsent.send(to, data, fds) and not self._retrying:
                self._retrying = True
                self._retry_datagrams_in(DATAGRAM_RETRY_FIRST)
        except UdsError as exc:  # no room left, or the listener closed (stopping)
            if not owned:
                raise  # the handler's own send: it is told
            log.log(logging.DEBUG if self._stopping else logging.WARNING, "%s", exc)
        finally:
            if owned:
                close_fds(fds)

    def _retry_datagrams(self) -> None:
        """The timer: try the waiting replies again."""
        self._retrying = False
        delay = self._unsent.retry() if self._unsent is not None else None
        if delay is not None and not self._stopping:
            self._retrying = True
            self._retry_datagrams_in(delay)

    # -- handling ------------------------------------------------------------------------
    def _handle(self, conn: Connection, message: bytes, fds: list[int]) -> None:
        if fds:
            conn.begin(fds)
        try:
            reply = self._handler(conn, message)
            if reply is not None and not conn.closed:
                if type(reply) is not bytes:
                    self._reply(conn, reply, fds)
                    return
                conn.send(reply)
        except Exception as exc:  # noqa: BLE001 - the handler's failure ends its client only
            self._handler_failed(conn, exc)
        if fds:
            conn.release_fds()

    def _reply(self, conn: Connection, reply: Any, fds: list[int]) -> None:
        """Send what the handler returned (the asyncio server also takes awaitables)."""
        try:
            conn.send(reply)
        except Exception as exc:  # noqa: BLE001 - as the handler's own failure
            self._handler_failed(conn, exc)
        if fds:
            conn.release_fds()

    def _handler_failed(self, conn: Connection, exc: BaseException) -> None:
        if self._stopping and isinstance(exc, ConnectionClosed):
            log.debug("%s: %s (stopping)", self.address, exc)  # stop() closed it
        elif isinstance(exc, UdsError):
            log.warning("%s: %s; closing %r", self.address, exc, conn)
        else:
            log.error("%s: handler failed for %r; closing it", self.address, conn, exc_info=exc)
        if isinstance(exc, ConnectionClosed) and conn.type != "dgram":
            # A send found it closing (close() from a worker, the messages after it already
            # taken): let what was queued before go out, as close() promised.
            conn.close()
        elif self.in_loop():
            conn.abort()
        else:
            self.call_soon(conn.abort)

    # -- handover ------------------------------------------------------------------------
    def _upgrader(self) -> Upgrader | None:
        """The listener's Upgrader (``handover=True``), told to let us know of a successor;
        the subclass says ``ready()`` to it once it is about to accept."""
        upgrader = self._endpoint.upgrader
        if upgrader is not None:
            upgrader.on_handed_over(lambda: self.call_soon(self._drain))
        return upgrader

    def _busy(self) -> bool:
        """Whether a handover must wait: for a client, or (a subclass says) a datagram that
        was read and is not handled yet, or a handler that still has to reply."""
        return bool(self._conns)

    def _finished_one(self) -> None:
        """A datagram's handling ended (a subclass calls this): if handed over and it was
        the last work left, end."""
        if self._draining and not self._stopping and not self._busy():
            self.stop()

    def _drain(self) -> None:
        """A successor has the listener: take nothing more from it, end once our clients
        have gone and the datagrams we took are handled, or after drain_timeout.

        A datagram listener stays open meanwhile, unwatched: the replies leave through it,
        and what arrives is left in the socket's queue, for the successor."""
        if self._stopping:
            return
        self._draining = True
        self._watch_listener(False)
        if not self._busy():
            self.stop()
            return
        if isinstance(self._endpoint, DatagramListener):
            log.info(
                DATAGRAMS_HANDED_OVER,
                self.address,
                self._drain_timeout,
            )
        else:
            log.info(
                "%s: handed over; finishing %d client(s), for at most %g s",
                self.address,
                len(self._conns),
                self._drain_timeout,
            )
        self._drain_expires_in(self._drain_timeout)

    def _drain_expired(self) -> None:
        if self._stopping:
            return
        if isinstance(self._endpoint, DatagramListener):
            log.warning(
                DATAGRAMS_LEFT,
                self.address,
                self._drain_timeout,
            )
        else:
            log.warning(
                "%s: %d client(s) still connected %g s after the handover; closing them",
                self.address,
                len(self._conns),
                self._drain_timeout,
            )
        self.stop()

    def stop(self) -> None:
        raise NotImplementedError

    # -- the listener --------------------------------------------------------------------
    def _watch_listener(self, on: bool) -> None:
        if self._endpoint.closed:
            self._watching_listener = False  # stopped: its descriptor is gone
            return
        if on and self._draining:
            on = False
        if on and self._max_clients is not None and len(self._conns) >= self._max_clients:
            on = False
        if on != self._watching_listener:
            self._watching_listener = on
            self._set_listener_events(on)

    def _accept_again(self) -> None:
        """The back-off after running out of descriptors is over: look again."""
        self._backing_off = False
        if not self._stopping:
            self._watch_listener(True)

    def _on_listener(self) -> None:
        if not self._watching_listener:
            # Unwatched earlier in this same wake-up (stopping, handed over, full): a client
            # accepted now would only be closed; left queued, the successor (or the next
            # look) takes it.
            return
        endpoint = self._endpoint
        if isinstance(endpoint, DatagramListener):
            self._on_datagrams(endpoint)
            return
        sock = endpoint.socket
        for _ in range(ACCEPT_BATCH):
            if self._max_clients is not None and len(self._conns) >= self._max_clients:
                self._watch_listener(False)  # a slot frees when a client leaves
                return
            try:
                client, _ = sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                verdict = classify(exc)
                if verdict is AcceptVerdict.RETRY:
                    continue
                if verdict is AcceptVerdict.BACK_OFF:
                    self._back_off(exc)
                    return
                raise
            self._backoff.succeeded(self.address)
            self._start(endpoint, client)

    def _back_off(self, exc: OSError) -> None:
        """Out of descriptors (or kernel memory): the pending client stays queued, so the
        listener stays readable; stop watching it for a while instead of spinning."""
        delay = self._backoff.failed(exc, self.address)
        self._watch_listener(False)
        self._backing_off = True
        self._retry_accept_in(delay)

    def _start(self, listener: Listener, client: socket.socket) -> None:
        admitted = admit(
            client, listener.address, listener.policy, listener.buffers, blocking=False
        )
        if not isinstance(admitted, Admitted):
            return
        framing = (
            make_framing(listener.framing, max_frame=listener.max_frame)
            if listener.type == "stream"
            else None
        )
        conn = Connection(
            client,
            self,
            id=next(self._ids),
            kind=listener.type,
            framing=framing,
            peer=admitted.peer,
            remote=admitted.remote,
            max_fds=listener.max_fds,
            max_outbox=self._max_outbox,
            loop_thread=self._loop_thread,
        )
        self._conns[conn.fd] = conn
        self._register(conn)
        if self._on_connect is not None:
            try:
                self._on_connect(conn)
            except Exception as exc:  # noqa: BLE001 - as a handler's
                self._handler_failed(conn, exc)
            if not conn.closed:
                conn.flush()  # what on_connect sent (a greeting) goes out now, not after a read

    def _on_datagrams(self, listener: DatagramListener) -> None:
        for _ in range(DATAGRAMS_PER_WAKEUP):
            if not self._watching_listener:
                return  # the workers' backlog is full: the rest wait in the kernel's queue
            try:
                datagram = listener.recv()
            except Timeout:
                return  # nothing more (EAGAIN)
            except UdsError as exc:  # a truncated datagram, bad control data: report, go on
                log.warning("%s: %s", listener.address, exc)
                continue
            conn = Connection(
                None,
                self,
                id=next(self._ids),
                kind="dgram",
                framing=None,
                peer=datagram.peer,
                remote=datagram.sender,
                max_fds=listener.max_fds,
                max_outbox=self._max_outbox,
                loop_thread=self._loop_thread,
                listener=listener,
            )
            self.dispatch(conn, datagram.data, list(datagram.fds))

    def _close_clients(self) -> None:
        """Send what the kernel takes now (nothing waits for slow clients), then close."""
        if self._unsent is not None:
            self._unsent.retry()
            self._unsent.close()
        for conn in list(self._conns.values()):
            conn.flush()
            conn.abort()
