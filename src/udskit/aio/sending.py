"""The send half of an asyncio channel: write now, queue the rest, apply backpressure.

``send()`` writes straight to the non-blocking socket. What the kernel does not take goes to
a queue that a writer callback (``loop.add_writer``) flushes. ``await send()`` returns at once
while that queue holds at most ``write_limit`` bytes; above it, it waits until the queue has
drained to a quarter of that (at most WRITE_LOW_WATER). That is the backpressure rule: a peer
that does not read stops its sender; it never grows the sender's memory beyond
``write_limit`` plus the message being sent.

The queue keeps views of ``bytes`` (immutable) without copying them; any other buffer is
copied when queued, so a caller may reuse its bytearray as soon as ``send()`` returns.
Descriptors are duplicated when queued, for the same reason: a ``send_fds()`` that is
cancelled or times out leaves its message queued, and its caller closes its descriptors (a
number closed and reused meanwhile would pass another file with the message).
Seqpacket messages and datagrams are never queued: each goes out whole in one system call,
and a full socket makes ``send()`` wait until it can.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterable, Sequence
from typing import Final

from ..address import Address, sun_path
from ..ancillary import close_fds, descriptors, rights
from ..channel import advance, broken
from ..errors import ConnectionClosed, ProtocolError
from ..options import SocketType, check_message
from ..proto import Framing
from ..proto.outbox import IOV_MAX, Outbox
from ..proto.shm import SHARED_THRESHOLD, PacketWire
from ..shm import SharedMemory
from ..shmpackets import send_packet
from ..translate import translate, translating
from .buffers import WRITE_LOW_WATER, check_write_limit
from .waiting import EXPIRED, RetryPause, Waiters

__all__ = ["Buffer", "Sending", "descriptors"]

Buffer = bytes | bytearray | memoryview
Ancillary = list[tuple[int, int, bytes]]

#: Stream payloads up to this size are joined with their header and sent with one send();
#: larger ones go out with sendmsg() scatter-gather, without a copy.
JOIN_LIMIT: Final = 64 * 1024

#: send_many() joins small frames into blocks of about this size: one system call moves
#: hundreds of small messages.
COALESCE: Final = 256 * 1024

#: No SIGPIPE on a closed peer: EPIPE comes back as an error. A plain int, because arithmetic
#: on the socket module's IntFlag members is a Python-level call, on every send.
SEND_FLAGS: Final = int(socket.MSG_NOSIGNAL)


class Sending:
    """The socket, the event loop it is bound to, and everything about sending.

    :class:`udskit.aio.Channel` adds receiving and closing.
    """

    __slots__ = (
        "_closed",
        "_drain",
        "_fd",
        "_framing",
        "_in_write",
        "_loop",
        "_max_fds",
        "_out",
        "_owns_socket",
        "_reading",
        "_remote",
        "_shm",
        "_sock",
        "_timeout",
        "_type",
        "_wire",
        "_write_error",
        "_writing",
        "_wwait",
    )

    def __init__(
        self,
        sock: socket.socket,
        kind: SocketType,
        framing: Framing | None,
        *,
        max_fds: int,
        remote: Address | None,
        write_limit: int | None,
        owns_socket: bool,
    ) -> None:
        self._sock = sock
        self._fd = sock.fileno()
        self._type: SocketType = kind
        self._framing = framing
        self._max_fds = max_fds
        self._remote = remote
        self._owns_socket = owns_socket
        high = check_write_limit(write_limit)
        self._timeout: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._reading = False
        #: each queued message's descriptors ride along as duplicates we own (see _queue)
        self._out: Outbox[list[int]] = Outbox(high, min(high // 4, WRITE_LOW_WATER))
        self._writing = False
        #: writing or queueing a message: a release must wait for it (Channel._release_soon)
        self._in_write = False
        self._write_error: Exception | None = None  # sticky: the socket cannot send any more
        self._drain = Waiters("send")  # senders waiting for the queue to drain
        self._wwait = Waiters("send")  # packet senders waiting for a writable socket
        self._shm: SharedMemory | None = None  # set by a channel with shared memory
        self._wire: PacketWire | None = None  # and on seqpacket, its wire

    @property
    def write_buffer_size(self) -> int:
        """Bytes queued by ``send()`` that the kernel has not taken yet."""
        return self._out.size

    @property
    def write_limit(self) -> int:
        """The send queue's high-water mark: above it, ``await send()`` waits."""
        return self._out.high

    # -- sending --------------------------------------------------------------------------
    async def send(self, data: Buffer) -> None:
        """Send one message (on a stream: framed; on seqpacket/dgram: one packet).

        Returns once the message is in the kernel or in the send queue and the queue is at
        most ``write_limit`` bytes; otherwise waits until it has drained (backpressure).
        Raises ``ConnectionClosed`` if the peer has gone, ``Timeout`` after ``settimeout``
        seconds of waiting (the message stays queued).

        With shared memory, a message of SHARED_THRESHOLD bytes or more is copied into our
        pool (a buffer from ``loan()`` is not copied at all) and only its slot is sent.
        """
        if self._shm is not None and large(data):
            await self._send_shared(data)
            return
        framing = self._framing
        if framing is None:
            await self._send_packet(data, [])
            return
        if self._closed:
            self._check_open()
        try:
            small = len(data) <= JOIN_LIMIT
        except (TypeError, ValueError):  # None, an int, a released view: say what it is
            check_message(data, "send")
            raise
        if not self._out and self._write_error is None and small:
            # The common case, inline: one small frame, nothing queued ahead of it.
            try:
                joined = framing.frame(data)
            except (TypeError, ValueError):
                check_message(data, "send")
                raise
            self._in_write = True
            try:
                sent = self._sock.send(joined, SEND_FLAGS)
                if sent == len(joined):
                    return
                self._queue([memoryview(joined)[sent:]], [])  # our own bytes: no copy
            except (BlockingIOError, InterruptedError):
                self._queue([memoryview(joined)], [])
            except OSError as exc:
                raise translate(exc, "send", self._remote) from exc
            except BaseException:
                self._cut()
                raise
            finally:
                self._in_write = False
        else:
            check_message(data, "send")
            self._write(framing.encode(data), [])
        if self._out.full:
            await self._drained(self._out.low)

    async def _send_shared(self, data: Buffer) -> None:
        raise NotImplementedError  # the channel's, which also receives

    async def _send_large(self, data: Buffer) -> None:
        """A large message through the socket (on a channel with shared memory, one the
        pool cannot take)."""
        self._check_open()
        check_message(data, "send")
        if self._framing is None:
            await self._send_packet(data, [])
            return
        self._write(self._framing.encode(data), [])
        if self._out.full:
            await self._drained(self._out.low)

    async def send_fds(self, data: Buffer, fds: Sequence[int]) -> None:
        """Send one message with open descriptors attached (SCM_RIGHTS).

        The receiver gets its own duplicates, made when the message enters the kernel, so
        this returns only once it has: the caller may close ``fds`` right after.
        """
        check_message(data, "send_fds")
        if self._sock.family != socket.AF_UNIX:
            raise ProtocolError("descriptors can only be passed over Unix sockets")
        listed = descriptors(fds, "send_fds")  # once: fds may be an iterator
        ancillary = rights(listed, self._max_fds)
        framing = self._framing
        if framing is None:
            await self._send_packet(data, ancillary)
            return
        self._check_open()
        self._write(framing.encode(data), listed)
        if ancillary:
            await self._drained(0)
        elif self._out.full:
            await self._drained(self._out.low)

    async def send_many(self, messages: Iterable[Buffer]) -> None:
        """Send several messages with as few system calls as possible.

        On a stream the frames are joined into blocks of about 256 KiB, hundreds of small
        messages per write; seqpacket and datagram sockets take one system call per message.
        With shared memory a large message (or a loan) goes through the pool, as with send().
        """
        framing = self._framing
        if framing is None:
            for message in messages:
                if self._shm is not None:
                    await self.send(message)  # a large message through the pool, as send()
                else:
                    await self._send_packet(message, [])
            return
        self._check_open()
        parts: list[Buffer] = []
        for message in messages:
            if self._shm is not None and large(message):
                if parts:  # the frames before it go first, in order
                    self._write(coalesce(parts), [])
                    parts = []
                await self._send_shared(message)
                continue
            try:
                small = len(message) <= JOIN_LIMIT
            except (TypeError, ValueError):  # send_many(b"...") iterates ints: say what it is
                check_message(message, "send_many")
                raise
            if small:
                try:
                    parts.append(framing.frame(message))
                except (TypeError, ValueError):
                    check_message(message, "send_many")
                    raise
            else:
                check_message(message, "send_many")
                parts.extend(framing.encode(message))
        if parts:
            self._write(coalesce(parts), [])
        if self._out.full:
            await self._drained(self._out.low)

    def _write(self, parts: list[Buffer], fds: Sequence[int]) -> None:
        """Send ``parts`` (and ``fds`` with the first byte) now, as far as the kernel takes
        them; queue the rest, in order."""
        self._raise_write_error()
        ancillary = rights(fds, len(fds)) if fds else []
        if not ancillary and len(parts) <= 2 and sum(map(len, parts)) <= JOIN_LIMIT:
            views = [memoryview(b"".join(parts))]
        else:
            views = [memoryview(p).cast("B") for p in parts if len(p)]
        self._in_write = True
        try:
            sent = 0
            if not self._out:  # else behind what is queued, to keep the order
                try:
                    if len(views) == 1 and not ancillary:
                        sent = self._sock.send(views[0], SEND_FLAGS)
                    else:
                        sent = self._sock.sendmsg(views[:IOV_MAX], ancillary, SEND_FLAGS)
                except (BlockingIOError, InterruptedError):
                    pass  # all of it queued
            if sent:
                fds = ()  # the descriptors went with the first byte
            self._queue(advance(views, sent), fds)  # EMFILE duplicating: nothing went
        except OSError as exc:
            raise translate(exc, "send", self._remote) from exc
        except BaseException:
            self._cut()
            raise
        finally:
            self._in_write = False

    def _queue(self, views: list[memoryview], fds: Sequence[int]) -> None:
        """Queue one message's rest; its descriptors as duplicates of our own, closed once
        the kernel has taken them (or the queue is dropped)."""
        self._out.push(views, _duplicate(fds) if fds else None)
        if self._out and not self._writing:
            self._start_writing()

    def _start_writing(self) -> None:
        self._bind_loop().add_writer(self._fd, self._on_writable)
        self._writing = True

    def _on_writable(self) -> None:
        """Writer callback: flush the queue (stream) or wake packet senders."""
        if self._framing is None:
            self._stop_writing()
            self._wwait.wake_all()
            self._writable()
            return
        out = self._out
        while out:
            batch, fds = out.batch()
            try:
                went = out.sent(
                    self._sock.sendmsg(batch, rights(fds, len(fds)) if fds else (), SEND_FLAGS)
                )
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._fail_write(translate(exc, "send", self._remote))
                return
            except BaseException:
                self._cut()
                raise
            if went:
                close_fds(went)  # our duplicates: the kernel holds its own now
        if not out:
            self._stop_writing()
        if out.drained:
            self._drain.wake_all()

    def _writable(self) -> None:
        """A packet socket became writable (the channel sends releases it owes)."""

    def _fail_write(self, error: Exception) -> None:
        """The socket cannot send any more: drop the queue; every later send raises."""
        self._write_error = error
        self._drop_queue()
        self._stop_writing()
        self._drain.wake_all()

    def _drop_queue(self) -> None:
        """Forget what is queued, closing the descriptors that would have gone with it."""
        for fds in self._out.clear():
            close_fds(fds)

    def _cut(self) -> None:
        """An exception (a signal handler's, say) landed while a frame was going out: an
        unknown part of it is on the wire. Break the channel both ways; tell the peer."""
        error = broken(self._where(), "a send was interrupted mid-message")
        self._fail_write(error)
        self._on_broken(error)
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _on_broken(self, error: Exception) -> None:
        """The receive half's part in ``_cut`` (the channel overrides it)."""

    def _raise_write_error(self) -> None:
        error = self._write_error
        if error is not None:
            raise error.with_traceback(None)

    def _stop_writing(self) -> None:
        if self._writing:
            self._writing = False
            loop = self._loop
            if loop is not None and not loop.is_closed():
                loop.remove_writer(self._fd)

    async def _drained(self, limit: int) -> None:
        """Wait until the send queue holds at most ``limit`` bytes."""
        while self._out.size > limit:
            self._check_open()
            if await self._drain.wait(self._bind_loop(), self._timeout) is EXPIRED:
                with translating("send", self._remote):
                    raise TimeoutError
        self._check_open()
        self._raise_write_error()

    async def _send_packet(
        self, data: Buffer, ancillary: Ancillary, *, records: bool = False
    ) -> None:
        """One seqpacket message or datagram: all of it in one system call, or nothing.
        ``records``: a records packet (seqpacket with shared memory)."""
        check_message(data, "send")
        self._check_open()
        if self._type == "seqpacket" and not data:
            raise ProtocolError(
                "cannot send an empty seqpacket message: the receiver reads it as end of connection"
            )
        # A datagram session (Server, dgram) answers its sender through the listener's
        # socket; any other channel is connected.
        target = None if self._owns_socket else self._remote
        if target is None and not self._owns_socket:
            raise ConnectionClosed(
                "cannot reply to this datagram: its sender did not bind an address "
                "(a udskit client always does; connect with bind= from other programs)"
            )
        pause: RetryPause | None = None
        while True:
            try:
                if self._wire is not None:
                    send_packet(self._sock, self._wire, data, ancillary, records=records)
                elif target is not None:
                    with sun_path(target) as where:
                        self._sock.sendmsg([data], ancillary, SEND_FLAGS, where)
                elif ancillary:
                    self._sock.sendmsg([data], ancillary, SEND_FLAGS)
                else:
                    self._sock.send(data, SEND_FLAGS)
                return
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                raise translate(exc, "send", self._remote) from exc
            # The kernel's queue is full: ours, or for a datagram the receiver's.
            if target is not None:
                # An unconnected socket polls writable while the receiver's queue is full
                # (poll sees only our own buffer), so there is nothing to wait for: retry
                # after growing pauses.
                if pause is None:
                    pause = RetryPause(self._timeout, "send", self._remote)
                await pause.pause()
                continue
            loop = self._bind_loop()
            if not self._writing:
                self._start_writing()
            if await self._wwait.wait(loop, self._timeout) is EXPIRED:
                with translating("send", self._remote):
                    raise TimeoutError
            self._check_open()

    # -- shared with the receive half -----------------------------------------------------
    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        """The running loop, which this channel stays with while it waits for anything.

        A channel whose loop has closed (one ``asyncio.run`` after another) moves to the
        running loop; one still registered with another live loop refuses.
        """
        loop = asyncio.get_running_loop()
        old = self._loop
        if old is not loop:
            if old is not None and (self._reading or self._writing):
                if not old.is_closed():
                    raise RuntimeError(
                        f"{self!r} is in use by another event loop; a channel belongs to one "
                        "loop at a time"
                    )
                # The closed loop took our registrations with it: start again here.
                self._reading = False
                self._writing = False
            self._loop = loop
            if self._out and not self._writing:
                self._start_writing()
        return loop

    def _check_open(self) -> None:
        if self._closed:
            raise ConnectionClosed(f"{self._where()}: this channel is closed")

    def _where(self) -> str:
        return self._remote.shown() if self._remote is not None else f"{self._type} channel"


