"""``Server`` and ``serve()``: a threaded server that calls ``handler(channel)`` per client.

Stream and seqpacket: one thread per connection, for handlers that hold a conversation; at
most ``max_clients`` at once, DEFAULT_MAX_CLIENTS unless told otherwise (further clients wait
in the kernel's backlog, they are not refused; None lifts the limit). Datagram: the handler
runs in the serving thread once per datagram, with a Channel whose ``recv()`` returns that
datagram and whose ``send()`` replies to its sender, so one handler serves all three types.

The accept loop waits in one ``poll()`` object, on the listener and a wake-up pipe, so
``stop()`` (from a handler, another thread, or a SIGINT/SIGTERM handler) ends it promptly.
Each wake-up accepts up to ACCEPT_BATCH clients, until the queue is empty, and starts a
thread for each without waiting for it to run. Handler threads get HANDLER_STACK_SIZE
stacks. What a client costs in memory: its thread, its socket, and a receive buffer of one
page while it sends short messages (see ``udskit.channel.RECV_START``); about 20 KiB of
resident memory per idle stream client, measured (a seqpacket client's buffer holds a
whole max_frame message, but only the pages its largest message filled are resident).
``stop()`` shuts every client's socket down at once, then waits for all their handlers,
SHUTDOWN_GRACE seconds in all.

accept(2) errors are handled as :mod:`udskit.accepting` explains (out of descriptors: back
off, never spin).
"""

from __future__ import annotations

import _thread
import logging
import select
import signal
import socket
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Final, Protocol

from .accepting import AcceptVerdict, Backoff, classify
from .address import AddressLike
from .channel import Channel
from .errors import ConnectionClosed, Timeout, UdsError
from .listening import DatagramListener, Listener, listen
from .options import DEFAULT_DRAIN_TIMEOUT, DEFAULT_MAX_CLIENTS, check_max_clients, check_seconds
from .wakeup import WakeUp, woken_by_signals

__all__ = ["DEFAULT_MAX_CLIENTS", "Handler", "Server", "serve"]

log = logging.getLogger("udskit")

Handler = Callable[[Channel], object]

#: How long stop() waits, in all, for the handler threads after shutting their sockets
#: down: one deadline for the whole stop, however many handlers are busy.
SHUTDOWN_GRACE: Final = 5.0

#: Most clients accepted per wake-up of the accept loop. Accepting until the queue is empty
#: lets a burst of clients in with one poll() each ~64, not one each; the bound keeps stop()
#: and a freed max_clients slot from waiting behind a queue that keeps filling.
ACCEPT_BATCH: Final = 64

#: Stack size of a handler thread. The process default is RLIMIT_STACK, 8 MiB on most
#: systems: only address space, but glibc keeps at most 40 MiB of freed stacks for reuse, so
#: at 8 MiB a server with clients coming and going maps a fresh stack for nearly every one.
#: 1 MiB is eight times what musl gives a thread (128 KiB), and leaves room for handlers
#: that recurse through C code (json, re, repr of nested data) to Python's recursion limit.
HANDLER_STACK_SIZE: Final = 1024 * 1024

# The stack size is process-wide: set around our thread starts only, one at a time. Another
# part of the program starting a thread at that very moment gets 1 MiB too.
_stack_lock = threading.Lock()

#: ``server``: the Server whose handler this thread runs (set in each handler's thread).
_handling = threading.local()


