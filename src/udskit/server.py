"""``Server`` and ``serve()``: a threaded server that calls ``handler(channel)`` per client.

Stream and seqpacket: one thread per connection, at most ``max_clients`` at once (further
clients wait in the kernel's backlog, they are not refused). Datagram: the handler runs in
the serving thread once per datagram, with a Channel whose ``recv()`` returns that datagram
and whose ``send()`` replies to its sender, so one handler serves all three types.

The accept loop waits in ``poll()`` on the listener and a wake-up pipe, so ``stop()`` (from
a handler, another thread, or a SIGINT/SIGTERM handler) ends it promptly.

accept(2) errors are handled as :mod:`udskit.accepting` explains (out of descriptors: back
off, never spin).
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Final

from .accepting import ACCEPT_BACKOFF, ACCEPT_BACKOFF_MAX
from .accepting import RESOURCE_ERRNOS as _RESOURCE_ERRNOS
from .accepting import RETRY_ERRNOS as _RETRY_ERRNOS
from .address import AddressLike
from .channel import Channel
from .errors import ConnectionClosed, Timeout, UdsError
from .listening import DatagramListener, Listener, listen
from .options import check_max_clients

__all__ = ["Handler", "Server", "serve"]

log = logging.getLogger("udskit")

Handler = Callable[[Channel], object]

#: How long stop() waits, in all, for the handler threads after shutting their sockets
#: down: one deadline for the whole stop, however many handlers are busy.
SHUTDOWN_GRACE: Final = 5.0


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
        max_clients: int | None = None,
        **listen_options: object,
    ) -> None:
        if not callable(handler):
            raise TypeError(f"handler must be callable, not {handler!r}")
        check_max_clients(max_clients)
        self._handler = handler
        self._max_clients = max_clients
        self._endpoint: Listener | DatagramListener = listen(address, **listen_options)  # type: ignore[call-overload]
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = False
        self._lock = threading.Lock()
        self._active: dict[threading.Thread, Channel] = {}
        self._served = False

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
        try:
            os.write(self._wake_w, b"!")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (a wake-up is pending anyway) or already closed

    def serve_forever(self) -> None:
        """Serve until ``stop()``; then close the listener (removing its socket file),
        shut down the clients' sockets and wait for their handlers, SHUTDOWN_GRACE seconds
        in all (handlers still running after that are left to finish on their own)."""
        if self._served:
            raise RuntimeError("serve_forever() can run once per Server")
        self._served = True
        endpoint = self._endpoint
        endpoint.socket.setblocking(False)
        try:
            if isinstance(endpoint, DatagramListener):
                self._serve_datagrams(endpoint)
            else:
                self._serve_connections(endpoint)
        finally:
            self._shutdown()

    def _wait(self, readable: list[int], timeout: float | None = None) -> list[int]:
        # poll(), not select(): select() cannot watch descriptors numbered 1024 or above
        # (FD_SETSIZE), which a busy process reaches before it creates its server.
        poller = select.poll()
        for fd in (*readable, self._wake_r):
            poller.register(fd, select.POLLIN)
        ready = [fd for fd, _ in poller.poll(None if timeout is None else timeout * 1000)]
        if self._wake_r in ready:
            try:
                while os.read(self._wake_r, 512):
                    pass
            except BlockingIOError:
                pass
        return ready

    def _serve_connections(self, listener: Listener) -> None:
        backoff = ACCEPT_BACKOFF
        fd = listener.fileno()
        while not self._stopping:
            full = self._max_clients is not None and self.active_clients >= self._max_clients
            if fd not in self._wait([] if full else [fd]) or self._stopping:
                continue
            try:
                conn, _ = listener.socket.accept()
            except OSError as exc:
                if exc.errno in _RETRY_ERRNOS:
                    continue
                if exc.errno in _RESOURCE_ERRNOS:
                    log.warning(
                        "%s: accept failed (%s); retrying in %.2f s",
                        listener.address,
                        os.strerror(exc.errno or 0),
                        backoff,
                    )
                    self._wait([], backoff)
                    backoff = min(backoff * 2, ACCEPT_BACKOFF_MAX)
                    continue
                raise
            backoff = ACCEPT_BACKOFF
            self._start_client(listener, conn)

    def _start_client(self, listener: Listener, conn: socket.socket) -> None:
        channel = listener.admit(conn)
        if channel is None:
            return
        thread = threading.Thread(target=self._run_client, args=(channel,), daemon=True)
        with self._lock:
            self._active[thread] = channel
        thread.start()

    def _run_client(self, channel: Channel) -> None:
        try:
            self._call(channel)
        finally:
            channel.close()
            with self._lock:
                self._active.pop(threading.current_thread(), None)
            if self._max_clients is not None:
                self._wake()  # a slot is free: let the accept loop look again

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
        while not self._stopping:
            if fd not in self._wait([fd]) or self._stopping:
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
            clients = dict(self._active)
        for channel in clients.values():
            try:
                channel.socket.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        # One deadline for all: each join gets what is left of it, so six stuck handlers
        # cost one grace period, not six.
        deadline = time.monotonic() + SHUTDOWN_GRACE
        for thread in clients:
            thread.join(max(0.0, deadline - time.monotonic()))
        late = sum(thread.is_alive() for thread in clients)
        if late:
            log.warning(
                "%s: %d handler(s) still running %g s after stop; leaving them behind",
                self._endpoint.address,
                late,
                SHUTDOWN_GRACE,
            )
        # Retired before closed: a later stop() or close(), or a late handler's exit, must
        # not write to these numbers, which the next open() in any thread may get.
        wake_fds = (self._wake_r, self._wake_w)
        self._wake_w = -1  # _wake() writes to -1: EBADF, ignored
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

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def serve(
    address: AddressLike,
    handler: Handler,
    *,
    max_clients: int | None = None,
    **listen_options: object,
) -> None:
    """Serve ``address`` with ``handler`` until SIGINT or SIGTERM (or ``server.stop()``).

    In the main thread, SIGINT and SIGTERM stop the server cleanly (socket file removed) and
    ``serve`` returns; the previous signal handlers are restored afterwards.
    """
    server = Server(address, handler, max_clients=max_clients, **listen_options)
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
