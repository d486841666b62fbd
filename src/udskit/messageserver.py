"""``MessageServer`` and ``serve_messages()``: one epoll thread serving every client, with a
handler called per message.

``handler(conn, message)`` returns the reply (or None) or calls ``conn.send``; it runs in the
serving thread, so it must not block: with ``workers=N`` it runs in a pool of N threads
instead, each connection's messages in order, one at a time (datagrams, each its own
"connection", may then be handled in parallel). This is the server for many clients: per
client it holds a socket and a small :class:`~udskit.Connection`, no thread and no buffer of
its own (reads go through one buffer for all); the replies of a wake-up leave in one system
call. For a handler that holds a conversation (reads, thinks, reads again), use the
thread-per-client :class:`udskit.Server`.

What one wake-up does: accept every pending client (up to ACCEPT_BATCH); read each readable
client once (a stream) or up to PACKETS_PER_WAKEUP packets (seqpacket), decode, call the
handler per message, send the replies. A client whose unsent replies exceed ``max_outbox``
is not read again until they drain to a quarter of that: only it waits. At ``max_clients``
the listener is not watched until a client leaves (further clients wait in the kernel's
backlog); out of descriptors, it is not watched for a back-off period (see
:mod:`udskit.server` on accept errors): never a spin.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from types import FrameType
from typing import Any, Final

from .address import AddressLike
from .ancillary import close_fds
from .connection import DEFAULT_MAX_OUTBOX, Connection
from .listening import DatagramListener, Listener, listen
from .server import SHUTDOWN_GRACE
from .serving import Hook, MessageHandler, MessageServing, check_server_options

__all__ = ["MessageHandler", "MessageServer", "serve_messages"]

log = logging.getLogger("udskit")

#: Most workers a pool may have: each is a thread; more than this is a design to rethink.
MAX_WORKERS: Final = 1024

#: Messages queued for a worker per connection before that client is not read any more
#: (until the worker catches up): the pool's memory stays bounded by clients x this. On a
#: datagram server, datagrams queued for the workers in all before the socket is not read
#: any more: further ones wait in the kernel's queue, and their senders see it full.
WORKER_BACKLOG: Final = 64

_IN: Final = select.EPOLLIN
_OUT: Final = select.EPOLLOUT
_ERRS: Final = select.EPOLLERR | select.EPOLLHUP
_EDGE: Final = select.EPOLLET


class MessageServer(MessageServing):
    """A server on ``address`` calling ``handler(conn, message)`` for every message.

    ``listen_options`` are those of :func:`udskit.listen` (type, mode, allow, framing,
    max_frame, max_fds, backlog, ...); the socket is claimed when the server is created.
    ``workers``: run the handler in a pool of this many threads (0: in the serving thread).
    ``max_clients``: clients served at once (None: as many as descriptors allow).
    ``max_outbox``: bytes of unsent replies per client before it is no longer read.
    ``on_connect(conn)`` / ``on_close(conn)``: called in the serving thread as a client
    arrives and leaves (not for datagrams). ``on_eof(conn)``: called in the serving thread
    when the client has sent all it will (its end of stream); replies may still be sent
    until the connection closes, which it does once they have gone out, unless ``conn.busy``
    is set (then whoever set it closes it).
    """

    def __init__(
        self,
        address: AddressLike,
        handler: MessageHandler,
        *,
        workers: int = 0,
        max_clients: int | None = None,
        max_outbox: int = DEFAULT_MAX_OUTBOX,
        on_connect: Hook | None = None,
        on_close: Hook | None = None,
        on_eof: Hook | None = None,
        **listen_options: object,
    ) -> None:
        check_server_options(
            handler,
            max_clients,
            max_outbox,
            {"on_connect": on_connect, "on_close": on_close, "on_eof": on_eof},
        )
        if isinstance(workers, bool) or not isinstance(workers, int):
            raise TypeError(f"workers must be a number of threads, not {workers!r}")
        if not 0 <= workers <= MAX_WORKERS:
            raise ValueError(f"workers must be from 0 to {MAX_WORKERS}, not {workers}")
        endpoint: Listener | DatagramListener = listen(address, **listen_options)  # type: ignore[call-overload]
        super().__init__(
            endpoint,
            handler,
            max_clients=max_clients,
            max_outbox=max_outbox,
            on_connect=on_connect,
            on_close=on_close,
            on_eof=on_eof,
        )
        self._workers = workers
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll.register(self._wake_r, _IN)
        self._calls: deque[tuple[Callable[..., object], tuple[Any, ...]]] = deque()
        self._woken = False
        self._served = False
        self._retry_at: float | None = None  # accept back-off: when to look again
        self._pool: queue.SimpleQueue[Connection | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._inboxes: dict[int, deque[tuple[bytes, list[int]]]] = {}
        self._datagrams_queued = 0  # handed to the workers, not handled yet

    @property
    def listener(self) -> Listener | DatagramListener:
        return self._endpoint

    # -- the loop ------------------------------------------------------------------------
    def watch(self, conn: Connection, read: bool, write: bool) -> None:
        # Watching nothing, edge-triggered: epoll reports EPOLLHUP and EPOLLERR whatever
        # is asked, and level-triggered, a client gone while its worker is busy would wake
        # every wait until the worker is done.
        events = (_IN if read else 0) | (_OUT if write else 0) if read or write else _EDGE
        try:
            self._epoll.modify(conn.fd, events)
        except OSError:
            pass  # the socket was closed under us; its close removes it anyway

    def call_soon(self, callback: Callable[..., object], *args: Any) -> None:
        # Append first, then look at the flag: the loop clears it before it runs the calls,
        # so a call appended meanwhile is either run in this pass or wakes the next.
        self._calls.append((callback, args))
        if not self._woken:
            self._woken = True
            self._wake()

    def _set_listener_events(self, on: bool) -> None:
        self._epoll.modify(self._endpoint.fileno(), _IN if on else 0)

    def _retry_accept_in(self, delay: float) -> None:
        self._retry_at = time.monotonic() + delay

    def _register(self, conn: Connection) -> None:
        self._epoll.register(conn.fd, _IN)

    def _unregister(self, conn: Connection) -> None:
        if not conn.busy:  # else the worker still owns its queue; _worked empties it
            self._drop_inbox(conn)
        try:
            self._epoll.unregister(conn.fd)
        except OSError:
            pass

    # -- workers -------------------------------------------------------------------------
    def dispatch(self, conn: Connection, message: bytes, fds: list[int]) -> None:
        if not self._workers:
            self._handle(conn, message, fds)
            return
        inbox = self._inboxes.setdefault(conn.id, deque())
        inbox.append((message, fds))
        if not conn.busy:
            conn.busy = True
            self._pool.put(conn)
        if conn.type == "dgram":  # a connection per datagram: the backlog is the server's
            self._datagrams_queued += 1
            if self._datagrams_queued >= WORKER_BACKLOG:
                self._watch_listener(False)
        elif len(inbox) >= WORKER_BACKLOG:
            conn.hold(True)

    def _work(self) -> None:
        """A worker: take a connection, handle what is queued for it, hand it back."""
        while True:
            conn = self._pool.get()
            if conn is None:
                return
            inbox = self._inboxes.get(conn.id)
            for _ in range(len(inbox) if inbox is not None else 0):
                assert inbox is not None
                message, fds = inbox.popleft()
                if conn.closed:
                    close_fds(fds)
                    continue
                self._handle(conn, message, fds)
            self.call_soon(self._worked, conn)

    def _worked(self, conn: Connection) -> None:
        """Back in the loop thread: more messages for ``conn``, or it is free."""
        if conn.type == "dgram":  # its one datagram is handled
            self._datagrams_queued -= 1
            if self._datagrams_queued < WORKER_BACKLOG and not self._stopping:
                self._watch_listener(True)
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
        self._inboxes.pop(conn.id, None)
        conn.busy = False
        conn.hold(False)
        conn.flush()

    def _drop_inbox(self, conn: Connection) -> None:
        inbox = self._inboxes.pop(conn.id, None)
        if inbox:
            for _, fds in inbox:
                close_fds(fds)

    # -- serving -------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the server to stop; safe from handlers, other threads and signal handlers."""
        self._stopping = True
        self._wake()

    def _wake(self) -> None:
        fd = self._wake_w
        if fd < 0:
            return  # the server is closed: nothing to wake
        try:
            os.write(fd, b"!")
        except OSError:
            pass  # full (a wake-up is pending anyway)

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
            if self._retry_at is not None and time.monotonic() >= self._retry_at:
                self._retry_at = None
                self._accept_again()

    def _on_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        self._woken = False
        calls = self._calls
        while calls:
            callback, args = calls.popleft()
            callback(*args)

    def _shutdown(self) -> None:
        self._stopping = True
        self._endpoint.close()
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
        self._on_wake()  # replies the workers handed over
        self._close_clients()
        self._epoll.close()
        wake_w, self._wake_w = self._wake_w, -1
        # -1 before the close: a late call_soon (a worker left behind, a thread still
        # sending) must not write into whatever reuses the descriptor's number.
        for fd in (self._wake_r, wake_w):
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


def serve_messages(address: AddressLike, handler: MessageHandler, **options: Any) -> None:
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
