"""``MessageServer`` and ``serve_messages()``: one epoll thread serving every client, with a
handler called per message.

``handler(conn, message)`` returns the reply (or None) or calls ``conn.send``; it runs in the
serving thread, so it must not block: with ``workers=N`` it runs in a pool of N threads
instead, each connection's messages in order, one at a time (and each datagram sender's).
This is the server for many clients: per client it holds a socket and a small
:class:`~udskit.Connection`, no thread and no buffer of its own (reads go through one buffer
for all); the replies of a wake-up leave in one system call. For a handler that holds a
conversation (reads, thinks, reads again), use the thread-per-client :class:`udskit.Server`.

What one wake-up does: accept every pending client (up to ACCEPT_BATCH); read each readable
client once (a stream) or up to PACKETS_PER_WAKEUP packets (seqpacket), decode, call the
handler per message, send the replies. A client whose unsent replies exceed ``max_outbox``
is not read again until they drain to a quarter of that: only it waits. At ``max_clients``
the listener is not watched until a client leaves (further clients wait in the kernel's
backlog); out of descriptors, it is not watched for a back-off period (see
:mod:`udskit.accepting` on accept errors): never a spin.
"""

from __future__ import annotations

import logging
import queue
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

from .address import AddressLike
from .ancillary import close_fds
from .connection import DEFAULT_MAX_OUTBOX, Connection
from .listening import DatagramListener, Listener, listen
from .options import DEFAULT_DRAIN_TIMEOUT, check_seconds
from .server import SHUTDOWN_GRACE, run_until_signalled
from .serving import (
    Hook,
    MessageHandler,
    MessageServing,
    check_server_options,
    refuse_shared_memory,
)
from .wakeup import WakeUp, woken_by_signals

__all__ = ["MessageHandler", "MessageServer", "serve_messages"]

log = logging.getLogger("udskit")

#: Most workers a pool may have: each is a thread; more than this is a design to rethink.
MAX_WORKERS: Final = 1024

