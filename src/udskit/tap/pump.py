"""The loop that relays the bytes of every stream and seqpacket connection of a tap: one
thread, non-blocking sockets, epoll.

Why not the bridge's asyncio relay (:mod:`udskit.bridge`): asyncio's transports neither
carry ancillary data (SCM_RIGHTS) nor keep seqpacket boundaries, and a tap must do both.
Each direction of a connection holds at most one read (:data:`READ_SIZE`), and while that
read is not yet written on, its side is not read again (backpressure to the faster side,
with no buffer to grow). Bytes go out in the order they came, a seqpacket message whole,
as one message. A read's descriptors go out with the bytes they came with, as nearly as a
relay can tell (see :data:`FDS_WITH_LAST`).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Final

from ..ancillary import RECV_FLAGS, ancillary_size, close_fds, rights, unpack
from ..creds import PeerCred
from ..errors import ProtocolError
from ..wakeup import WakeUp
from .describe import describe
from .events import Closed, Data, Direction, Event

__all__ = [
    "FDS_WITH_LAST",
    "MAX_FDS",
    "MAX_HELD_BYTES",
    "MAX_HELD_EVENTS",
    "READ_SIZE",
    "Connection",
    "Pump",
]

log = logging.getLogger("udskit")

#: Bytes one read takes from a stream: the most a direction ever holds. 256 KiB is the
#: bridge's high-water mark (RELAY_HIGH_WATER) for the same reason: one read the size of
#: the kernel's socket buffer keeps a fast sender streaming.
READ_SIZE: Final = 256 * 1024

#: Descriptors accepted with one read: the kernel's own limit (SCM_MAX_FD), so that whatever
#: a client may pass to the server passes through the tap too.
MAX_FDS: Final = 253

#: Events the relay's loop holds while sockets are ready, before it hands them to the
#: handler anyway: relaying comes first (a reply read before the handler runs is a shorter
#: round trip), but a busy loop still reports every few messages, and at once after a large
#: read (holding several would keep a copy of each alive: more memory for malloc to fault
#: in again, measured slower with benchmarks/tap.py).
MAX_HELD_EVENTS: Final = 64
MAX_HELD_BYTES: Final = 64 * 1024

_ANCILLARY: Final = ancillary_size(MAX_FDS)

#: epoll's events on which the loop tries to read or write: ready for it, or the socket
#: failed or was shut down (the call then fails, or reads the end, and says why).
_READABLE: Final = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP
_WRITABLE: Final = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP

#: Errors of a write whose receiver has closed its socket or shut down reading.
_RECEIVER_GONE: Final = frozenset({errno.EPIPE, errno.ECONNRESET})

#: recv() flags that tell a seqpacket message's size without taking it (plain int: see
#: ancillary's _CTRUNC).
_PEEK_SIZE: Final = int(socket.MSG_PEEK | socket.MSG_TRUNC)

#: Where in a stream read its descriptors are passed on: with the first of its last this
#: many bytes. Linux hands one read the bytes of several sends, and the descriptors of the
#: last of them, and ends the read with that send's kernel buffer (an skb, which holds at
#: most 32 KiB and a page's head on a Unix stream socket). So the descriptors belong to a
#: byte of the read's last 32 KiB or so: passed on there, as a kernel buffer of their own,
#: they reach the server with the bytes they came with (a receiver that hands descriptors
#: to the last message beginning in a read, as udskit's own do, gets them on the right
#: message), where at the read's first byte they could come 200 KiB early.
FDS_WITH_LAST: Final = 32 * 1024

#: What a seqpacket message costs in a send buffer besides its bytes (the skb's overhead),
#: asked for on top when the relay's buffer must grow for a large message.
_PACKET_SLACK: Final = 64 * 1024


class Flow:
    """One direction of a connection: what ``src`` says, written to ``dst``."""

    __slots__ = ("direction", "dst", "ended", "fds", "fds_at", "pending", "src")

    def __init__(self, direction: Direction, src: socket.socket, dst: socket.socket) -> None:
        self.direction: Direction = direction
        self.src = src
        self.dst = dst
        #: What was read and is not yet written (None: nothing; ``src`` may be read).
        self.pending: bytes | memoryview | None = None
        #: The descriptors that came with ``pending``, passed with its byte ``fds_at``.
        self.fds: list[int] = []
        self.fds_at = 0
        self.ended = False


class Connection:
    """One relayed connection: the client's socket and ours to the server."""

    __slots__ = ("client", "cred", "cut_asked", "flows", "id", "lock", "masks", "server")

    def __init__(self, conn_id: int, client: socket.socket, cred: PeerCred) -> None:
        self.id = conn_id
        self.client = client
        self.cred = cred
        self.server: socket.socket | None = None
        #: Held while a socket is shut down from another thread or closed by the pump,
        #: so that a cut never reaches a descriptor number already reused.
        self.lock = threading.Lock()
        self.flows: tuple[Flow, Flow] | None = None  # up, down; once connected
        self.masks: dict[socket.socket, int] = {}  # what the loop has epoll wait for
        #: Set by cut(): a connect still under way gives up, or its socket is not relayed.
        self.cut_asked = False

    def cut(self) -> None:
        """Wake both directions with an error (the relay is being stopped, or one side failed)."""
        with self.lock:
            self.cut_asked = True
            for sock in (self.client, self.server):
                if sock is not None and sock.fileno() >= 0:
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

    def was_cut(self) -> bool:
        return self.cut_asked

    def close(self) -> None:
        with self.lock:
            self.client.close()
            if self.server is not None:
                self.server.close()
            for flow in self.flows or ():
                close_fds(flow.fds)
            self.flows = None