def _duplicate(fds: Sequence[int]) -> list[int]:
    """Our own duplicates of ``fds`` (close-on-exec); none left open if one fails (EMFILE)."""
    dups: list[int] = []
    try:
        for fd in fds:
            dups.append(os.dup(fd))  # noqa: PERF401 - the ones made before a failure are closed
    except BaseException:
        close_fds(dups)
        raise
    return dups


def large(data: object) -> bool:
    """Whether ``data`` is a message for the shared-memory pool (SHARED_THRESHOLD bytes or
    more); False for what is not a buffer at all (send() then says why)."""
    if type(data) is bytes:
        return len(data) >= SHARED_THRESHOLD
    try:
        return memoryview(data).nbytes >= SHARED_THRESHOLD  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def coalesce(parts: list[Buffer]) -> list[Buffer]:
    """Join runs of small buffers into blocks of about COALESCE bytes; keep large ones."""
    blocks: list[Buffer] = []
    run: list[Buffer] = []
    size = 0
    for part in parts:
        if len(part) >= JOIN_LIMIT:
            if run:
                blocks.append(b"".join(run))
                run, size = [], 0
            blocks.append(part)
            continue
        run.append(part)
        size += len(part)
        if size >= COALESCE:
            blocks.append(b"".join(run))
            run, size = [], 0
    if run:
        blocks.append(b"".join(run))
    return blocks
