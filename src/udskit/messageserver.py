"""``MessageServer`` and ``serve_messages()``: one epoll thread serving every client, with a
handler called per message.

``handler(conn, message)`` returns the reply (or None) or calls ``conn.send``; it runs in the
serving thread, so it must not block: with ``workers=N`` it runs in a pool of N threads
instead, each connection's messages in order, one at a time. This is the server for many
clients: per client it holds a socket and a small :class:`~udskit.Connection`, no thread and
no buffer of its own (reads go through one buffer for all); the replies of a wake-up leave
in one system call. For a handler that holds a conversation (reads, thinks, reads again),
use the thread-per-client :class:`udskit.Server`.

What one wake-up does: accept every pending client (up to ACCEPT_BATCH); read each readable
client once (a stream) or up to PACKETS_PER_WAKEUP packets (seqpacket), decode, call the
handler per message, send the replies. A client whose unsent replies exceed ``max_outbox``
is not read again until they drain to a quarter of that: only it waits. At ``max_clients``
the listener is not watched until a client leaves (further clients wait in the kernel's
backlog); out of descriptors, it is not watched for a back-off period (see
:mod:`udskit.server` on accept errors): never a spin.

Datagrams: every datagram is a message whose ``conn`` replies to its sender.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import select
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from types import FrameType
from typing import Any, Final

from .address import AddressLike
from .admission import Admitted, admit
from .channel import RECV_CHUNK
from .connection import DEFAULT_MAX_OUTBOX, Connection, Reply
from .errors import ConnectionClosed, Timeout, UdsError
from .listening import DatagramListener, Listener, listen
from .options import check_max_clients
from .proto import make_framing
from .server import (
    _RESOURCE_ERRNOS,
    _RETRY_ERRNOS,
    ACCEPT_BACKOFF,
    ACCEPT_BACKOFF_MAX,
    SHUTDOWN_GRACE,
)

__all__ = ["MessageHandler", "MessageServer", "serve_messages"]

log = logging.getLogger("udskit")

MessageHandler = Callable[[Connection, bytes], Reply]

#: Clients accepted per wake-up at most: a burst of thousands is taken in a few passes,
#: with the clients already connected served in between.
ACCEPT_BATCH: Final = 256

#: Datagrams read per wake-up at most, for the same reason.
DATAGRAMS_PER_WAKEUP: Final = 64

#: Most workers a pool may have: each is a thread; more than this is a design to rethink.
MAX_WORKERS: Final = 1024

#: Messages queued for a worker per connection before that client is not read any more
#: (until the worker catches up): the pool's memory stays bounded by clients x this.
WORKER_BACKLOG: Final = 64

_IN: Final = select.EPOLLIN
_OUT: Final = select.EPOLLOUT
_ERRS: Final = select.EPOLLERR | select.EPOLLHUP


class MessageServer:
    """A server on ``address`` calling ``handler(conn, message)`` for every message.

    ``listen_options`` are those of :func:`udskit.listen` (type, mode, allow, framing,
    max_frame, max_fds, backlog, ...); the socket is claimed when the server is created.
    ``workers``: run the handler in a pool of this many threads (0: in the serving thread).
    ``max_clients``: clients served at once (None: as many as descriptors allow).
    ``max_outbox``: bytes of unsent replies per client before it is no longer read.
    ``on_connect(conn)`` / ``on_close(conn)``: called in the serving thread as a client
    arrives and leaves (not for datagrams).
    """

    def __init__(
        self,
        address: AddressLike,
        handler: MessageHandler,
        *,
        workers: int = 0,
        max_clients: int | None = None,
        max_outbox: int = DEFAULT_MAX_OUTBOX,
        on_connect: Callable[[Connection], object] | None = None,
        on_close: Callable[[Connection], object] | None = None,
        **listen_options: object,
    ) -> None:
        if not callable(handler):
            raise TypeError(f"handler must be a function of (conn, message), not {handler!r}")
        if isinstance(workers, bool) or not isinstance(workers, int):
            raise TypeError(f"workers must be a number of threads, not {workers!r}")
        if not 0 <= workers <= MAX_WORKERS:
            raise ValueError(f"workers must be from 0 to {MAX_WORKERS}, not {workers}")
        if isinstance(max_outbox, bool) or not isinstance(max_outbox, int) or max_outbox < 1:
            raise ValueError(f"max_outbox must be a positive number of bytes, not {max_outbox!r}")
        for name, hook in (("on_connect", on_connect), ("on_close", on_close)):
            if hook is not None and not callable(hook):
                raise TypeError(f"{name} must be a function of a connection, not {hook!r}")
        check_max_clients(max_clients)
        self._handler = handler
        self._workers = workers
        self._max_clients = max_clients
        self._max_outbox = max_outbox
        self._on_connect = on_connect
        self._on_close = on_close
        self._endpoint: Listener | DatagramListener = listen(address, **listen_options)  # type: ignore[call-overload]
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll.register(self._wake_r, _IN)
        self._calls: deque[tuple[Callable[..., object], tuple[Any, ...]]] = deque()
        self._woken = False
        self._conns: dict[int, Connection] = {}
        self._ids = itertools.count(1)
        self._buffer = memoryview(bytearray(self._buffer_size()))
        self._loop_thread: int | None = None
        self._stopping = False
        self._served = False
        self._watching_listener = False
        self._retry_at: float | None = None  # accept back-off: when to look again
        self._backoff = ACCEPT_BACKOFF
        self._pool: queue.SimpleQueue[Connection | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._inboxes: dict[int, deque[tuple[bytes, list[int]]]] = {}

    def _buffer_size(self) -> int:
        endpoint = self._endpoint
        if endpoint.type == "stream":
            return RECV_CHUNK
        # A packet: whole in one read. A larger one is reported truncated (MSG_TRUNC).
        return endpoint.max_frame

    @property
    def address(self) -> object:
        return self._endpoint.address

    @property
    def listener(self) -> Listener | DatagramListener:
        return self._endpoint

    @property
    def active_clients(self) -> int:
        return len(self._conns)

    # -- the driver interface the connections use ------------------------------------------
    def watch(self, conn: Connection, read: bool, write: bool) -> None:
        events = (_IN if read else 0) | (_OUT if write else 0)
        try:
            # epoll reports EPOLLHUP and EPOLLERR whatever it is asked: a client gone while
            # its connection waits (a worker has its messages) would wake every poll, a
            # spin. Asking for nothing, one-shot: reported once, then quiet until re-armed.
            self._epoll.modify(conn.fd, events or select.EPOLLONESHOT)
        except OSError:
            pass  # the socket was closed under us; its close removes it anyway

    def in_loop(self) -> bool:
        return threading.get_ident() == self._loop_thread

    def call_soon(self, callback: Callable[..., object], *args: Any) -> None:
        self._calls.append((callback, args))
        # From the loop thread no wake-up is needed: _run runs the calls after each poll.
        if not self._woken and threading.get_ident() != self._loop_thread:
            self._woken = True
            self._wake()

    def dispatch(self, conn: Connection, message: bytes, fds: list[int]) -> None:
        if self._workers:
            inbox = self._inboxes.setdefault(conn.id, deque())
            inbox.append((message, fds))
            if not conn.busy:
                conn.busy = True
                self._pool.put(conn)
            if len(inbox) >= WORKER_BACKLOG:
                conn.hold(True)
            return
        self._handle(conn, message, fds)

    def dropped(self, conn: Connection) -> None:
        if self._conns.pop(conn.fd, None) is None:
            return
        if not conn.busy:  # else the worker still owns its queue; _worked empties it
            self._drop_inbox(conn)
        try:
            self._epoll.unregister(conn.fd)
        except OSError:
            pass
        if self._on_close is not None:
            try:
                self._on_close(conn)
            except Exception:
                log.exception("%s: on_close failed for %r", self.address, conn)
        if not self._stopping and not self._watching_listener and self._retry_at is None:
            self._watch_listener(True)

    # -- handling ------------------------------------------------------------------------
    def _handle(self, conn: Connection, message: bytes, fds: list[int]) -> None:
        if fds:
            conn.begin(fds)
        try:
            reply = self._handler(conn, message)
            if reply is not None and not conn.closed:
                conn.send(reply)
        except Exception as exc:  # noqa: BLE001 - the handler's failure ends its client only
            self._handler_failed(conn, exc)
        finally:
            if fds:
                conn.release_fds()

    def _handler_failed(self, conn: Connection, exc: Exception) -> None:
        if self._stopping and isinstance(exc, ConnectionClosed):
            log.debug("%s: %s (stopping)", self.address, exc)  # stop() closed it
        elif isinstance(exc, UdsError):
            log.warning("%s: %s; closing %r", self.address, exc, conn)
        else:
            log.exception("%s: handler failed for %r; closing it", self.address, conn)
        if isinstance(exc, ConnectionClosed) and conn.type != "dgram":
            # A send found it closing (close() from a worker, the messages after it already
            # taken): let what was queued before go out, as close() promised.
            conn.close()
        elif self.in_loop():
            conn.abort()
        else:
            self.call_soon(conn.abort)

    def _work(self) -> None:
        """A worker: take a connection, handle what is queued for it, hand it back."""
        while True:
            conn = self._pool.get()
            if conn is None:
                return
            inbox = self._inboxes.get(conn.id)
            count = len(inbox) if inbox is not None else 0
            for _ in range(count):
                assert inbox is not None
                message, fds = inbox.popleft()
                if conn.closed:
                    _close_all(fds)
                    continue
                self._handle(conn, message, fds)
            self.call_soon(self._worked, conn)

    def _worked(self, conn: Connection) -> None:
        """Back in the loop thread: more messages for ``conn``, or it is free."""
        if conn.closed:
            conn.busy = False
            self._drop_inbox(conn)
            return
        inbox = self._inboxes.get(conn.id)
        if inbox:
            self._pool.put(conn)
            if len(inbox) < WORKER_BACKLOG:
                conn.hold(False)
            return
        conn.busy = False
        # Forgotten when empty (dispatch makes another): else one per datagram, forever.
        self._inboxes.pop(conn.id, None)
        conn.hold(False)
        conn.flush()

    def _drop_inbox(self, conn: Connection) -> None:
        inbox = self._inboxes.pop(conn.id, None)
        if inbox:
            for _, fds in inbox:
                _close_all(fds)

    # -- serving -------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the server to stop; safe from handlers, other threads and signal handlers."""
        self._stopping = True
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except OSError:
            pass  # full (a wake-up is pending anyway) or closed

    def serve_forever(self) -> None:
        """Serve until ``stop()``; then close the listener (removing its socket file), send
        what can be sent without waiting, close every client and end the workers."""
        if self._served:
            raise RuntimeError("serve_forever() can run once per MessageServer")
        self._served = True
        self._loop_thread = threading.get_ident()
        endpoint = self._endpoint
        endpoint.socket.setblocking(False)
        for number in range(self._workers):
            thread = threading.Thread(
                target=self._work, name=f"udskit-worker-{number}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        self._epoll.register(endpoint.fileno(), _IN)
        self._watching_listener = True
        try:
            self._run()
        finally:
            self._shutdown()

    def _run(self) -> None:
        epoll = self._epoll
        conns = self._conns
        listener_fd = self._endpoint.fileno()
        wake_fd = self._wake_r
        buffer = self._buffer
        while not self._stopping:
            timeout = -1.0
            if self._retry_at is not None:
                timeout = max(0.0, self._retry_at - time.monotonic())
            for fd, events in epoll.poll(timeout):
                if fd == listener_fd:
                    self._on_listener()
                    continue
                if fd == wake_fd:
                    self._on_wake()
                    continue
                conn = conns.get(fd)
                if conn is None:
                    continue
                if events & (_IN | _ERRS):
                    conn.on_readable(buffer)
                if events & _OUT and not conn.closed:
                    conn.on_writable()
            if self._calls:
                self._run_calls()
            if self._retry_at is not None and time.monotonic() >= self._retry_at:
                self._retry_at = None
                self._watch_listener(True)

    def _on_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        self._woken = False
        self._run_calls()

    def _run_calls(self) -> None:
        calls = self._calls
        while calls:
            callback, args = calls.popleft()
            callback(*args)

    def _watch_listener(self, on: bool) -> None:
        if on == self._watching_listener:
            return
        if on and self._max_clients is not None and len(self._conns) >= self._max_clients:
            return
        self._watching_listener = on
        self._epoll.modify(self._endpoint.fileno(), _IN if on else 0)

    def _on_listener(self) -> None:
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
                if exc.errno in _RETRY_ERRNOS:
                    continue
                if exc.errno in _RESOURCE_ERRNOS:
                    self._back_off(exc)
                    return
                raise
            self._backoff = ACCEPT_BACKOFF
            self._start(endpoint, client)

    def _back_off(self, exc: OSError) -> None:
        log.warning(
            "%s: accept failed (%s); not accepting for %.2f s",
            self.address,
            os.strerror(exc.errno or 0),
            self._backoff,
        )
        self._watch_listener(False)
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, ACCEPT_BACKOFF_MAX)

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
            loop_thread=self._loop_thread or 0,
        )
        self._conns[conn.fd] = conn
        self._epoll.register(conn.fd, _IN)
        if self._on_connect is not None:
            try:
                self._on_connect(conn)
            except Exception as exc:  # noqa: BLE001 - as a handler's
                self._handler_failed(conn, exc)

    def _on_datagrams(self, listener: DatagramListener) -> None:
        for _ in range(DATAGRAMS_PER_WAKEUP):
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
                loop_thread=self._loop_thread or 0,
                listener=listener,
            )
            self.dispatch(conn, datagram.data, list(datagram.fds))

    def _shutdown(self) -> None:
        self._stopping = True
        self._endpoint.close()
        # The clients first: a worker waiting for room in an outbox waits on this loop,
        # which drains no more; closing its client releases it (its send raises).
        self._on_wake()  # replies the workers handed over
        for conn in list(self._conns.values()):
            conn.flush()  # what the kernel takes now; nothing waits for slow clients
            conn.abort()
        for _ in self._threads:
            self._pool.put(None)
        deadline = time.monotonic() + SHUTDOWN_GRACE
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        late = sum(thread.is_alive() for thread in self._threads)
        if late:
            log.warning(
                "%s: %d worker(s) still running %g s after stop; leaving them behind",
                self.address,
                late,
                SHUTDOWN_GRACE,
            )
        self._on_wake()  # what the workers handed over since: closes its descriptors
        self._epoll.close()
        # Retired before closed: a later stop(), close() or late worker must not write to
        # these numbers, which the next open() in any thread may get.
        wake_fds = (self._wake_r, self._wake_w)
        self._woken = True  # call_soon() no longer wakes anyone
        self._wake_w = -1  # stop() writes to -1: EBADF, ignored
        for fd in wake_fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def close(self) -> None:
        """Stop and release everything, whether or not serve_forever ran."""
        self.stop()
        if not self._served:
            self._served = True
            self._shutdown()

    def __enter__(self) -> MessageServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def serve_messages(
    address: AddressLike,
    handler: MessageHandler,
    **options: Any,
) -> None:
    """Serve ``address`` with a :class:`MessageServer` until SIGINT or SIGTERM (or
    ``stop()``); in the main thread those signals stop it cleanly (socket file removed)."""
    server = MessageServer(address, handler, **options)
    previous: dict[signal.Signals, object] = {}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("%s: received %s, stopping", server.address, signal.Signals(signum).name)
        server.stop()

    try:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                previous[signum] = signal.signal(signum, on_signal)
        server.serve_forever()
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)  # type: ignore[arg-type]
        server.close()