class Pump:
    """The loop that moves every connection's bytes: one thread, non-blocking sockets.

    Each socket is watched for reading while its direction has nothing pending, and for
    writing while the other direction has something pending for it; a direction whose
    write is stuck (a peer not reading) thus stops its side from being read. One read per
    socket per wake-up, so that one busy connection does not starve the others.

    Events (what was relayed, what ended) are handed to the handler by this same thread
    when no socket is ready: messages are passed on first, the peers work on them while
    the handler runs, and the answers they provoke, read by this loop afterwards, are never
    reported first. A busy loop hands them over every :data:`MAX_HELD_EVENTS` events or
    :data:`MAX_HELD_BYTES` bytes. No second thread takes the GIL from the loop (with one,
    measured with benchmarks/tap.py, tapped throughput was 0.6x the bridge's), and a
    handler that cannot keep up slows the relay down instead of growing a queue. The loop
    waits in epoll itself: selectors' bookkeeping cost more than the rest of relaying a
    small message.
    """

    def __init__(
        self, packets: bool, emit: Callable[[Event], None], ended: Callable[[Connection], None]
    ) -> None:
        self._packets = packets
        self._emit = emit
        self._ended = ended
        self._epoll = select.epoll()
        self._wakeup = WakeUp()
        self._epoll.register(self._wakeup.fd, select.EPOLLIN)
        self._watched: dict[int, tuple[Connection, socket.socket]] = {}  # by descriptor
        self._lock = threading.Lock()
        self._arrived: deque[Connection] = deque()
        self._stopping = False
        self._live = 0
        self._held: list[Event] = []  # events not yet handed to the handler, in order
        self._held_bytes = 0
        # One buffer, reused for every read: a fresh 256 KiB object per read would be an
        # mmap() (it is above malloc's mmap threshold) and fresh pages faulted in each time.
        self._buffer = bytearray(READ_SIZE)
        self._view = memoryview(self._buffer)
        self._into = [self._view]  # recvmsg_into()'s buffers for a stream
        self._peek = bytearray(1)
        self._thread = threading.Thread(target=self._run, name="udskit-tap-relay", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def add(self, conn: Connection) -> None:
        """Relay ``conn`` (its server side is connected) from now on."""
        with self._lock:
            self._arrived.append(conn)
        self._wakeup.wake()

    def stop(self) -> None:
        """End the loop once no connection is left (the relay accepts no more)."""
        with self._lock:
            self._stopping = True
        self._wakeup.wake()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def _run(self) -> None:
        try:
            while True:
                ready = self._epoll.poll(0 if self._held else -1)
                if not ready:
                    self._hand_over()  # nothing else to do now
                    continue
                for fd, mask in ready:
                    watched = self._watched.get(fd)
                    if watched is not None:
                        try:
                            self._serve(watched[0], watched[1], mask)
                        except Exception:
                            # A bug must cost one connection, not the loop every other
                            # connection (and stop()) depends on.
                            log.exception("tap: relaying connection %d failed", watched[0].id)
                            self._abandon(watched[0])
                    elif fd == self._wakeup.fd:
                        self._wakeup.drain()
                        self._take_arrivals()
                if len(self._held) >= MAX_HELD_EVENTS or self._held_bytes >= MAX_HELD_BYTES:
                    self._hand_over()
                if self._stopping and not self._live:
                    with self._lock:
                        if not self._arrived:
                            return
        finally:
            self._hand_over()
            self._epoll.close()
            self._wakeup.close()

    def _hold(self, event: Event) -> None:
        self._held.append(event)
        if isinstance(event, Data):
            self._held_bytes += len(event.data)

    def _hand_over(self) -> None:
        """Hand every held event to the handler, in order."""
        held, self._held, self._held_bytes = self._held, [], 0
        for event in held:
            self._emit(event)

    def _take_arrivals(self) -> None:
        with self._lock:
            arrived, self._arrived = self._arrived, deque()
        for conn in arrived:
            try:
                self._start_relaying(conn)
            except Exception:
                # (epoll may refuse a watch: ENOSPC at max_user_watches) One connection
                # lost, not the loop.
                log.exception("tap: relaying connection %d failed", conn.id)
                if conn.flows is not None:
                    self._abandon(conn)
                else:
                    conn.close()
                    self._ended(conn)

    def _start_relaying(self, conn: Connection) -> None:
        assert conn.server is not None
        conn.client.setblocking(False)
        conn.server.setblocking(False)
        conn.flows = (
            Flow("up", conn.client, conn.server),
            Flow("down", conn.server, conn.client),
        )
        self._live += 1
        self._watch(conn)

    def _serve(self, conn: Connection, side: socket.socket, mask: int) -> None:
        if conn.flows is None:
            return  # finished earlier in this wake-up
        up, down = conn.flows
        reading, writing = (up, down) if side is conn.client else (down, up)
        before = (reading.pending is None, writing.pending is None, reading.ended, writing.ended)
        flow, sending = writing, True
        try:
            if mask & _WRITABLE and writing.pending is not None and not writing.ended:
                self._flush(writing)
            flow, sending = reading, False
            readable = mask & _READABLE and reading.pending is None and not reading.ended
            if readable and self._read(conn, reading):
                sending = True
                self._flush(reading)
        except (OSError, ProtocolError) as exc:
            self._end(conn, flow, _why(exc))
            if sending and isinstance(exc, OSError) and exc.errno in _RECEIVER_GONE:
                # The receiving side no longer reads (closed, or shut down for reading):
                # what it would have read is lost as it would be without the tap, but the
                # other direction still carries what that side sent before (a server's
                # last reply). The sender's writes to us now fail as they would have.
                _shut(flow.src, socket.SHUT_RD)
            else:
                conn.cut()
        if up.ended and down.ended:
            self._finish(conn)
        elif before != (
            reading.pending is None,
            writing.pending is None,
            reading.ended,
            writing.ended,
        ):
            self._watch(conn)  # what epoll should wait for has changed

    def _read(self, conn: Connection, flow: Flow) -> bool:
        """Read what ``flow``'s side says; True if there is something to write."""
        view = self._view
        try:
            if self._packets:
                # A seqpacket message is read whole or its tail is lost: learn its size first.
                size = max(1, flow.src.recv_into(self._peek, 0, _PEEK_SIZE))
                if size > READ_SIZE:
                    view = memoryview(bytearray(size))  # a rare large message: its own buffer
                into = [view[:size]]
            else:
                into = self._into
            got, ancdata, flags, _ = flow.src.recvmsg_into(into, _ANCILLARY, RECV_FLAGS)
        except (BlockingIOError, InterruptedError):
            return False  # woken for the other direction, or by a cut: nothing to read yet
        # The copy the event and the pending write own; the buffer is read into again.
        data = bytes(view[:got])
        fds: list[int] = []
        if ancdata or flags:  # the common case, nothing but bytes, without a call
            fds = unpack(ancdata, flags, f"connection {conn.id}", MAX_FDS).fds
        if not data and not fds:
            flow.dst.shutdown(socket.SHUT_WR)
            self._end(conn, flow, "end of stream")
            return False
        flow.pending = data
        flow.fds = fds  # from here on closed with the flow, whatever happens
        # Bytes of the read to write before its descriptors go (see FDS_WITH_LAST).
        flow.fds_at = max(0, len(data) - FDS_WITH_LAST) if fds and not self._packets else 0
        described = tuple(map(describe, fds)) if fds else ()
        # Held until the loop is idle: the handler's time is not added to the relay's,
        # and the answer it provokes, read later by this loop, is never reported first.
        self._hold(Data(conn.id, time.time(), flow.direction, data, described))
        return True

    def _flush(self, flow: Flow) -> None:
        """Write what ``flow`` holds, or as much as the other side takes now."""
        assert flow.pending is not None
        data = flow.pending
        try:
            if flow.fds_at:  # the bytes before the descriptors, first
                sent = self._send(flow.dst, memoryview(data)[: flow.fds_at], [])
                flow.fds_at -= sent
                data = flow.pending = memoryview(data)[sent:]
                if flow.fds_at:
                    return  # the other side took part: the rest when it can take more
            sent = self._send(flow.dst, data, flow.fds)
        except (BlockingIOError, InterruptedError):
            return  # the other side's buffer is full: wait until it can take more
        if flow.fds:
            close_fds(flow.fds)  # passed along with that byte: ours are copies
            flow.fds = []
        flow.pending = memoryview(data)[sent:] if sent < len(data) else None

    def _send(self, dst: socket.socket, data: bytes | memoryview, fds: list[int]) -> int:
        try:
            sent = dst.sendmsg([data], rights(fds, MAX_FDS)) if fds else dst.send(data)
        except OSError as exc:
            if exc.errno != errno.EMSGSIZE or not self._packets:
                raise
            # A seqpacket message must fit the sender's buffer whole. The client's did;
            # ours gets room for it too (the kernel doubles the value, for its overhead).
            dst.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, len(data) + _PACKET_SLACK)
            sent = dst.sendmsg([data], rights(fds, MAX_FDS))
        if self._packets and sent < len(data):  # cannot happen: all of a message or none
            raise ProtocolError("the server's socket took part of a message")
        return sent

    def _end(self, conn: Connection, flow: Flow, reason: str) -> None:
        flow.ended = True
        flow.pending = None
        close_fds(flow.fds)
        flow.fds = []
        self._hold(Closed(conn.id, time.time(), flow.direction, reason))

    def _watch(self, conn: Connection) -> None:
        """Have epoll wait for what each of the connection's sockets may do next."""
        assert conn.flows is not None
        up, down = conn.flows
        for reading, writing in ((up, down), (down, up)):
            sock = reading.src
            mask = 0
            if not reading.ended and reading.pending is None:
                mask |= select.EPOLLIN
            if not writing.ended and writing.pending is not None:
                mask |= select.EPOLLOUT
            before = conn.masks.get(sock, 0)
            if mask == before:
                continue
            fd = sock.fileno()
            if not before:
                self._epoll.register(fd, mask)
                self._watched[fd] = (conn, sock)
            elif not mask:
                self._epoll.unregister(fd)
                del self._watched[fd]
            else:
                self._epoll.modify(fd, mask)
            conn.masks[sock] = mask

    def _abandon(self, conn: Connection) -> None:
        """End a connection that relaying failed on unexpectedly."""
        if conn.flows is None:
            return
        for flow in conn.flows:
            if not flow.ended:
                self._end(conn, flow, "the tap failed to relay it (see its log)")
        conn.cut()
        self._finish(conn)

    def _finish(self, conn: Connection) -> None:
        for sock, mask in conn.masks.items():
            if mask:
                self._watched.pop(sock.fileno(), None)
                try:
                    self._epoll.unregister(sock)
                except OSError:
                    pass  # never registered: _watch() failed half-way (see _abandon)
        conn.masks.clear()
        conn.close()
        self._live -= 1
        self._hand_over()  # the connection's last events, before it stops counting
        self._ended(conn)


def _shut(sock: socket.socket, how: int) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass  # already gone: nothing left to tell it


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return os.strerror(exc.errno).lower()
    return str(exc)
