"""The asyncio message server: ``start_message_server()``, ``serve_messages()`` and
``MessageServer``, the counterpart of :mod:`udskit.messageserver` on an event loop.

``handler(conn, message)`` is a plain function, called straight from the socket's reader
callback: no task, no future, no coroutine per message. It returns the reply (or None), or
calls ``conn.send``. A handler that has to wait returns an awaitable instead (an ``async
def`` handler does so on every call): then a task awaits it and sends what it returns, and
that client is not read meanwhile, so its messages are still handled one at a time, in
order; the other clients go on.

Everything else is the blocking message server's (:mod:`udskit.serving` holds what they
share): admission, batches of accepts, backpressure per client, ``max_clients`` and the
back-off when out of descriptors, datagrams, and the epoll set of every client's socket.
The event loop watches that one descriptor: one loop callback handles every client that is
ready, instead of one callback (and one loop pass of bookkeeping) per client.

Stopping (``stop()``, or SIGINT/SIGTERM under ``serve_messages()``) closes the listener
first, which removes its socket file (a datagram socket stays open for the last replies);
handlers still awaiting get SHUTDOWN_GRACE seconds, then are cancelled; what the kernel
takes of the replies goes out, and every client is closed.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from .. import listening as blocking
from ..address import AddressLike
from ..connection import DEFAULT_MAX_OUTBOX, Connection
from ..options import DEFAULT_DRAIN_TIMEOUT
from ..server import SHUTDOWN_GRACE
from ..serving import (
    Hook,
    MessageHandler,
    MessageServing,
    check_server_options,
    refuse_shared_memory,
)
from .listening import claim_in_thread
from .signals import serve_until_signalled

__all__ = ["MessageServer", "serve_messages", "start_message_server"]

log = logging.getLogger("udskit")

_REPLIES = (bytes, bytearray, memoryview)


class MessageServer(MessageServing):
    """Serves one listener with a per-message ``handler`` on the running event loop.

    Make one with :func:`start_message_server`, then ``await serve_forever()``; ``stop()``
    ends it (from the loop's thread; elsewhere ``loop.call_soon_threadsafe(server.stop)``).
    ``async with`` closes everything on exit.
    """

    def __init__(
        self,
        endpoint: blocking.Listener | blocking.DatagramListener,
        handler: MessageHandler,
        *,
        max_clients: int | None = None,
        max_outbox: int = DEFAULT_MAX_OUTBOX,
        on_connect: Hook | None = None,
        on_close: Hook | None = None,
        on_eof: Hook | None = None,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    ) -> None:
        if not isinstance(endpoint, (blocking.Listener, blocking.DatagramListener)):
            # An aio listener has the socket too, but reading it is this server's job: taken
            # as it is, it failed later, in the loop's callback, client by client.
            raise TypeError(
                "endpoint must be a listener from udskit.listen() (or let "
                f"start_message_server(address, ...) claim one), not {endpoint!r}"
            )
        check_server_options(
            handler,
            max_clients,
            max_outbox,
            {"on_connect": on_connect, "on_close": on_close, "on_eof": on_eof},
        )
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
        endpoint.socket.setblocking(False)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopped: asyncio.Event | None = None
        self._finished: asyncio.Event | None = None  # serve_forever has released everything
        self._served = False
        self._closed = False

    # -- the loop ------------------------------------------------------------------------
    def call_soon(self, callback: Callable[..., object], *args: Any) -> None:
        loop = self._loop
        assert loop is not None
        loop.call_soon_threadsafe(callback, *args)

    def _retry_accept_in(self, delay: float) -> None:
        loop = self._loop
        assert loop is not None
        loop.call_later(delay, self._accept_again)

    def _drain_expires_in(self, delay: float) -> None:
        loop = self._loop
        assert loop is not None
        loop.call_later(delay, self._drain_expired)

    def _retry_datagrams_in(self, delay: float) -> None:
        loop = self._loop
        assert loop is not None
        loop.call_later(delay, self._retry_datagrams)

    def _on_ready(self) -> None:
        """The loop's one reader callback, for the whole epoll set: everything ready now."""
        self._on_events(self._epoll.poll(0))

    # -- handlers that wait ----------------------------------------------------------------
    # While a task awaits, its connection is held: the rest of the read stays in the framing
    # (Connection._decode stops at a held connection), so no later message of that client
    # is handled before the task is done; hold(False) resumes them, in order.
    def _reply(self, conn: Connection, reply: Any, fds: list[int]) -> None:
        if type(reply) in _REPLIES or not inspect.isawaitable(reply):
            super()._reply(conn, reply, fds)
            return
        conn.busy = True
        conn.hold(True)
        loop = self._loop
        assert loop is not None
        task = loop.create_task(self._await_reply(conn, reply, fds))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._finished_one()

    def _busy(self) -> bool:
        # A handler still awaiting (a datagram's has no client to wait for): handed over,
        # it replies before the socket closes.
        return super()._busy() or bool(self._tasks)

    async def _await_reply(self, conn: Connection, pending: Awaitable[Any], fds: list[int]) -> None:
        try:
            reply = await pending
            if reply is not None and not conn.closed:
                conn.send(reply)
        except asyncio.CancelledError:
            conn.abort()
            raise
        except Exception as exc:  # noqa: BLE001 - the handler's failure ends its client only
            self._handler_failed(conn, exc)
        finally:
            if fds:
                conn.release_fds()
            conn.busy = False
        if conn.closed:
            return
        conn.hold(False)
        conn.flush()

    # -- serving -------------------------------------------------------------------------
    async def serve_forever(self) -> None:
        """Serve until ``stop()``; then close the listener (removing its socket file),
        give awaiting handlers SHUTDOWN_GRACE seconds, and close every client."""
        if self._served:
            raise RuntimeError("serve_forever() can run once per MessageServer")
        self._served = True
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._stopped = asyncio.Event()
        self._finished = asyncio.Event()
        self._loop.add_reader(self._epoll.fileno(), self._on_ready)
        upgrader = self._upgrader()
        try:
            if upgrader is not None:
                # The previous process, if any, stops accepting; that takes its answer.
                await self._loop.run_in_executor(None, upgrader.ready)
            if self._stopping:
                self._stopped.set()
            else:
                self._watch_listener(True)
            await self._stopped.wait()
        finally:
            try:
                await self._shutdown()
            finally:
                self._finished.set()

    def stop(self) -> None:
        """Stop serving (from the loop's thread)."""
        self._stopping = True
        if self._stopped is not None:
            self._stopped.set()

    async def _shutdown(self) -> None:
        self._stopping = True
        if self._watching_listener:
            self._watch_listener(False)
        endpoint = self._endpoint
        if isinstance(endpoint, blocking.DatagramListener):
            # The replies of the handlers still awaiting leave through this socket: only its
            # file goes now (no new sender finds it), the socket once they are done.
            endpoint.remove_file()
        else:
            endpoint.close()
        try:
            if self._tasks:
                _, late = await asyncio.wait(set(self._tasks), timeout=SHUTDOWN_GRACE)
                for task in late:
                    task.cancel()
                if late:
                    log.warning(
                        "%s: %d handler(s) still awaiting %g s after stop; cancelled them",
                        self.address,
                        len(late),
                        SHUTDOWN_GRACE,
                    )
                    await asyncio.wait(late)
            self._close_clients()
        finally:
            endpoint.close()
            loop = self._loop
            if loop is not None and not loop.is_closed():
                loop.remove_reader(self._epoll.fileno())
            self._epoll.close()
        self._closed = True

    async def aclose(self) -> None:
        """Stop and release everything, whether or not serve_forever ran; if it runs (in
        another task), wait until it has finished, unless called from a handler (which
        serve_forever waits for)."""
        self.close()
        if self._finished is not None and asyncio.current_task() not in self._tasks:
            await self._finished.wait()

    def close(self) -> None:
        """Stop; if serve_forever never ran, release the listener now."""
        self.stop()
        if not self._served:
            self._served = True
            self._endpoint.close()
            self._epoll.close()
            self._closed = True

    async def __aenter__(self) -> MessageServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


async def start_message_server(
    address: AddressLike,
    handler: MessageHandler,
    *,
    max_clients: int | None = None,
    max_outbox: int = DEFAULT_MAX_OUTBOX,
    on_connect: Hook | None = None,
    on_close: Hook | None = None,
    on_eof: Hook | None = None,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    **listen_options: Any,
) -> MessageServer:
    """Claim ``address`` (the options of :func:`udskit.listen`) and return a
    :class:`MessageServer` for it; ``await server.serve_forever()`` runs it."""
    check_server_options(
        handler,
        max_clients,
        max_outbox,
        {"on_connect": on_connect, "on_close": on_close, "on_eof": on_eof},
    )
    refuse_shared_memory(listen_options)
    listen_now = functools.partial(blocking.listen, address, **listen_options)
    endpoint: blocking.Listener | blocking.DatagramListener = await claim_in_thread(listen_now)
    try:
        return MessageServer(
            endpoint,
            handler,
            max_clients=max_clients,
            max_outbox=max_outbox,
            on_connect=on_connect,
            on_close=on_close,
            on_eof=on_eof,
            drain_timeout=drain_timeout,
        )
    except BaseException:
        endpoint.close()
        raise


async def serve_messages(address: AddressLike, handler: MessageHandler, **options: Any) -> None:
    """Serve ``address`` until SIGINT or SIGTERM (or ``stop()``); in the main thread those
    signals stop it cleanly (socket file removed), and their handlers are put back after."""
    await serve_until_signalled(
        address, functools.partial(start_message_server, address, handler, **options)
    )
