"""``Server``, ``start_server()`` and ``serve()``: an asyncio server that runs
``await handler(channel)`` in a task per connection (per datagram for dgram).

The blocking :mod:`udskit.server`'s semantics, on an event loop: at most ``max_clients``
connections are served at once, ``DEFAULT_MAX_CLIENTS`` unless told otherwise (further
clients wait in the kernel's backlog, they are not refused; None lifts the limit); accept(2)
errors are handled as :mod:`udskit.accepting` explains (out of descriptors: back off, never
spin); a datagram handler runs in the serving task, once per
datagram, with a Channel whose ``recv()`` returns that datagram and whose ``send()`` replies
to its sender, so one handler serves all three socket types.

Stopping (``stop()``, or SIGINT/SIGTERM under ``serve()``) closes the listener first, which
removes its socket file; then it shuts down every client's socket at once, so their handlers
see the connection end together, and waits up to SHUTDOWN_GRACE seconds for all of them (one
deadline, not one each) before cancelling what is left. A datagram handler replies through
the listener's socket: stopping removes the file at once but closes the socket only after
that wait, so a handler already running still gets its reply out.

Handed over (``handover=True``, a successor has taken the listener), a server accepts no
more and lets the clients it has finish, drain_timeout seconds at most. A datagram listener
stops reading but stays open: the handler running and the datagrams already read (the
listener reads ahead) are served, in turn, within that time, and their replies go out
through it; what arrives meanwhile is left to the successor.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import socket
from collections.abc import Awaitable, Callable
from types import TracebackType

from ..accepting import RESOURCE_ERRNOS as _RESOURCE_ERRNOS
from ..accepting import RETRY_ERRNOS as _RETRY_ERRNOS
from ..accepting import Backoff
from ..address import Address, AddressLike
from ..errors import ConnectionClosed, ProtocolError, UdsError
from ..options import DEFAULT_DRAIN_TIMEOUT, DEFAULT_MAX_CLIENTS, check_max_clients, check_seconds
from ..server import SHUTDOWN_GRACE
from ..serving import DATAGRAMS_HANDED_OVER, DATAGRAMS_LEFT
from ..translate import translate
from .channel import Channel
from .listening import DatagramListener, Listener, listen
from .signals import serve_until_signalled
from .waiting import Waiters

__all__ = ["DEFAULT_MAX_CLIENTS", "Handler", "Server", "serve", "start_server"]

log = logging.getLogger("udskit")

# DEFAULT_MAX_CLIENTS is the blocking server's default, so that moving a server between the
# layers does not change who waits. Here a client costs a task, not a thread, but also its
# descriptor and up to a READ_AHEAD of received bytes plus a write queue (see
# udskit.aio.buffers): without a limit, a flood of connections could claim all of them.

Handler = Callable[[Channel], Awaitable[object]]


class Server:
    """Serves one listener (from :func:`udskit.aio.listen`) with ``handler``.

    Make one with :func:`start_server` (or from a listener you have), then ``await
    serve_forever()``; ``stop()`` ends it. ``async with`` closes everything on exit.
    ``stop()`` must be called from the loop's thread (elsewhere, use
    ``loop.call_soon_threadsafe(server.stop)``).
    """

    def __init__(
        self,
        endpoint: Listener | DatagramListener,
        handler: Handler,
        *,
        max_clients: int | None = DEFAULT_MAX_CLIENTS,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    ) -> None:
        if not callable(handler):
            raise TypeError(f"handler must be an async function of a channel, not {handler!r}")
        check_max_clients(max_clients)
        if not isinstance(endpoint, (Listener, DatagramListener)):
            raise TypeError(f"endpoint must be a udskit.aio listener, not {endpoint!r}")
        self._endpoint = endpoint
        self._handler = handler
        self._max_clients = max_clients
        self._drain_timeout = check_seconds("drain_timeout", drain_timeout)
        self._clients: dict[asyncio.Task[None], Channel] = {}
        self._stopping = False
        self._draining = False  # handed over: finishing the clients we have
        self._drained_by: float | None = None  # handed over: the loop time to finish by
        self._served = False
        self._finished: asyncio.Event | None = None  # serve_forever has released everything
        self._wake = Waiters("accept")  # a client finished, or stop() was called

    @property
    def address(self) -> Address:
        return self._endpoint.address

    @property
    def listener(self) -> Listener | DatagramListener:
        return self._endpoint

    @property
    def active_clients(self) -> int:
        return len(self._clients)

    def stop(self) -> None:
        """Stop accepting (the socket file is removed now) and end ``serve_forever``.

        A datagram handler already running still replies: the socket closes once it is
        done (SHUTDOWN_GRACE at most), only its file goes now."""
        self._stopping = True
        if isinstance(self._endpoint, DatagramListener) and self._clients:
            self._endpoint.remove_file()  # _shutdown closes the socket after the handler
        else:
            self._endpoint.close()
        self._wake.wake_all()

    async def serve_forever(self) -> None:
        """Serve until ``stop()``; then shut down the clients and wait for their handlers."""
        if self._served:
            raise RuntimeError("serve_forever() can run once per Server")
        self._served = True
        self._finished = asyncio.Event()
        loop = asyncio.get_running_loop()
        upgrader = self._endpoint.upgrader
        try:
            if upgrader is not None:
                upgrader.on_handed_over(lambda: loop.call_soon_threadsafe(self._hand_over))
                # The previous process, if any, stops accepting; that takes its answer.
                await loop.run_in_executor(None, upgrader.ready)
            if isinstance(self._endpoint, DatagramListener):
                await self._serve_datagrams(self._endpoint)  # and drains, handed over
            else:
                await self._serve_connections(self._endpoint)
                if self._draining:
                    await self._drain(loop)
        finally:
            try:
                await self._shutdown()
            finally:
                self._finished.set()

    def _hand_over(self) -> None:
        """A successor has the listener: stop accepting (the file stays, the successor's).

        A stream or seqpacket listener closes (our copy). A datagram listener only stops
        reading: its running handler replies through it, and the datagrams it has read
        already are served before it closes (see _serve_datagrams)."""
        if self._stopping:
            return
        self._draining = True
        self._drained_by = asyncio.get_running_loop().time() + self._drain_timeout
        endpoint = self._endpoint
        if isinstance(endpoint, DatagramListener):
            endpoint.stop_receiving()
            log.info(
                DATAGRAMS_HANDED_OVER,
                self.address,
                self._drain_timeout,
            )
        else:
            endpoint.close()
        self._wake.wake_all()

    def _drain_left(self, loop: asyncio.AbstractEventLoop) -> float | None:
        """Seconds left to finish in after the handover; None: not handed over."""
        return None if self._drained_by is None else self._drained_by - loop.time()

    async def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        """Let the clients we have finish, for at most drain_timeout (stop() cuts it short)."""
        if self._clients:
            log.info(
                "%s: handed over; finishing %d client(s), for at most %g s",
                self.address,
                len(self._clients),
                self._drain_timeout,
            )
        while self._clients and not self._stopping:
            left = self._drain_left(loop)
            assert left is not None  # handed over
            if left <= 0:
                log.warning(
                    "%s: %d client(s) still connected %g s after the handover; closing them",
                    self.address,
                    len(self._clients),
                    self._drain_timeout,
                )
                return
            await self._wake.wait(loop, left)  # a client finished, or stop()

    async def _serve_connections(self, listener: Listener) -> None:
        loop = asyncio.get_running_loop()
        backoff = Backoff()
        while not self._stopping:
            if self._max_clients is not None and len(self._clients) >= self._max_clients:
                await self._wake.wait(loop, None)  # a handler finished, or stop()
                continue
            try:
                conn = await listener.accept_socket()
            except ConnectionClosed:
                if self._stopping or listener.closed:
                    return
                raise
            except OSError as exc:
                if exc.errno in _RETRY_ERRNOS:
                    continue
                if exc.errno in _RESOURCE_ERRNOS:
                    pause = backoff.failed(exc, listener.address)
                    await self._wake.wait(loop, pause)  # stop() cuts the pause short
                    continue
                raise translate(exc, "accept", listener.address) from exc
            backoff.succeeded(listener.address)
            channel = listener.admit(conn)
            if channel is None:
                continue
            task = loop.create_task(self._run_client(channel))
            self._clients[task] = channel
            task.add_done_callback(self._client_done)

    async def _run_client(self, channel: Channel) -> None:
        try:
            await self._call(channel)
        finally:
            await channel.aclose()

    def _client_done(self, task: asyncio.Task[None]) -> None:
        self._clients.pop(task, None)
        self._wake.wake_all()

    async def _call(self, channel: Channel) -> None:
        try:
            result = self._handler(channel)
            if inspect.isawaitable(result):
                await result
        except ConnectionClosed as exc:
            log.debug("%r: %s", channel, exc)
        except UdsError as exc:
            log.warning("%s: %s", self._endpoint.address, exc)
        except Exception:
            log.exception("%s: handler failed for %r", self._endpoint.address, channel)

    async def _serve_datagrams(self, listener: DatagramListener) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            left = self._drain_left(loop)
            if left is not None and left <= 0:
                log.warning(
                    DATAGRAMS_LEFT,
                    self.address,
                    self._drain_timeout,
                )
                return
            try:
                datagram = await listener.recv()
            except ConnectionClosed:
                # Stopped, or handed over and every datagram already read is handled.
                if self._stopping or self._draining or listener.closed:
                    return
                raise
            except ProtocolError as exc:  # truncated, too many descriptors: report, go on
                log.warning("%s: %s", listener.address, exc)
                continue
            # The handler runs in a task of its own, awaited here (datagrams are handled in
            # turn), so that stop() need not wait for it: _shutdown gives it SHUTDOWN_GRACE
            # and then cancels it, as it does a connection's handler.
            session = listener.session(datagram)
            task = loop.create_task(self._run_client(session))
            self._clients[task] = session
            task.add_done_callback(self._client_done)
            while not task.done() and not self._stopping:
                left = self._drain_left(loop)
                if left is not None and left <= 0:
                    break  # said above; _shutdown gives the handler SHUTDOWN_GRACE more
                await self._wake.wait(loop, left)  # the handler finished, or stop()

    async def _shutdown(self) -> None:
        self._stopping = True
        endpoint = self._endpoint
        clients = dict(self._clients)
        if isinstance(endpoint, DatagramListener):
            # A datagram session replies through the listener's own socket: only its file
            # goes now (no new sender finds it), the socket once the handler is done.
            endpoint.remove_file()
        else:
            endpoint.close()
            for channel in clients.values():
                try:
                    # The handler's recv() sees the connection end, its send() fails: it
                    # finishes on its own, the way the blocking server's threads do.
                    channel.socket.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        try:
            if clients:
                _, late = await asyncio.wait(list(clients), timeout=SHUTDOWN_GRACE)
                for task in late:
                    task.cancel()
                if late:
                    await asyncio.gather(*late, return_exceptions=True)
        finally:
            endpoint.close()

    async def aclose(self) -> None:
        """Stop and release everything, whether or not ``serve_forever`` ran; if it runs (in
        another task), wait until it has finished (its clients' handlers too), unless called
        from a handler (which serve_forever waits for)."""
        self.stop()
        if not self._served:
            self._served = True
            await self._shutdown()
        elif self._finished is not None and asyncio.current_task() not in self._clients:
            await self._finished.wait()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


async def start_server(
    address: AddressLike,
    handler: Handler,
    *,
    max_clients: int | None = DEFAULT_MAX_CLIENTS,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    **listen_options: object,
) -> Server:
    """A Server listening on ``address`` (options as for :func:`udskit.aio.listen`).

    The socket is claimed here, so errors (address in use, bad permissions) surface before
    ``serve_forever``.
    """
    endpoint: Listener | DatagramListener = await listen(address, **listen_options)  # type: ignore[call-overload]
    try:
        return Server(endpoint, handler, max_clients=max_clients, drain_timeout=drain_timeout)
    except BaseException:
        endpoint.close()
        raise


async def serve(
    address: AddressLike,
    handler: Handler,
    *,
    max_clients: int | None = DEFAULT_MAX_CLIENTS,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    **listen_options: object,
) -> None:
    """Serve ``address`` with ``handler`` until SIGINT or SIGTERM (or ``stop()``).

    In the main thread, SIGINT and SIGTERM stop the server cleanly (socket file removed) and
    ``serve`` returns; the previous handlers of those signals are put back afterwards. The
    handlers go in before the socket is claimed, so an early signal still removes it.
    """
    await serve_until_signalled(
        address,
        functools.partial(
            start_server,
            address,
            handler,
            max_clients=max_clients,
            drain_timeout=drain_timeout,
            **listen_options,
        ),
    )
