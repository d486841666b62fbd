"""The relay for stream and seqpacket sockets: each client's bytes to the server and back,
unchanged, with the descriptors passed along.

Why not the bridge's asyncio relay (:mod:`udskit.bridge`): asyncio's transports neither
carry ancillary data (SCM_RIGHTS) nor keep seqpacket boundaries, and a tap must do both.
So each direction of a connection is a thread that blocks in ``recvmsg()`` and
``sendmsg()``: a direction holds at most one read (:data:`READ_SIZE`) at a time, and a side
that does not read stops the other from being read (backpressure), with no buffer to grow.
Bytes go out in the order they came, each read's descriptors with its first byte (where the
kernel attached them); a seqpacket message goes out whole, as one message.
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

from ..accepting import AcceptVerdict, Backoff, classify
from ..ancillary import RECV_FLAGS, ancillary_size, close_fds, rights, unpack
from ..creds import PeerCred, peer_cred
from ..errors import ProtocolError
from ..options import tune_buffers
from ..wakeup import WakeUp
from .credentials import Connector, Identity, may_connect_as_self
from .describe import describe
from .events import Closed, Data, Direction, Event, Opened, Refused

__all__ = ["MAX_CONNECTIONS", "READ_SIZE", "StreamRelay"]

log = logging.getLogger("udskit")

#: Bytes one read takes from a stream: the most a direction ever holds. 256 KiB is the
#: bridge's high-water mark (RELAY_HIGH_WATER) for the same reason: one read the size of
#: the kernel's socket buffer keeps a fast sender streaming.
READ_SIZE: Final = 256 * 1024

#: Descriptors accepted with one read: the kernel's own limit (SCM_MAX_FD), so that whatever
#: a client may pass to the server passes through the tap too.
MAX_FDS: Final = 253

#: Connections relayed at once (two threads each); more clients wait in the backlog.
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

_ANCILLARY: Final = ancillary_size(MAX_FDS, creds=True)

#: What a seqpacket message costs in a send buffer besides its bytes (the skb's overhead),
#: asked for on top when the relay's buffer must grow for a large message.
_PACKET_SLACK: Final = 64 * 1024


class _Connection:
    """One relayed connection: the client's socket and ours to the server."""

    __slots__ = ("client", "cred", "done", "id", "lock", "server")

    def __init__(self, conn_id: int, client: socket.socket, cred: PeerCred) -> None:
        self.id = conn_id
        self.client = client
        self.cred = cred
        self.server: socket.socket | None = None
        self.lock = threading.Lock()
        self.done = 0

    def cut(self) -> None:
        """Wake both directions with an error (the relay is being stopped, or one side failed)."""
        for sock in (self.client, self.server):
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


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
        self._packets = kind == socket.SOCK_SEQPACKET
        self._server_path = server_sun_path
        self._server = server
        self._emit = emit
        self._connector = connector
        self._server_gone = server_gone
        self._me = Identity()
        self._connections: dict[int, _Connection] = {}
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._next_id = 0
        self._wakeup = WakeUp()
        self._closing_at: float | None = None
        self._listener.setblocking(False)
        self._thread = threading.Thread(target=self._accept_loop, name="udskit-tap", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._connections)

    # -- accepting ---------------------------------------------------------------------
    def stop_accepting(self) -> None:
        """Accept for :data:`DRAIN_AFTER_RESTORE` more, then close the listening socket."""
        self._closing_at = time.monotonic() + DRAIN_AFTER_RESTORE
        self._wakeup.wake()
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
            return len(self._connections) >= MAX_CONNECTIONS

    def _wait_for_room(self) -> None:
        with self._idle:
            self._idle.wait_for(lambda: len(self._connections) < MAX_CONNECTIONS, 1.0)

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
                    log.warning("tap: cannot accept: %s", exc.strerror)
                    return backoff.next()
                log.error("tap: accept failed: %s", exc)
                return 0.0
            backoff.reset()
            self._start(client)
        return 0.0

    def _start(self, client: socket.socket) -> None:
        client.setblocking(True)
        tune_buffers(client, None, None)
        try:
            cred = peer_cred(client)
        except OSError:
            client.close()
            return
        with self._lock:
            self._next_id += 1
            conn = _Connection(self._next_id, client, cred)
            self._connections[conn.id] = conn
        self._emit(Opened(conn.id, time.time(), cred))
        threading.Thread(
            target=self._open, args=(conn,), name=f"udskit-tap-{conn.id}", daemon=True
        ).start()

    # -- one connection ----------------------------------------------------------------
    def _open(self, conn: _Connection) -> None:
        try:
            reason = self._connect(conn)
        except BaseException:
            self._finish(conn)
            raise
        if reason is not None:
            self._emit(Refused(conn.id, time.time(), conn.cred, reason))
            self._finish(conn)
            return
        down = threading.Thread(
            target=self._pump, args=(conn, "down"), name=f"udskit-tap-{conn.id}d", daemon=True
        )
        down.start()
        self._pump(conn, "up")

    def _connect(self, conn: _Connection) -> str | None:
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
            try:
                conn.server = self._connect_once(cred, as_self)
                tune_buffers(conn.server, None, None)
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
        if self._server is not None and not as_self:
            # Reached by name, through the connector: check it is the server we tapped.
            found = peer_cred(conn.server)
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
        sock.setblocking(True)
        return sock

    def _pump(self, conn: _Connection, direction: Direction) -> None:
        assert conn.server is not None
        src, dst = (conn.client, conn.server) if direction == "up" else (conn.server, conn.client)
        reason = ""
        try:
            reason = self._copy(conn, src, dst, direction)
        except (OSError, ProtocolError) as exc:
            reason = _why(exc)
            conn.cut()
        finally:
            self._emit(Closed(conn.id, time.time(), direction, reason))
            self._finish(conn)

    def _copy(
        self, conn: _Connection, src: socket.socket, dst: socket.socket, direction: Direction
    ) -> str:
        peek = bytearray(1)
        # One buffer per direction, reused: a fresh 256 KiB bytes object per read would be
        # an mmap() and munmap() each time (it is above malloc's mmap threshold).
        buffer = bytearray(READ_SIZE)
        view = memoryview(buffer)
        while True:
            if self._packets:
                # A seqpacket message is read whole or its tail is lost: learn its size first.
                size = max(1, src.recv_into(peek, 0, socket.MSG_PEEK | socket.MSG_TRUNC))
                if size > len(buffer):
                    buffer = bytearray(size)
                    view = memoryview(buffer)
            else:
                size = READ_SIZE
            got, ancdata, flags, _ = src.recvmsg_into([view[:size]], _ANCILLARY, RECV_FLAGS)
            data = bytes(view[:got])
            fds = unpack(ancdata, flags, f"connection {conn.id}", MAX_FDS).fds
            try:
                if not data and not fds:
                    dst.shutdown(socket.SHUT_WR)
                    return "end of stream"
                # Reported before it is sent: the answer it provokes is never shown first.
                described = tuple(describe(fd) for fd in fds)
                self._emit(Data(conn.id, time.time(), direction, data, described))
                self._send(dst, data, fds)
            finally:
                close_fds(fds)

    def _send(self, dst: socket.socket, data: bytes, fds: list[int]) -> None:
        try:
            sent = dst.sendmsg([data], rights(fds, MAX_FDS))
        except OSError as exc:
            if exc.errno != errno.EMSGSIZE or not self._packets:
                raise
            # A seqpacket message must fit the sender's buffer whole. The client's did;
            # ours gets room for it too (the kernel doubles the value, for its overhead).
            dst.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, len(data) + _PACKET_SLACK)
            sent = dst.sendmsg([data], rights(fds, MAX_FDS))
        if sent < len(data):
            if self._packets:  # cannot happen: a seqpacket message goes whole or fails
                raise ProtocolError("the server's socket took part of a message")
            dst.sendall(memoryview(data)[sent:])

    def _finish(self, conn: _Connection) -> None:
        """One direction (or the whole connection, if it never started) is done."""
        with conn.lock:
            conn.done += 1
            last = conn.done == 2 or conn.server is None
        if not last:
            return
        conn.client.close()
        if conn.server is not None:
            conn.server.close()
        # Reported before the connection stops counting, so that a stop() that waits for
        # the connections to end never misses this last event.
        self._emit(Closed(conn.id, time.time(), None))
        with self._lock:
            self._connections.pop(conn.id, None)
            self._idle.notify_all()

    # -- stopping ----------------------------------------------------------------------
    def wait(self, timeout: float | None) -> bool:
        """Wait until every relayed connection has ended; False if ``timeout`` passed."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._connections, timeout)

    def cut(self) -> None:
        """End every relayed connection now."""
        with self._lock:
            connections = list(self._connections.values())
        for conn in connections:
            conn.cut()


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return os.strerror(exc.errno).lower()
    return str(exc)