class Server:
    """A server on ``address`` calling ``handler(channel)`` for each client (or datagram).

    ``listen_options`` are those of :func:`udskit.listen` (type, mode, allow, framing, ...).
    The socket is claimed when the Server is created, so errors (address in use, bad
    permissions) surface here, before ``serve_forever``.
    """

    def __init__(
        self,
        address: AddressLike,
        handler: Handler,
        *,
        max_clients: int | None = DEFAULT_MAX_CLIENTS,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        **listen_options: object,
    ) -> None:
        if not callable(handler):
            raise TypeError(f"handler must be callable, not {handler!r}")
        check_max_clients(max_clients)
        self._drain_timeout = check_seconds("drain_timeout", drain_timeout)
        self._handler = handler
        self._max_clients = max_clients
        self._endpoint: Listener | DatagramListener = listen(address, **listen_options)  # type: ignore[call-overload]
        self._wakeup = WakeUp()
        # One poll object for the life of the server; the listener is in it while there
        # is room for another client (poll(), not select(): select() cannot watch
        # descriptors numbered 1024 or above, which a busy process reaches early).
        self._poller = select.poll()
        self._poller.register(self._wakeup.fd, select.POLLIN)
        self._stopping = False
        self._draining = False  # handed over: finishing the clients we have
        self._lock = threading.Lock()
        self._active: set[Channel] = set()  # one per handler thread running
        self._idle = threading.Condition(self._lock)  # notified when _active empties
        self._served = False
        self._serving = 0  # the thread in serve_forever()
        self._done = threading.Event()  # serve_forever() has ended: close() waits for it
        self._backoff = Backoff()

    @property
    def address(self) -> object:
        return self._endpoint.address

    @property
    def listener(self) -> Listener | DatagramListener:
        return self._endpoint

    @property
    def active_clients(self) -> int:
        with self._lock:
            return len(self._active)

    def stop(self) -> None:
        """Ask the server to stop; safe from handlers, other threads and signal handlers."""
        self._stopping = True
        self._wake()

    def _wake(self) -> None:
        self._wakeup.wake()

    def serve_forever(self) -> None:
        """Serve until ``stop()``; then close the listener (removing its socket file),
        shut down the clients' sockets and wait for their handlers, SHUTDOWN_GRACE seconds
        in all (handlers still running after that are left to finish on their own)."""
        if self._served:
            raise RuntimeError("serve_forever() can run once per Server")
        self._served = True
        self._serving = threading.get_ident()
        try:
            self._serve()
        finally:
            self._done.set()

    def _serve(self) -> None:
        endpoint = self._endpoint
        endpoint.socket.setblocking(False)
        upgrader = endpoint.upgrader
        try:
            with woken_by_signals(self._wakeup):  # a handler's stop() is not left asleep
                if upgrader is not None:
                    upgrader.on_handed_over(self._hand_over)
                    upgrader.ready()  # the previous process, if any, stops accepting
                if isinstance(endpoint, DatagramListener):
                    self._serve_datagrams(endpoint)
                else:
                    self._serve_connections(endpoint)
                if self._draining:
                    self._drain()
        finally:
            self._shutdown()

    def _hand_over(self) -> None:
        """A successor has the listener: stop accepting, finish the clients we have."""
        self._draining = True
        self._wake()

    def _drain(self) -> None:
        """Wait for the clients to finish, at most drain_timeout (stop() cuts it short)."""
        try:
            self._poller.unregister(self._endpoint.fileno())  # clients queued keep it readable
        except KeyError:
            pass  # not watched (full, or backing off)
        if self.active_clients:
            log.info(
                "%s: handed over; finishing %d client(s), for at most %g s",
                self.address,
                self.active_clients,
                self._drain_timeout,
            )
        deadline = time.monotonic() + self._drain_timeout
        while self.active_clients and not self._stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning(
                    "%s: %d client(s) still connected %g s after the handover; closing them",
                    self.address,
                    self.active_clients,
                    self._drain_timeout,
                )
                return
            self._wait(left)  # the last client's exit, or stop(), wakes it

    def _wait(self, timeout: float | None = None) -> list[int]:
        """Wait for what the poll object watches; drain the wake-up pipe if it was that."""
        ready = [fd for fd, _ in self._poller.poll(None if timeout is None else timeout * 1000)]
        if self._wakeup.fd in ready:
            self._wakeup.drain()
        return ready

    def _room(self) -> int:
        """How many more clients may start now."""
        if self._max_clients is None:
            return ACCEPT_BATCH
        with self._lock:
            return self._max_clients - len(self._active)

    def _serve_connections(self, listener: Listener) -> None:
        fd = listener.fileno()
        poller = self._poller
        watching = False  # whether the listener is in the poll object
        while not self._stopping and not self._draining:
            room = self._room()
            if (room > 0) != watching:
                watching = room > 0
                if watching:
                    poller.register(fd, select.POLLIN)
                else:
                    poller.unregister(fd)  # full: a finishing handler wakes us
            if fd not in self._wait() or self._stopping or self._draining:
                continue
            try:
                self._accept_batch(listener, min(room, ACCEPT_BATCH))
            except OSError as exc:
                if classify(exc) is not AcceptVerdict.BACK_OFF:
                    raise
                pause = self._backoff.failed(exc, listener.address)
                poller.unregister(fd)  # the queued client keeps it readable: no spinning
                watching = False
                self._wait(pause)  # stop() cuts it short

    def _accept_batch(self, listener: Listener, most: int) -> None:
        """Accept up to ``most`` clients, until the queue is empty, and start them."""
        accepted = 0
        while accepted < most and not self._stopping and not self._draining:
            try:
                conn, _ = listener.socket.accept()
            except BlockingIOError:
                return  # the queue is empty (or another process took the client)
            except OSError as exc:
                if classify(exc) is AcceptVerdict.RETRY:
                    continue  # that client gave up: take the next one
                raise  # those accepted so far are started already
            accepted += 1
            self._backoff.succeeded(listener.address)
            self._start_client(listener, conn)

    def _start_client(self, listener: Listener, conn: socket.socket) -> None:
        channel = listener.admit(conn)
        if channel is None:
            return
        with self._lock:
            self._active.add(channel)
        # _thread, not threading.Thread: Thread.start() waits until the new thread has run,
        # which needs the GIL, which a thousand busy handlers share: a burst of clients was
        # accepted a GIL hand-over or two apiece. stop() waits on _active instead of joins.
        # (Like daemon threads, these do not hold up the interpreter's exit.)
        try:
            with _stack_lock:
                previous = _thread.stack_size(HANDLER_STACK_SIZE)
                try:
                    _thread.start_new_thread(self._run_client, (channel,))
                finally:
                    _thread.stack_size(previous)
        except RuntimeError as exc:  # "can't start new thread": out of tasks or memory
            with self._lock:
                self._active.discard(channel)
            log.warning("%s: cannot serve %r: %s", listener.address, channel, exc)
            channel.close()

    def _run_client(self, channel: Channel) -> None:
        _handling.server = self  # close() from this handler must not wait for serve_forever()
        try:
            self._call(channel)
        finally:
            channel.close()
            with self._lock:
                self._active.discard(channel)
                left = len(self._active)
                if not left:
                    self._idle.notify_all()
            if left + 1 == self._max_clients or (self._draining and not left):
                self._wake()  # a slot is free for the accept loop, or draining is done

    def _call(self, channel: Channel) -> None:
        try:
            self._handler(channel)
        except ConnectionClosed as exc:
            log.debug("%r: %s", channel, exc)
        except UdsError as exc:
            log.warning("%s: %s", self._endpoint.address, exc)
        except Exception:
            log.exception("%s: handler failed for %r", self._endpoint.address, channel)

    def _serve_datagrams(self, listener: DatagramListener) -> None:
        fd = listener.fileno()
        self._poller.register(fd, select.POLLIN)
        while not self._stopping and not self._draining:
            if fd not in self._wait() or self._stopping or self._draining:
                continue
            try:
                datagram = listener.recv()
            except Timeout:
                continue  # readable, but another reader took the datagram first
            except UdsError as exc:  # e.g. a truncated datagram: report, keep serving
                log.warning("%s: %s", listener.address, exc)
                continue
            with listener.session(datagram) as session:
                self._call(session)

    def _shutdown(self) -> None:
        self._endpoint.close()
        with self._lock:
            clients = list(self._active)
        # Every client's socket first, then one wait for all handlers: they see their
        # connection end together, and six stuck handlers cost one grace period, not six.
        for channel in clients:
            try:
                channel.socket.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # closed by its handler meanwhile
        with self._idle:
            self._idle.wait_for(lambda: not self._active, SHUTDOWN_GRACE)
            late = len(self._active)
        if late:
            log.warning(
                "%s: %d handler(s) still running %g s after stop; leaving them behind",
                self._endpoint.address,
                late,
                SHUTDOWN_GRACE,
            )
        self._wakeup.close()  # a later stop(), or a late handler's exit, wakes nothing

    def close(self) -> None:
        """Stop and release everything, whether or not serve_forever ran.

        From another thread while serve_forever() runs, it returns once serve_forever() has
        ended (the listener closed, its socket file removed, the handlers waited for as
        serve_forever() waits for them); from the serving thread or a handler (a signal
        handler, say) it only stops, as stop() does, since serve_forever() can end only
        after it returns."""
        self.stop()
        if not self._served:
            self._served = True
            try:
                self._shutdown()
            finally:
                self._done.set()
        elif (
            threading.get_ident() != self._serving
            and getattr(_handling, "server", None) is not self
        ):
            self._done.wait()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def serve(
    address: AddressLike,
    handler: Handler,
    *,
    max_clients: int | None = DEFAULT_MAX_CLIENTS,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    **listen_options: object,
) -> None:
    """Serve ``address`` with ``handler`` until SIGINT or SIGTERM (or ``server.stop()``).

    In the main thread, SIGINT and SIGTERM stop the server cleanly (socket file removed) and
    ``serve`` returns; the previous signal handlers are restored afterwards.
    """
    run_until_signalled(
        Server(
            address,
            handler,
            max_clients=max_clients,
            drain_timeout=drain_timeout,
            **listen_options,
        )
    )


class _Serving(Protocol):
    @property
    def address(self) -> object: ...

    def serve_forever(self) -> None: ...
    def stop(self) -> None: ...
    def close(self) -> None: ...


def run_until_signalled(server: _Serving) -> None:
    """Run ``server.serve_forever()``; in the main thread SIGINT and SIGTERM stop it, and
    the previous handlers of those signals are put back afterwards. Closes the server."""
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
