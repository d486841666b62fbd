"""One client of a message server, as its handler sees it, and the per-connection engine both
message servers (blocking :mod:`udskit.messageserver`, asyncio
:mod:`udskit.aio.messageserver`) drive.

A :class:`Connection` reads what the kernel has into the server's shared buffer, decodes
messages with the sans-IO framing, hands each to the server (its *driver*) for the handler,
and collects the replies the handler returns or sends. The replies of one wake-up go out
together, one system call for all of them, once the read's messages have been handled; what
the kernel does not take waits in an :class:`~udskit.proto.outbox.Outbox`, and while that
holds more than its high watermark the connection stops reading its client (backpressure: a
client that never reads holds about that much of the server's memory in replies to its own
requests, and only it waits). What a handler sends to *other* clients from the loop thread
(a broadcast) is never refused or delayed; such a handler checks ``outbox_size`` first. A
connection costs no buffer of its own until a message arrives in pieces.

Threads: the driver's loop thread owns the connection. ``send()`` may also be called from
any other thread (a worker, a thread streaming a command's output): it hands the message to
the loop thread, and waits while the connection's outbox is over its high watermark.

Descriptors a message brought (``fds``) belong to the handler while it runs; those it has not
taken with ``take_fds()`` are closed when it returns. Descriptors passed to ``send_fds()`` are
duplicated at once, so the caller may close its own right after.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence
from threading import get_ident
from typing import TYPE_CHECKING, Any, Final, Protocol

from .address import Address
from .ancillary import RECV_FLAGS, ancillary_size, close_fds, descriptors, rights, unpack
from .creds import PeerCred
from .errors import ConnectionClosed, ProtocolError, UdsError
from .options import SocketType, check_message
from .proto import CLOSED, NEED_DATA, Framing
from .proto.outbox import IOV_MAX, Outbox
from .translate import translate

if TYPE_CHECKING:
    from .listening import DatagramListener

__all__ = ["DEFAULT_MAX_OUTBOX", "Connection", "Driver"]

log = logging.getLogger("udskit")

#: Bytes a connection may hold for a client that does not read before it stops reading that
#: client (and a sending thread waits). Four times the 1 MiB socket buffer a stream gets:
#: enough to keep the kernel busy, small enough that 10,000 slow clients cannot exhaust
#: memory. Reading resumes at a quarter of it.
DEFAULT_MAX_OUTBOX: Final = 4 * 1024 * 1024

#: Packets (seqpacket) read per wake-up before the loop turns to other clients: fairness.
PACKETS_PER_WAKEUP: Final = 64

#: Replies up to this size are joined into one bytes object to go out in one send(); larger
#: ones go out scatter-gather, without a copy.
JOIN_LIMIT: Final = 64 * 1024

#: No SIGPIPE on a closed peer: EPIPE comes back as an error instead.
SEND_FLAGS: Final = int(socket.MSG_NOSIGNAL)

#: A client that resets or vanishes: close quietly, it is not the server's failure.
_GONE_ERRNOS: Final = frozenset(
    {errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ESHUTDOWN, errno.ETIMEDOUT}
)

_CTRUNC: Final = int(socket.MSG_CTRUNC)
_TRUNC: Final = int(socket.MSG_TRUNC)

#: (read, write, hang_up) interest, one object each, compared by identity on the hot path.
#: hang_up: neither read nor write, but tell us once when the client has gone entirely (its
#: end of stream is read, and a worker or a command still has the connection).
_EVENTS: Final = {
    (r, w, h): (r, w, h) for r in (False, True) for w in (False, True) for h in (False, True)
}
_READING: Final = _EVENTS[True, False, False]


class Driver(Protocol):
    """What a connection needs from the server that runs it."""

    def watch(self, conn: Connection, read: bool, write: bool, hang_up: bool) -> None:
        """Watch ``conn``'s socket for these events (in the loop thread); ``hang_up``: for
        the client's hang-up alone, reported once (``on_readable`` is called)."""

    def in_loop(self) -> bool:
        """Whether the caller runs in the loop thread."""

    def call_soon(self, callback: Callable[..., object], *args: Any) -> None:
        """Run ``callback(*args)`` in the loop thread; safe from any thread."""

    def dispatch(self, conn: Connection, message: bytes, fds: list[int]) -> None:
        """Hand one message to the handler (in the loop thread)."""

    def ended(self, conn: Connection) -> None:
        """``conn``'s client has sent all it will (in the loop thread)."""

    def dropped(self, conn: Connection) -> None:
        """``conn`` is closed: forget it (in the loop thread)."""

    def send_datagram(
        self,
        listener: DatagramListener,
        to: Address,
        data: bytes | bytearray | memoryview,
        fds: Sequence[int],
    ) -> None:
        """Send a datagram reply, waiting as the loop allows while the receiver is full."""


