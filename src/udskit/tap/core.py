"""A running tap: the relay in front of a server's socket, and how it stops."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from ..address import Address, AddressLike
from ..creds import PeerCred
from .credentials import Connector
from .datagrams import DatagramRelay
from .events import Event, Notice
from .interpose import SOCKET_TYPES, Interposed, interpose
from .relay import StreamRelay

__all__ = ["Tap", "start"]

log = logging.getLogger("udskit")


class Tap:
    """A tap on a live socket. Make one with :func:`start`; :meth:`stop` puts things back.

    ``on_event`` is called with each :class:`~udskit.tap.Event` by the tap's threads, one
    call at a time, in the order they happened per connection; all have been delivered
    when :meth:`stop` returns. The relay's loop calls it when it has nothing else to do
    (see :mod:`udskit.tap.pump`): a handler that takes long slows the relay down. From
    ``on_event``, :meth:`restore` and :meth:`cut` may be called, not :meth:`stop` or
    :meth:`drain` (they wait for the very thread that runs the handler).
    """

    def __init__(
        self,
        interposed: Interposed,
        on_event: Callable[[Event], None],
    ) -> None:
        self._interposed = interposed
        self._on_event = on_event
        # One call at a time, from whichever of the tap's threads has the event; a call
        # the handler makes (restore() reports what it did) re-enters it.
        self._handler_lock = threading.RLock()
        self._handling = threading.local()
        self._stop_lock = threading.Lock()
        self._stopped = threading.Event()
        self._restored: str | None = None
        self._restore_reported = threading.Event()
        self._server_gone = threading.Event()
        self._bypassed = threading.Event()
        self.address: Address = interposed.address
        #: stream, seqpacket or dgram: the server's socket type.
        self.type: str = interposed.type
        #: The server, as its socket reported it when the tap started (None for datagrams).
        self.server: PeerCred | None = interposed.server
        #: Where the server's socket is while tapped.
        self.aside: str = interposed.aside
        server = interposed.server
        who = f", server pid {server.pid} uid {server.uid}" if server is not None else ""
        self._emit(
            Notice(
                time.time(),
                f"tapping {self.address} ({self.type}{who}); its socket is at {self.aside} "
                "meanwhile; connections opened before now are not seen",
            )
        )
        self._connector: Connector | None = None
        if self.type != "dgram" and os.geteuid() == 0:
            self._connector = Connector(interposed.directory_fd, interposed.aside_name)
        try:
            self._relay = self._make_relay()
            self._relay.start()
        except BaseException:
            if self._connector is not None:
                self._connector.close()
            raise

    def _make_relay(self) -> StreamRelay | DatagramRelay:
        interposed = self._interposed
        if self.type == "dgram":
            return DatagramRelay(
                interposed.relay, interposed.server_sun_path, self._emit, self._gone
            )
        return StreamRelay(
            interposed.relay,
            SOCKET_TYPES[self.type],
            interposed.server_sun_path,
            interposed.server,
            self._emit,
            self._connector,
            self._gone,
        )

    def _emit(self, event: Event) -> None:
        with self._handler_lock:
            depth = getattr(self._handling, "depth", 0)
            self._handling.depth = depth + 1
            try:
                self._on_event(event)
            except Exception:
                log.exception("tap: the event handler failed")
            finally:
                self._handling.depth = depth

    def _in_handler(self) -> bool:
        return getattr(self._handling, "depth", 0) > 0

    def _not_from_handler(self, what: str) -> None:
        if self._in_handler():
            raise RuntimeError(
                f"cannot {what} a tap from its on_event handler: it waits for the thread "
                "that runs the handler; call restore() there, or tell another thread to stop"
            )

    def _gone(self) -> None:
        if not self._server_gone.is_set():
            self._server_gone.set()
            self._emit(
                Notice(time.time(), f"the server at {self.address} no longer accepts connections")
            )

    @property
    def server_gone(self) -> bool:
        """True once a connect to the server was refused: it has exited."""
        return self._server_gone.is_set()

    @property
    def bypassed(self) -> bool:
        """True once PATH no longer holds the relay's socket, so that no new client reaches
        the tap: the server removed its socket file as it exited (redis, nginx and
        PostgreSQL do, by name), or something else took PATH. Reported once, as a notice."""
        if self._bypassed.is_set():
            return True
        with self._stop_lock:
            if self._restored is not None or self._interposed.in_place():
                return False
        self._bypassed.set()
        self._emit(
            Notice(
                time.time(),
                f"{self.address} no longer leads to the tap: the server removed its socket "
                "file (as it does when it exits), or something replaced it",
            )
        )
        return True

    @property
    def active(self) -> int:
        """Connections (or datagram senders) being relayed now."""
        return self._relay.active

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def restore(self) -> str:
        """Put the server's socket back at the path now (new clients reach it directly);
        relayed connections go on. Idempotent; what happened, in one line."""
        with self._stop_lock:
            first = self._restored is None
            if first:
                self._restored = self._interposed.restore()
                self._relay.stop_accepting(wait=False)
            restored = self._restored
            assert restored is not None
        # Reported and waited for without the lock: the handler may call restore() too,
        # while this thread waits for the handler to take the report.
        if first:
            try:
                self._emit(Notice(time.time(), restored))
            finally:
                self._restore_reported.set()
        if not self._in_handler():
            # Another thread's restore() may still be reporting: stop() returns after it.
            # (From the handler neither wait: the thread that accepts may be waiting for
            # the handler to report a client; it closes the relay's socket by itself.)
            self._restore_reported.wait()
            self._relay.stop_accepting(wait=True)
        return restored

    def drain(self, timeout: float | None) -> bool:
        """Wait for the relayed connections to end (after :meth:`restore`); False if
        ``timeout`` seconds passed first."""
        self._not_from_handler("drain")
        return self._relay.wait(timeout)

    def cut(self) -> None:
        """End every relayed connection now."""
        self._relay.cut()

    def stop(self, grace: float | None = None) -> str:
        """Restore the server's socket, then wait for the relayed connections to end, for at
        most ``grace`` seconds (None: until they end) before cutting them. Idempotent."""
        self._not_from_handler("stop")
        result = self.restore()
        if not self._relay.wait(grace):
            self._emit(
                Notice(time.time(), f"cutting {self._relay.active} connections still relayed")
            )
            self._relay.cut()
            self._relay.wait(None)
        with self._stop_lock:
            if not self._stopped.is_set():
                if self._connector is not None:
                    self._connector.close()
                self._interposed.close()
                self._stopped.set()
        return result

    def __enter__(self) -> Tap:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "stopped" if self.stopped else f"{self.active} relayed"
        return f"<Tap {self.address} ({self.type}) {state}>"


def start(
    path: AddressLike,
    on_event: Callable[[Event], None],
    *,
    type: str | None = None,  # noqa: A002
) -> Tap:
    """Tap the live socket at ``path``: from now on every new connection (or datagram) to
    it is relayed to its server and reported to ``on_event``.

    ``type``: ``"stream"``, ``"seqpacket"`` or ``"dgram"`` to insist on one (None: the
    server's). Raises udskit errors when the path cannot be tapped: missing, stale, not a
    socket, of another type, already tapped, or a directory the tap may not write.
    """
    address = Address.parse(path)
    if address.kind != "path":
        raise ValueError(
            f"cannot tap {address}: only a socket file can be tapped (an abstract name or a "
            "TCP port has no file to put a relay in front of)"
        )
    if type is not None and type not in SOCKET_TYPES:
        raise ValueError(f"type must be one of {', '.join(SOCKET_TYPES)}, not {type!r}")
    interposed = interpose(address, type)
    try:
        return Tap(interposed, on_event)
    except BaseException:
        interposed.restore()
        interposed.relay.close()
        interposed.close()
        raise