#: Messages queued for a worker per connection before that client is not read any more
#: (until the worker catches up): the pool's memory stays bounded by clients x this. On a
#: datagram server, per worker lane: once this many per lane wait, the socket is not read
#: any more; further datagrams wait in the kernel's queue, and their senders see it full.
WORKER_BACKLOG: Final = 64


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
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        **listen_options: object,
    ) -> None:
        check_server_options(
            handler,
            max_clients,
            max_outbox,
            {"on_connect": on_connect, "on_close": on_close, "on_eof": on_eof},
        )
        refuse_shared_memory(listen_options)
        if isinstance(workers, bool) or not isinstance(workers, int):
            raise TypeError(f"workers must be a number of threads, not {workers!r}")
        if not 0 <= workers <= MAX_WORKERS:
            raise ValueError(f"workers must be from 0 to {MAX_WORKERS}, not {workers}")
        check_seconds("drain_timeout", drain_timeout)  # before the socket is claimed
        endpoint: Listener | DatagramListener = listen(address, **listen_options)  # type: ignore[call-overload]
        super().__init__(
            endpoint,
            handler,
            max_clients=max_clients,
            max_outbox=max_outbox,
            on_connect=on_connect,
            on_close=on_close,
            on_eof=on_eof,
            drain_timeout=drain_timeout,
        )
        self._workers = workers
        self._wakeup = WakeUp()
        self._epoll.register(self._wakeup.fd, select.EPOLLIN)
        self._calls: deque[tuple[Callable[..., object], tuple[Any, ...]]] = deque()
        self._woken = False
        self._served = False
        self._done = threading.Event()  # serve_forever() has ended: close() waits for it
        self._retry_at: float | None = None  # accept back-off: when to look again
        self._datagrams_at: float | None = None  # when to retry waiting datagram replies
        self._drain_at: float | None = None  # handed over: when to close the clients left
        self._pool: queue.SimpleQueue[int | None] = queue.SimpleQueue()  # inboxes to handle
        self._threads: list[threading.Thread] = []
        self._inboxes: dict[int, deque[tuple[Connection, bytes, list[int]]]] = {}
        self._running: dict[int, Connection | None] = {}  # inboxes a worker has
        self._queued_datagrams = 0
        if not workers:
            self.dispatch = self._handle  # type: ignore[method-assign]  # one call less a message

    @property
    def listener(self) -> Listener | DatagramListener:
        return self._endpoint

    # -- the loop ------------------------------------------------------------------------
    def call_soon(self, callback: Callable[..., object], *args: Any) -> None:
        # Append first, then look at the flag: the loop clears it before it runs the calls,
        # so a call appended meanwhile is either run in this pass or wakes the next.
        self._calls.append((callback, args))
        # From the loop thread no wake-up is needed: _run runs the calls after each poll.
        if not self._woken and threading.get_ident() != self._loop_thread:
            self._woken = True
            self._wake()

    def _retry_accept_in(self, delay: float) -> None:
        self._retry_at = time.monotonic() + delay

    def _drain_expires_in(self, delay: float) -> None:
        self._drain_at = time.monotonic() + delay

    def _retry_datagrams_in(self, delay: float) -> None:
        self._datagrams_at = time.monotonic() + delay

    def _unregister(self, conn: Connection) -> None:
        if conn.id not in self._running:  # else a worker owns its inbox; _worked empties it
            self._drop_inbox(conn.id)
        super()._unregister(conn)

    def _on_other(self, fd: int) -> None:
        if fd == self._wakeup.fd:
            self._on_wake()

    # -- workers -------------------------------------------------------------------------
    # A connection's messages wait in its inbox for one worker at a time, so they are
    # handled in order. Datagrams have no connection: each sender's go to one of `workers`
    # lanes by its address, which keeps each sender's in order too.
    def dispatch(self, conn: Connection, message: bytes, fds: list[int]) -> None:
        if not self._workers:
            self._handle(conn, message, fds)
            return
        if conn.fd >= 0:
            key, owner = conn.id, conn
        else:  # a datagram
            key, owner = -1 - hash(conn.remote) % self._workers, None
        inbox = self._inboxes.setdefault(key, deque())
        inbox.append((conn, message, fds))
        if key not in self._running:
            self._running[key] = owner
            if owner is not None:
                owner.busy = True
            self._pool.put(key)
        if owner is None:
            self._queued_datagrams += 1
            if self._queued_datagrams >= WORKER_BACKLOG * self._workers:
                self._watch_listener(False)  # until the workers catch up
        elif len(inbox) >= WORKER_BACKLOG:
            owner.hold(True)

    def _work(self) -> None:
        """A worker: take an inbox, handle what is in it, hand it back."""
        while True:
            key = self._pool.get()
            if key is None:
                return
            inbox = self._inboxes[key]
            for _ in range(len(inbox)):
                conn, message, fds = inbox.popleft()
                if conn.closed:
                    close_fds(fds)
                else:
                    self._handle(conn, message, fds)
            self.call_soon(self._worked, key)

    def _worked(self, key: int) -> None:
        """Back in the loop thread: more to handle for ``key``, or its inbox is free."""
        owner = self._running[key]
        inbox = self._inboxes[key]
        if owner is None:
            queued = sum(len(waiting) for lane, waiting in self._inboxes.items() if lane < 0)
            self._queued_datagrams = queued
            if queued < WORKER_BACKLOG * self._workers and not self._backing_off:
                self._watch_listener(not self._stopping)
        if inbox and (owner is None or not owner.closed):
            self._pool.put(key)
            if owner is not None and len(inbox) < WORKER_BACKLOG:
                owner.hold(False)
            return
        del self._running[key]
        self._drop_inbox(key)
        if owner is None:
            self._finished_one()
            return
        owner.busy = False
        if not owner.closed:
            owner.hold(False)
            owner.flush()

    def _busy(self) -> bool:
        # A datagram lane a worker has: datagrams read and not yet handled, or a handler
        # that runs; handed over, they are handled before the socket closes.
        return super()._busy() or any(key < 0 for key in self._running)

    def _drop_inbox(self, key: int) -> None:
        for _, _, fds in self._inboxes.pop(key, ()):
            close_fds(fds)

    # -- serving -------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the server to stop; safe from handlers, other threads and signal handlers."""
        self._stopping = True
        self._wake()

    def _wake(self) -> None:
        self._wakeup.wake()

    def serve_forever(self) -> None:
        """Serve until ``stop()``; then close the listener (removing its socket file), send
        what can be sent without waiting, close every client and end the workers. A
        datagram listener's socket closes after the workers (SHUTDOWN_GRACE at most), so
        the replies of handlers already running still go out; its file goes at once."""
        if self._served:
            raise RuntimeError("serve_forever() can run once per MessageServer")
        self._served = True
        self._loop_thread = threading.get_ident()
        try:
            self._serve()
        finally:
            self._done.set()

    def _serve(self) -> None:
        endpoint = self._endpoint
        endpoint.socket.setblocking(False)
        for number in range(self._workers):
            thread = threading.Thread(
                target=self._work, name=f"udskit-worker-{number}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        upgrader = self._upgrader()
        try:
            with woken_by_signals(self._wakeup):  # a handler's stop() is not left asleep
                if upgrader is not None:
                    upgrader.ready()  # the previous process, if any, stops accepting
                self._watch_listener(True)
                self._run()
        finally:
            self._shutdown()

    def _run(self) -> None:
        epoll = self._epoll
        while not self._stopping:
            timeout = -1.0
            timers = [
                at for at in (self._retry_at, self._datagrams_at, self._drain_at) if at is not None
            ]
            if timers:
                timeout = max(0.0, min(timers) - time.monotonic())
            self._on_events(epoll.poll(timeout))
            if self._calls:
                self._run_calls()
            if timers:
                now = time.monotonic()
                if self._retry_at is not None and now >= self._retry_at:
                    self._retry_at = None
                    self._accept_again()
                if self._datagrams_at is not None and now >= self._datagrams_at:
                    self._datagrams_at = None
                    self._retry_datagrams()
                if self._drain_at is not None and now >= self._drain_at:
                    self._drain_at = None
                    self._drain_expired()

    def _on_wake(self) -> None:
        self._wakeup.drain()
        self._woken = False
        self._run_calls()

    def _run_calls(self) -> None:
        calls = self._calls
        while calls:
            callback, args = calls.popleft()
            callback(*args)

    def _shutdown(self) -> None:
        self._stopping = True
        endpoint = self._endpoint
        if isinstance(endpoint, DatagramListener):
            # A worker's datagram reply leaves through this socket, handed to this loop
            # without waiting for it: only the file goes now (no new sender finds it), the
            # socket once the workers are done, as in udskit.aio.MessageServer.
            self._watch_listener(False)
            endpoint.remove_file()
        else:
            endpoint.close()
        # The clients first: a worker waiting for room in an outbox waits on this loop,
        # which drains no more; closing its client releases it (its send raises).
        self._on_wake()  # replies the workers handed over
        self._close_clients()
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
        self._on_wake()  # what the workers handed over since: sent, or its descriptors closed
        self._close_clients()  # datagram replies it left waiting for a full receiver: dropped
        endpoint.close()
        if not late:
            # No worker will take a lane again (_worked hands a datagram lane that is
            # still full back to the pool): what waits in them goes unhandled.
            for key in list(self._inboxes):
                self._drop_inbox(key)
        self._epoll.close()
        self._woken = True  # call_soon() no longer wakes anyone
        self._wakeup.close()  # nor does a later stop(), close() or late worker

    def close(self) -> None:
        """Stop and release everything, whether or not serve_forever ran.

        From another thread while serve_forever() runs, it returns once serve_forever() has
        ended (the listener closed, its socket file removed, the workers ended); from the
        serving thread or a worker (a handler, a signal handler) it only stops, as stop()
        does, since serve_forever() can end only after it returns."""
        self.stop()
        if not self._served:
            self._served = True
            try:
                self._shutdown()
            finally:
                self._done.set()
        elif not (
            threading.get_ident() == self._loop_thread
            or threading.current_thread() in self._threads
        ):
            self._done.wait()

    def __enter__(self) -> MessageServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def serve_messages(address: AddressLike, handler: MessageHandler, **options: Any) -> None:
    """Serve ``address`` with a :class:`MessageServer` until SIGINT or SIGTERM (or
    ``stop()``); in the main thread those signals stop it cleanly (socket file removed)."""
    run_until_signalled(MessageServer(address, handler, **options))