class Connection:
    """One client: ``send()`` replies; ``peer`` says who it is; ``state`` keeps what the
    handler wants to remember between messages."""

    __slots__ = (
        "__weakref__",
        "_ancsize",
        "_closing",
        "_driver",
        "_eof",
        "_events",
        "_fds",
        "_fds_seen",
        "_framing",
        "_held",
        "_listener",
        "_loop_thread",
        "_max_fds",
        "_out",
        "_paused",
        "_pending",
        "_pending_size",
        "_posted",
        "_reading",
        "_sock",
        "_space",
        "_stalled",
        "_state",
        "_type",
        "busy",
        "closed",
        "ends_with_client",
        "fd",
        "id",
        "peer",
        "remote",
    )

    def __init__(
        self,
        sock: socket.socket | None,
        driver: Driver,
        *,
        id: int,  # noqa: A002 - the natural name
        kind: SocketType,
        framing: Framing | None,
        peer: PeerCred | None,
        remote: Address | None,
        max_fds: int,
        max_outbox: int,
        loop_thread: int,
        listener: DatagramListener | None = None,
    ) -> None:
        self._loop_thread = loop_thread
        self._sock = sock
        self.fd = sock.fileno() if sock is not None else -1
        self._driver = driver
        self.id = id
        self._type: SocketType = kind
        self._framing = framing
        self.peer = peer
        self.remote = remote
        self._max_fds = max_fds
        self._ancsize = ancillary_size(max_fds) if max_fds else 0
        self._listener = listener
        self._out: Outbox[list[int]] = Outbox(max_outbox, max_outbox // 4)
        self._pending: list[bytes] = []  # small replies of this wake-up, joined at flush
        self._pending_size = 0
        self._posted = 0  # bytes handed over by other threads, not queued yet
        self._space: threading.Condition | None = None  # made when another thread sends
        self._fds: list[int] = []
        self._fds_seen = False  # descriptors ever arrived on this stream
        self._state: dict[str, Any] | None = None
        self._events = _READING  # what the driver watches (read, write): it starts reading
        self._paused = False  # not reading: outbox over its high watermark
        self._stalled = False  # not reading: the framing holds messages left when it filled
        self._held = False  # not reading: the driver said so (hold())
        self._eof = False  # the client will send nothing more
        self._closing = False  # close once the outbox is empty
        self._reading = False  # in on_readable: what is sent now goes out at its end
        self.busy = False  # a worker or a task has this connection's messages
        # Close as soon as the client has gone entirely, busy or not: for a connection whose
        # messages go straight on as they arrive (to a command), so none can be waiting.
        self.ends_with_client = False
        self.closed = False

    # -- what the handler uses ----------------------------------------------------------
    @property
    def type(self) -> SocketType:
        return self._type

    @property
    def state(self) -> dict[str, Any]:
        """A dict for the handler's own per-connection state."""
        if self._state is None:
            self._state = {}
        return self._state

    @property
    def fds(self) -> tuple[int, ...]:
        """Descriptors that came with the message being handled (closed after the handler
        returns, unless taken with ``take_fds()``)."""
        return tuple(self._fds)

    def take_fds(self) -> list[int]:
        """Take ownership of the descriptors that came with the current message."""
        fds, self._fds = self._fds, []
        return fds

    @property
    def outbox_size(self) -> int:
        """Bytes accepted for this client that the kernel has not taken yet."""
        return self._out.size + self._pending_size

    def send(self, data: bytes | bytearray | memoryview) -> None:
        """Send one message to this client (framed on a stream, one packet otherwise).

        From the loop thread (a handler) the message is queued and goes out with the
        others of this wake-up; from another thread it is handed to the loop, and the call
        waits while the client's outbox is full. Raises ConnectionClosed once the
        connection is closed.
        """
        framing = self._framing
        if (
            type(data) is bytes
            and framing is not None
            and len(data) <= JOIN_LIMIT
            and not self._closing
            and not self.closed  # else queued for nobody, and never said so
            and not self._out.size
            and get_ident() == self._loop_thread
        ):
            # The common case, a small reply from the handler: queued for the flush.
            frame = framing.frame(data)
            self._pending.append(frame)
            self._pending_size += len(frame)
            if not self._reading:
                self._flush_soon()
            return
        self._send(data, ())

    def send_fds(self, data: bytes | bytearray | memoryview, fds: Sequence[int]) -> None:
        """Send one message with descriptors attached (duplicated now: close yours)."""
        check_message(data, "send_fds")
        listed = descriptors(fds, "send_fds")
        rights(listed, self._max_fds)  # checks the count against max_fds
        self._send(data, listed)

    def close(self) -> None:
        """Close the connection once what was sent has gone out (the client then reads
        the end of the stream)."""
        if get_ident() == self._loop_thread:
            self._close_when_flushed()
        else:
            self._driver.call_soon(self._close_when_flushed)

    def __repr__(self) -> str:
        who = f" pid {self.peer.pid} uid {self.peer.uid}" if self.peer is not None else ""
        state = " closed" if self.closed else ""
        return f"<udskit.Connection {self.id} {self._type}{who}{state}>"

    # -- sending ------------------------------------------------------------------------
    def _send(self, data: bytes | bytearray | memoryview, fds: Sequence[int]) -> None:
        if self.closed or self._closing:
            raise ConnectionClosed(f"{self._where()}: the connection is closed")
        if self._type == "dgram":
            self._send_datagram(data, fds)
            return
        framing = self._framing
        try:
            if framing is None:
                # bytes(42) would be 42 zero bytes: a packet must be bytes-like already.
                check_message(data, "send")
                parts: list[bytes | bytearray | memoryview] = [bytes(data)]
                if not parts[0] and self._type == "seqpacket":  # the outbox would skip it
                    raise ProtocolError(
                        "cannot send an empty seqpacket message: the receiver reads it as "
                        "end of connection"
                    )
            elif len(data) <= JOIN_LIMIT:
                parts = [framing.frame(data)]
            else:
                parts = list(framing.encode(data))
        except TypeError:
            check_message(data, "send")
            raise
        if get_ident() == self._loop_thread:
            self._queue(parts, list(map(os.dup, fds)) if fds else None)
            if not self._reading:
                self._flush_soon()
            return
        # Another thread: copy what the caller may reuse, hand over, then wait for room.
        owned = [p if type(p) is bytes else bytes(p) for p in parts]
        dups = list(map(os.dup, fds)) if fds else None
        size = sum(map(len, owned))
        space = self._space_condition()
        with space:
            self._posted += size
        self._driver.call_soon(self._queue_posted, owned, dups, size)
        with space:
            while not self.closed and self._out.size + self._posted > self._out.high:
                space.wait()
        if self.closed:
            raise ConnectionClosed(f"{self._where()}: the connection is closed")

    def _flush_soon(self) -> None:
        """Sent from the loop thread outside this connection's own read (another client's
        handler, on_connect): no flush of ours follows, so ask the driver for one."""
        self._driver.call_soon(self.flush)

    def _space_condition(self) -> threading.Condition:
        space = self._space
        if space is None:
            # Made once, under a lock: two threads racing here must wait on the same one.
            with _SPACE_LOCK:
                space = self._space
                if space is None:
                    space = self._space = threading.Condition()
        return space

    def _queue_posted(self, parts: list[bytes], fds: list[int] | None, size: int) -> None:
        space = self._space
        assert space is not None
        with space:
            self._posted -= size
        if self.closed or self._closing:
            if fds:
                close_fds(fds)
            return
        self._queue(parts, fds)  # type: ignore[arg-type]
        self.flush()

    def _queue(self, parts: list[bytes | bytearray | memoryview], fds: list[int] | None) -> None:
        if fds is None and len(parts) == 1 and type(parts[0]) is bytes and not self._out.size:
            self._pending.append(parts[0])
            self._pending_size += len(parts[0])
            return
        self._move_pending()
        self._out.push(parts, fds)  # type: ignore[arg-type]

    def _move_pending(self) -> None:
        if not self._pending:
            return
        out = self._out
        if self._framing is None:
            for packet in self._pending:  # packets stay apart
                out.push([packet])
        else:
            out.push([b"".join(self._pending)])
        self._pending = []
        self._pending_size = 0

    def flush(self) -> None:
        """Send what is queued, as far as the kernel takes it (in the loop thread)."""
        if self.closed:
            return
        pending = self._pending
        out = self._out
        if pending and not out.size and self._framing is not None:
            data = pending[0] if len(pending) == 1 else b"".join(pending)
            self._pending = []
            self._pending_size = 0
            try:
                sent = self._sock.send(data, SEND_FLAGS)  # type: ignore[union-attr]
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._failed(exc, "send")
                return
            if (
                sent == len(data)
                and self._events is _READING
                and not self._closing
                and not self._stalled
            ):
                if self._space is not None:
                    self._after_flush()
                return  # all gone, reading as before: nothing to change
            if sent < len(data):
                out.push([memoryview(data)[sent:]])
        else:
            self._move_pending()
        if out.size and not self._flush_outbox():
            return
        self._after_flush()

    def _flush_outbox(self) -> bool:
        """Drain the outbox into the socket; False if the connection failed."""
        out = self._out
        packets = self._framing is None
        sock = self._sock
        assert sock is not None
        while out:
            views, fds = out.batch(1 if packets else IOV_MAX)
            ancillary = rights(fds, len(fds)) if fds else ()
            try:
                sent = sock.sendmsg(views, ancillary, SEND_FLAGS)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._failed(exc, "send")
                return False
            went = out.sent(sent)
            if went:
                close_fds(went)  # our duplicates: the kernel holds its own now
        return True

    def _after_flush(self) -> None:
        out = self._out
        if out.drained and self._space is not None:
            with self._space:
                self._space.notify_all()
        if not out and (self._closing or self._eof) and not self.busy:
            self.abort()
            return
        if self._paused and out.drained:
            self._paused = False
        elif not self._paused and out.full:
            self._paused = True
        if self._stalled and not (self._paused or self._held):
            self._driver.call_soon(self._resume)
        self._update()

    def _update(self) -> None:
        """Tell the driver what to watch: reading unless paused, ended or busy with a
        worker's backlog; writing while the outbox holds anything."""
        if self._sock is None:
            return  # a datagram's connection: the listener is read, not this
        read = not (self._paused or self._held or self._eof or self._closing or self._stalled)
        write = self._out.size > 0
        hang_up = not read and not write and self._eof and self.ends_with_client
        wanted = _EVENTS[read, write, hang_up]
        if wanted is not self._events:
            self._events = wanted
            self._driver.watch(self, *wanted)

    def hold(self, held: bool) -> None:
        """Stop (or go back to) reading this client, e.g. while its handler awaits."""
        if held != self._held:
            self._held = held
            if not self.closed:
                self._update()
                if self._stalled and not held:
                    self._driver.call_soon(self._resume)

    # -- receiving (loop thread) --------------------------------------------------------
    def on_readable(self, buffer: memoryview) -> None:
        """The socket is readable: read into ``buffer`` (the server's, shared), handle the
        messages, send the replies."""
        if self._eof:
            # Nothing more to read: an EPOLLHUP or EPOLLERR, which epoll reports whether
            # asked for or not (the client has gone entirely). Messages already read are
            # still handled; their replies fail to send, and that closes the connection.
            # One that ends with its client may never reply (a command that writes
            # nothing): closed now, so that whoever has it hears that the client left.
            if self._events[2]:
                log.debug("%s: client gone", self._where())
                self.abort()
            return
        framing = self._framing
        if framing is None:
            self._reading = True
            self._read_packets(buffer)
            self._reading = False
            if not self.closed:
                self.flush()
            return
        fds: list[int] = []
        try:
            if self._ancsize:
                size, ancdata, flags, _ = self._sock.recvmsg_into(  # type: ignore[union-attr]
                    [buffer], self._ancsize, RECV_FLAGS
                )
                if ancdata or flags & _CTRUNC:
                    self._fds_seen = True
                    fds = unpack(ancdata, flags, self._where(), self._max_fds).fds
            else:
                size = self._sock.recv_into(buffer)  # type: ignore[union-attr]
        except (BlockingIOError, InterruptedError):
            return
        except ProtocolError as exc:  # descriptors lost: the stream cannot go on
            self._abort(str(exc))
            return
        except OSError as exc:
            self._failed(exc, "recv")
            return
        self._reading = True
        self._decode(framing, buffer[:size], fds)
        self._reading = False
        if not self.closed:
            self.flush()

    def on_writable(self) -> None:
        self.flush()

    def _decode(self, framing: Framing, data: memoryview | None, fds: list[int]) -> None:
        """Hand the driver each message of ``data`` (None: of what the framing holds). One
        read may bring thousands of requests: once their replies fill the outbox, or the
        driver holds the connection (a handler awaits, a worker is behind), the rest stay
        in the framing, and the client is not read, until the replies drain or the hold
        ends."""
        out = self._out
        fds_seen = self._fds_seen  # else the framing holds none: no need to ask it
        try:
            message = framing.feed(data, fds) if data is not None else framing.next_message()
            while isinstance(message, bytes):
                self._driver.dispatch(self, message, framing.take_fds() if fds_seen else [])
                if self.closed or self._closing:  # close(): what follows is not handled
                    return
                if self._held or out.size + self._pending_size > out.high:
                    self._stalled = True  # _after_flush or hold() calls _resume
                    return
                # Usually the read held exactly one message: nothing left to look at.
                message = framing.next_message() if framing.buffered else NEED_DATA
        except UdsError as exc:  # FrameTooLarge, or the stream ended mid-message
            # The messages before it were whole: their replies still go (those of a worker
            # too, once it is done), then the connection closes; it is not read again.
            log.warning("%s: %s; closing the connection", self._where(), exc)
            self._eof = True  # nothing after it is decoded
            self._finish()
            return
        if message is CLOSED:
            self._ended()

    def _resume(self) -> None:
        """Go on with the messages left in the framing when the outbox filled or the driver
        held the connection (called soon after that ends)."""
        if not self._stalled or self._paused or self._held or self._closing or self.closed:
            return
        self._stalled = False
        assert self._framing is not None
        self._decode(self._framing, None, [])
        if not self.closed:
            self.flush()

    def _read_packets(self, buffer: memoryview) -> None:
        sock = self._sock
        assert sock is not None
        for _ in range(PACKETS_PER_WAKEUP):
            try:
                size, ancdata, flags, _ = sock.recvmsg_into([buffer], self._ancsize, RECV_FLAGS)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._failed(exc, "recv")
                return
            try:
                fds = unpack(ancdata, flags, self._where(), self._max_fds).fds
            except ProtocolError as exc:  # this packet's descriptors are lost: drop it
                log.warning("%s: %s", self._where(), exc)
                continue
            if flags & _TRUNC:
                close_fds(fds)
                self._abort(
                    f"a message from {self._where()} was larger than max_frame "
                    f"({len(buffer)} bytes) and arrived truncated; raise max_frame"
                )
                return
            if not size and not fds:
                self._ended()  # seqpacket: a zero-length read is the end of the stream
                return
            self._driver.dispatch(self, buffer[:size].tobytes(), fds)
            if self.closed or self._closing or self._held or self._paused:
                return
            if self._out.size + self._pending_size > self._out.high:
                return  # the replies fill the outbox: the rest waits in the kernel

    def _ended(self) -> None:
        """The client sent all it will: finish the replies, then close. Replies may still
        come (from a worker, a task, another thread) until then: a client that half-closes
        after its request waits for the answer."""
        self._eof = True
        self._driver.ended(self)
        if not self.closed:
            self._finish()

    def _finish(self) -> None:
        """Read no more (``_eof`` is set): close once the replies under way have gone."""
        self._update()  # first: flush() then sees it is not reading, and closes if drained
        if not self.busy:
            self.flush()

    def _abort(self, why: str) -> None:
        log.warning("%s: %s; closing the connection", self._where(), why)
        self.abort()

    def _failed(self, exc: OSError, operation: str) -> None:
        if exc.errno in _GONE_ERRNOS:
            log.debug("%s: client gone (%s)", self._where(), os.strerror(exc.errno or 0))
        else:
            log.warning("%s: %s", self._where(), translate(exc, operation, self.remote))
        self.abort()

    # -- closing ------------------------------------------------------------------------
    def _close_when_flushed(self) -> None:
        if self.closed:
            return
        self._closing = True
        if not self.busy:
            self.flush()
        if not self.closed:
            self._update()

    def abort(self) -> None:
        """Close at once, dropping what was not sent (in the loop thread)."""
        if self.closed:
            return
        self.closed = True
        for fds in self._out.clear():
            close_fds(fds)
        self._pending = []
        self._pending_size = 0
        if not self.busy:  # else a worker's handler holds them; it releases them after
            close_fds(self._fds)
            self._fds = []
        if self._framing is not None:
            close_fds(self._framing.held_fds())
        if self._space is not None:
            with self._space:
                self._space.notify_all()
        self._driver.dropped(self)
        if self._sock is not None:
            self._sock.close()

    def release_fds(self) -> None:
        """Close the current message's descriptors the handler did not take."""
        if self._fds:
            close_fds(self._fds)
            self._fds = []

    def begin(self, fds: list[int]) -> None:
        """The message about to be handled brought ``fds``."""
        self._fds = fds

    # -- datagrams ----------------------------------------------------------------------
    def _send_datagram(self, data: bytes | bytearray | memoryview, fds: Sequence[int]) -> None:
        listener = self._listener
        assert listener is not None
        check_message(data, "send")
        if self.remote is None:
            raise ConnectionClosed(
                f"{listener.address}: the datagram's sender has no address (an unbound "
                "socket), so it cannot be answered"
            )
        self._driver.send_datagram(listener, self.remote, data, fds)

    def _where(self) -> str:
        if self.peer is not None:
            return f"client {self.id} (pid {self.peer.pid}, uid {self.peer.uid})"
        return f"client {self.id}"


_SPACE_LOCK: Final = threading.Lock()
