"""The relay for stream and seqpacket sockets: it accepts each client on the relay's
socket, connects to the server as the client, and hands the pair to the loop that moves
their bytes (:mod:`udskit.tap.pump`).

Accepting and connecting to the server (which may wait for a full backlog, or for a forked
connector when the tap runs as root) happen off that loop, in threads of their own, so a
slow connect never holds up the bytes of the other connections.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Final

from ..accepting import AcceptVerdict, Backoff, classify, relays_that_fit
from ..creds import PeerCred, peer_cred
from ..options import tune_buffers
from ..wakeup import WakeUp
from .credentials import Connector, Identity, may_connect_as_self
from .events import Closed, Event, Opened, Refused
from .pump import Connection, Pump

__all__ = ["CONNECT_TIMEOUT", "DRAIN_AFTER_RESTORE", "MAX_CONNECTIONS", "StreamRelay"]

log = logging.getLogger("udskit")

#: Connections relayed at once (two descriptors each, and a thread while connecting), or
#: fewer where the open-file limit leaves room for fewer; more clients wait in the backlog.
MAX_CONNECTIONS: Final = 2048

#: Connections accepted per wake-up, so that a flood of clients does not starve the rest.
_ACCEPT_BATCH: Final = 64

#: How long a connect to a server whose backlog is full is retried: the bridge's
#: CONNECT_TIMEOUT, as a blocking client would wait.
CONNECT_TIMEOUT: Final = 10.0

#: After the server's socket is back at PATH, how long the relay still accepts: a connect
#: that looked the path up just before the rename still lands on the relay's socket, and
#: queues there within microseconds; this is ample for it, and then the relay closes.
DRAIN_AFTER_RESTORE: Final = 0.1

#: Why a connection cut while its connect was under way is not relayed.
_CUT_BEFORE_CONNECTED: Final = "cut before the server accepted it"


class StreamRelay:
    """Accept on the relay's listening socket; relay each client to the server."""

    def __init__(
        self,
        listener: socket.socket,
        kind: int,
        server_sun_path: str,
        server: PeerCred | None,
        emit: Callable[[Event], None],
        connector: Connector | None,
        server_gone: Callable[[], None],
    ) -> None:
        self._listener = listener
        self._kind = kind
        self._server_path = server_sun_path
        self._server = server
        self._emit = emit
        self._connector = connector
        self._server_gone = server_gone
        self._me = Identity()
        self._connections: dict[int, Connection] = {}
        self._max_connections = min(MAX_CONNECTIONS, relays_that_fit() or MAX_CONNECTIONS)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._next_id = 0
        self._wakeup = WakeUp()
        self._closing_at: float | None = None
        self._listener.setblocking(False)
        self._pump = Pump(kind == socket.SOCK_SEQPACKET, emit, self._forget)
        self._thread = threading.Thread(target=self._accept_loop, name="udskit-tap", daemon=True)

    def start(self) -> None:
        self._pump.start()
        self._thread.start()

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._connections)

    # -- accepting ---------------------------------------------------------------------
    def stop_accepting(self, *, wait: bool = True) -> None:
        """Accept for :data:`DRAIN_AFTER_RESTORE` more, then close the listening socket;
        ``wait``: until it is closed."""
        if self._closing_at is None:  # again (restore() waiting for it): only the wait
            self._closing_at = time.monotonic() + DRAIN_AFTER_RESTORE
            self._wakeup.wake()
        if wait:
            self._thread.join()

    def _accept_loop(self) -> None:
        poller = select.poll()
        poller.register(self._listener.fileno(), select.POLLIN)
        poller.register(self._wakeup.fd, select.POLLIN)
        backoff = Backoff()
        try:
            while True:
                timeout = None
                if self._closing_at is not None:
                    left = self._closing_at - time.monotonic()
                    if left <= 0:
                        self._accept_batch(backoff, until_empty=True)
                        return
                    timeout = int(left * 1000) + 1
                ready = poller.poll(timeout)
                if any(fd == self._wakeup.fd for fd, _ in ready):
                    self._wakeup.drain()
                if self._at_capacity():
                    poller.unregister(self._listener.fileno())
                    self._wait_for_room()
                    poller.register(self._listener.fileno(), select.POLLIN)
                    continue
                pause = self._accept_batch(backoff, until_empty=False)
                if pause:
                    time.sleep(pause)  # the process ran out of descriptors: let some close
        finally:
            self._listener.close()
            self._wakeup.close()

    def _at_capacity(self) -> bool:
        with self._lock:
            return len(self._connections) >= self._max_connections

    def _wait_for_room(self) -> None:
        with self._idle:
            self._idle.wait_for(lambda: len(self._connections) < self._max_connections, 1.0)

    def _accept_batch(self, backoff: Backoff, *, until_empty: bool) -> float:
        for _ in range(_ACCEPT_BATCH if not until_empty else 1 << 30):
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return 0.0
            except OSError as exc:
                verdict = classify(exc)
                if verdict is AcceptVerdict.RETRY:
                    continue
                if verdict is AcceptVerdict.BACK_OFF:
                    return backoff.failed(exc, "tap")
                log.error("tap: accept failed: %s", exc)
                return 0.0
            backoff.succeeded("tap")
            self._start(client)
        return 0.0

    def _start(self, client: socket.socket) -> None:
        try:
            cred = peer_cred(client)
        except OSError:
            client.close()
            return
        tune_buffers(client, None, None)
        with self._lock:
            self._next_id += 1
            conn = Connection(self._next_id, client, cred)
            self._connections[conn.id] = conn
        self._emit(Opened(conn.id, time.time(), cred))
        threading.Thread(
            target=self._open, args=(conn,), name=f"udskit-tap-{conn.id}", daemon=True
        ).start()

    # -- connecting to the server --------------------------------------------------------
    def _open(self, conn: Connection) -> None:
        try:
            reason = self._connect(conn)
        except BaseException:
            self._unstarted(conn)
            raise
        if reason is not None:
            self._emit(Refused(conn.id, time.time(), conn.cred, reason))
            self._unstarted(conn)
            return
        self._pump.add(conn)

    def _connect(self, conn: Connection) -> str | None:
        """Connect to the server as the client; None, or why the client is refused."""
        cred = conn.cred
        as_self = may_connect_as_self(self._me, cred)
        if not as_self and self._connector is None:
            return (
                f"client uid {cred.uid} gid {cred.gid} is not the tap's user (uid "
                f"{self._me.uid} gid {self._me.gid}): connecting for it would give it the tap's "
                "rights; run the tap as root to relay other users' clients"
            )
        deadline = time.monotonic() + CONNECT_TIMEOUT
        delay = 0.001
        while True:
            if conn.was_cut():
                return _CUT_BEFORE_CONNECTED
            try:
                server = self._connect_once(cred, as_self)
                break
            except OSError as exc:
                if exc.errno == errno.EAGAIN and time.monotonic() < deadline:
                    time.sleep(delay)  # the server's backlog is full: wait as a client would
                    delay = min(delay * 2, 0.05)
                    continue
                if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                    self._server_gone()
                    return "the server no longer accepts connections"
                why = os.strerror(exc.errno or 0).lower()
                return f"cannot connect to the server as uid {cred.uid}: {why}"
        with conn.lock:  # a cut() from now on reaches this socket too
            conn.server = server
            if conn.was_cut():
                return _CUT_BEFORE_CONNECTED
        tune_buffers(server, None, None)
        if self._server is not None and not as_self:
            # Reached by name, through the connector: check it is the server we tapped.
            found = peer_cred(server)
            if (found.pid, found.uid) != (self._server.pid, self._server.uid):
                return (
                    f"the tapped name led to another server (pid {found.pid}, uid {found.uid}); "
                    "the client is not relayed"
                )
        return None

    def _connect_once(self, cred: PeerCred, as_self: bool) -> socket.socket:
        if not as_self:
            assert self._connector is not None
            return self._connector.connect(cred, self._kind)
        sock = socket.socket(
            socket.AF_UNIX, self._kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        )
        code = sock.connect_ex(self._server_path)
        if code != 0:
            sock.close()
            raise OSError(code, os.strerror(code))
        return sock

    def _unstarted(self, conn: Connection) -> None:
        """A connection refused or failed before it was relayed: closed and forgotten."""
        conn.close()
        self._forget(conn)

    def _forget(self, conn: Connection) -> None:
        # Reported before the connection stops counting, so that a stop() that waits for
        # the connections to end never misses this last event.
        self._emit(Closed(conn.id, time.time(), None))
        with self._lock:
            self._connections.pop(conn.id, None)
            self._idle.notify_all()

    # -- stopping ----------------------------------------------------------------------
    def wait(self, timeout: float | None) -> bool:
        """Wait until every relayed connection has ended; False if ``timeout`` passed.
        Once they have and the relay no longer accepts, its loop ends too."""
        deadline = None if timeout is None else time.monotonic() + timeout
        # Read once: a restore() from another thread meanwhile leaves the relay accepting
        # for a while yet, and the loop must then go on for the connections it accepts.
        closing = self._closing_at is not None
        if closing:
            self._thread.join(timeout)  # a connection it accepts last counts too
            if self._thread.is_alive():
                return False
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        with self._idle:
            idle = self._idle.wait_for(lambda: not self._connections, left)
        if idle and closing:
            self._pump.stop()
        return idle

    def cut(self) -> None:
        """End every relayed connection now."""
        with self._lock:
            connections = list(self._connections.values())
        for conn in connections:
            conn.cut()
