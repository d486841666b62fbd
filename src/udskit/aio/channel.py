"""The asyncio ``Channel``: one connected endpoint that sends and receives whole messages.

A channel drives its non-blocking socket straight from the event loop's readiness callbacks
(``add_reader``/``add_writer``), on asyncio's loop and on uvloop alike, around the same
sans-IO framing as the blocking :class:`udskit.Channel`. There is no transport and no
StreamReader in between, for two reasons: a transport reads with ``recv()``, which can carry
neither descriptors (SCM_RIGHTS) nor credentials, nor see a truncated packet (MSG_TRUNC); and
every layer between the socket and ``recv()`` costs latency.

Receiving: from the first ``recv()`` on, a reader callback stays registered. Each time the
socket is readable it reads once (``recvmsg_into``, descriptors close-on-exec), feeds the
framing, and moves every complete message to a ready queue, which ``recv()`` pops. Reading
pauses once READ_AHEAD bytes wait unconsumed and resumes when ``recv()`` finds the queue
empty, so a slow consumer holds bounded memory and the sender feels backpressure. A
cancelled ``recv()`` loses nothing: messages stay queued for the next call.

Sending is the other half: see :mod:`udskit.aio.sending`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import socket
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final

from ..address import Address
from ..ancillary import RECV_FLAGS, ancillary_size, close_fds, rights, unpack
from ..channel import (
    POOL_WAIT,
    ChannelFacts,
    read_interrupted,
    stream_read_lost,
    truncated,
    write_shut,
)
from ..creds import PeerCred
from ..errors import ConnectionClosed, FrameTooLarge, ProtocolError, UdsError
from ..freshbytes import FRESH_MIN, fresh
from ..options import base_type, check_message, check_timeout, max_frame_for, type_name
from ..proto import CLOSED, Control, Framing, LengthPrefixed, make_framing
from ..proto.shm import (
    ATTACH,
    OFFER,
    RELEASE,
    SHARED_THRESHOLD,
    SLOT,
    SWITCHED,
    VERSION,
    encode_packet,
    encode_record,
)
from ..shm import Lease, SharedMemory, check_loan_size
from ..shmpackets import (
    Lost,
    is_message,
    make_wire,
    not_pooled,
    packet_buffer_size,
    packet_views,
    release_packets,
    send_packet,
    split_packet,
    take_packet,
)
from ..translate import translate, translating
from .buffers import FDS_AHEAD, FEED_SLICE, READ_AHEAD, RECV_CHUNK, scratch
from .sending import Ancillary, Buffer, Sending
from .waiting import EXPIRED, Waiters, expire

if TYPE_CHECKING:
    from ..sockfile import Claim

__all__ = ["Buffer", "Channel"]

log = logging.getLogger("udskit")

#: Reads per readiness callback while a message larger than the receive buffer comes in
#: (each read filling the whole buffer): a 1 MiB message takes one loop iteration, not four.
_READS_PER_WAKEUP: Final = 4

#: Messages from this size up are read straight into their own ``bytes`` once their first
#: part has arrived (``Channel._in_place``). One process, both ends on one loop: 2 MiB
#: messages moved 1.1-1.25x, 4 MiB 1.15-1.45x, 16 MiB 2x and 256 MiB 3-4x as fast as through
#: the framing's buffer; 1 MiB ones 0.95x (the framing's buffer, no longer grown to hold
#: them, leaves the heap's top to be trimmed and faulted in again: 64 faults a message).
_IN_PLACE_MIN: Final = 2 * 1024 * 1024

#: Packets held unconsumed (besides READ_AHEAD bytes) before a seqpacket or datagram channel
#: stops reading: the kernel's queue holds the rest, and the sender feels the backpressure.
_PACKETS_AHEAD: Final = 256

#: Messages held unconsumed (besides READ_AHEAD bytes) before a stream channel stops
#: reading. READ_AHEAD counts message bytes, and a queued message costs about 40 bytes
#: beyond them: a flood of 1-byte messages would hold 40 MiB before reaching it, and one of
#: empty messages would never reach it at all. From 64-byte messages on, READ_AHEAD comes
#: first (at about 15,000 of them), so this bound changes nothing for them.
_MESSAGES_AHEAD: Final = 16 * 1024

# Plain ints: arithmetic on the socket module's IntFlag members is a Python-level call
# (about 0.7 us), on every read.
_CTRUNC: Final = int(socket.MSG_CTRUNC)
_TRUNC: Final = int(socket.MSG_TRUNC)


def _no_framing(*_: object) -> object:
    raise AssertionError("feed() is bound when a stream channel starts reading")


#: What poll() reports on a socket whose peer has gone: an error (a reset), or a hang-up.
_ENDED: Final = select.POLLERR | select.POLLHUP | select.POLLRDHUP


def _ended(fd: int) -> bool:
    """Whether the socket ``fd`` has an error or has hung up (one poll, no wait)."""
    poller = select.poll()
    poller.register(fd, _ENDED)
    return bool(poller.poll(0))


def _no_reader() -> None:
    raise AssertionError("the reader callback is chosen when a channel starts reading")


class _InPlace:
    """A large message read straight into its own ``bytes`` (``Channel._read_in_place``):
    ``view`` writes into it, ``have`` bytes came from the framing, ``filled`` are in."""

    __slots__ = ("filled", "have", "message", "view")

    def __init__(self, message: bytes, view: memoryview, have: int) -> None:
        self.message = message
        self.view = view
        self.have = have
        self.filled = have


class _UnknownSender:
    """The sender of a datagram that came with credentials holding none (pid 0)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNKNOWN_SENDER"


UNKNOWN_SENDER: Final = _UnknownSender()

#: A queued message that came with descriptors or credentials (plain ones are just bytes).
Received = tuple[bytes, list[int], "PeerCred | _UnknownSender | None"]


class Channel(Sending, ChannelFacts):
    """A connected endpoint that sends and receives whole messages, for asyncio.

    Get one from :func:`udskit.aio.connect`, :meth:`udskit.aio.Listener.accept` or
    :func:`udskit.aio.pair`. ``async with channel`` closes it, after sending what is still
    queued; ``async for message in channel`` receives until the peer closes cleanly.

    One task at a time may receive; any number may send (each message goes out whole).
    A channel stays with the event loop it first waited on.
    """

    __slots__ = (
        "__weakref__",  # a released view tells its channel through a weak reference
        "_ancsize",
        "_attaching",
        "_claim",
        "_cleanup_dir",
        "_eof",
        "_fds_seen",
        "_feed",
        "_into",
        "_max_message",
        "_peer",
        "_rbuf",
        "_read_error",
        "_read_failed",
        "_read_idle",
        "_reader",
        "_ready",
        "_ready_bytes",
        "_ready_fds",
        "_rview",
        "_rwaiter",
        "_space",
        "_tag",
    )

    def __init__(
        self,
        sock: socket.socket,
        *,
        framing: str = "length",
        max_frame: int | None = None,
        max_fds: int = 16,
        remote: Address | None = None,
        peer: PeerCred | None = None,
        claim: Claim | None = None,
        cleanup_dir: bytes | None = None,
        write_limit: int | None = None,
        owns_socket: bool = True,
        inbox: Sequence[Received] = (),
        shared_memory: int = 0,
        peer_opted: bool = False,
    ) -> None:
        """Wrap a connected socket (made non-blocking here). ``claim`` and ``cleanup_dir``
        (a bound client's own path and its private directory) are released on close.
        ``owns_socket=False`` with ``inbox`` makes a datagram session: it holds the given
        datagrams and replies to ``remote`` through a listener's socket. ``shared_memory``
        (a pool size; 0: off) and ``peer_opted``: as for the blocking Channel."""
        kind = type_name(base_type(sock))
        if shared_memory and kind == "stream":
            chosen: Framing | None = LengthPrefixed(max_frame_for(kind, max_frame), records=True)
        elif shared_memory:
            chosen = None  # seqpacket: tagged packets (see proto.shm.PacketWire)
        else:
            chosen = make_framing(framing, max_frame=max_frame) if kind == "stream" else None
        super().__init__(
            sock,
            kind,
            chosen,
            max_fds=max_fds,
            remote=remote,
            write_limit=write_limit,
            owns_socket=owns_socket,
        )
        # As in the blocking Channel: with shared memory, a seqpacket channel's default
        # max_frame is the stream's, since large messages go through the pool.
        self._max_message = max_frame_for("stream" if shared_memory else kind, max_frame)
        is_unix = sock.family == socket.AF_UNIX
        self._ancsize = ancillary_size(max_fds) if is_unix else 0
        self._peer = peer
        self._claim = claim
        self._cleanup_dir = cleanup_dir
        # complete messages, in order, for recv()
        self._ready: deque[bytes | Received | Lease] = deque(inbox)
        self._ready_bytes = sum(len(item[0]) for item in inbox)
        self._ready_fds = sum(len(item[1]) for item in inbox)  # held in _ready
        self._eof = not owns_socket  # a datagram session holds all it will ever receive
        self._fds_seen = False
        self._read_error: Exception | None = None  # raised once, then reading resumes
        self._read_failed: Exception | None = None  # the connection is unusable
        self._rwaiter: asyncio.Future[object] | None = None
        self._reader: Callable[[], None] = _no_reader  # the reader callback, when reading
        self._read_idle = False  # the last read found nothing to read (EAGAIN)
        # set when reading starts: the receive buffer, as recvmsg_into() takes it, and
        # the framing's feed() (bound once: this is the hot path of every read)
        self._rbuf = memoryview(b"")
        self._rview: list[memoryview] = []
        self._feed: Callable[..., bytes | object] = _no_framing
        self._into: _InPlace | None = None  # a large message read straight into its bytes
        self._space = Waiters("send")  # senders waiting for room in the shared-memory pool
        self._tag = bytearray(1)  # a tagged packet's first byte (see shmpackets)
        self._attaching = False  # seqpacket: our ATTACH waits for room; SLOTs wait for it
        if shared_memory:
            if kind == "seqpacket":
                self._wire = make_wire(sock, peer_opted)
            self._shm = SharedMemory(
                shared_memory, self._max_message, peer_opted=peer_opted, where=self._where()
            )
            self._shm.tie_to(self, self._release_soon)
        if owns_socket:
            sock.setblocking(False)

    @property
    def socket(self) -> socket.socket:
        """The underlying non-blocking socket, for socket options. Do not read from it."""
        return self._sock

    def fileno(self) -> int:
        return self._sock.fileno()

    def settimeout(self, timeout: float | None) -> None:
        """Seconds ``recv``/``send`` may wait before raising ``Timeout`` (None: forever).

        A timeout loses nothing: a message not yet received stays queued, and one being
        sent stays queued and goes out when the peer reads.
        """
        self._timeout = check_timeout(timeout)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self._fd}"
        return f"<aio.Channel {self._type} {self._remote or 'unnamed'} peer=({self._peer}) {state}>"

    # -- receiving ------------------------------------------------------------------------
    async def recv(self) -> bytes:
        """Receive one message. Descriptors that arrive with it are closed (see recv_fds).

        Raises ``ConnectionClosed`` when the peer has closed (``mid_message`` if it left a
        message unfinished), ``Timeout`` after ``settimeout`` seconds.
        """
        ready = self._ready
        while True:
            if ready:
                item = ready.popleft()
                if isinstance(item, bytes):
                    self._ready_bytes -= len(item)
                    return item
                data, fds = self._unpack(item)
                if fds:
                    log.debug("%r: closing %d descriptors received by recv()", self, len(fds))
                    close_fds(fds)
                return data
            # The hot path of a request/response exchange: wait for the reader callback
            # of the loop we are registered with, without asking which loop is running
            # (get_running_loop() costs a getpid() system call, a measurable share of a
            # round trip). Should that be another loop, the await says so: take the slow
            # path, which finds out.
            if self._reading and self._timeout is None and self._rwaiter is None:
                future = self._rwaiter = self._loop.create_future()  # type: ignore[union-attr]
                try:
                    await future
                except RuntimeError:
                    self._rwaiter = None
                    if future.get_loop() is asyncio.get_running_loop():
                        raise
                    self._bind_loop()  # moves to this loop, or says which one has us
                finally:
                    self._rwaiter = None
            else:
                await self._wait_readable()

    async def recv_fds(self) -> tuple[bytes, list[int]]:
        """Receive one message and the descriptors sent with it (now owned by the caller)."""
        ready = self._ready
        while not ready:
            await self._wait_readable()
        item = ready.popleft()
        if isinstance(item, bytes):
            self._ready_bytes -= len(item)
            return item, []
        return self._unpack(item)

    async def recv_many(self) -> list[bytes]:
        """Wait for at least one message; return it and every other complete message
        already received, in order (descriptors that came with them are closed)."""
        ready = self._ready
        while not ready:
            await self._wait_readable()
        messages: list[bytes] = []
        while ready:
            item = ready.popleft()
            if isinstance(item, bytes):
                self._ready_bytes -= len(item)
                messages.append(item)
            elif type(item) is Lost and messages:
                ready.appendleft(item)  # raised by the next receive, after these
                break
            else:
                data, fds = self._unpack(item)
                messages.append(data)
                close_fds(fds)
        if not ready:
            self._ready_bytes = 0
            self._ready_fds = 0
        return messages

    def __aiter__(self) -> Channel:
        return self

    async def __anext__(self) -> bytes:
        """The next message; iteration ends when the peer closes cleanly."""
        # recv()'s loop, repeated rather than awaited: a server's ``async for`` is the
        # hottest path there is, and a coroutine call per message is measurable.
        ready = self._ready
        try:
            while True:
                if ready:
                    item = ready.popleft()
                    if isinstance(item, bytes):
                        self._ready_bytes -= len(item)
                        return item
                    data, fds = self._unpack(item)
                    if fds:
                        close_fds(fds)
                    return data
                if self._reading and self._timeout is None and self._rwaiter is None:
                    future = self._rwaiter = self._loop.create_future()  # type: ignore[union-attr]
                    try:
                        await future
                    except RuntimeError:
                        self._rwaiter = None
                        if future.get_loop() is asyncio.get_running_loop():
                            raise
                        self._bind_loop()  # moves to this loop, or says which one has us
                    finally:
                        self._rwaiter = None
                else:
                    await self._wait_readable()
        except ConnectionClosed as exc:
            if exc.mid_message:
                raise
            raise StopAsyncIteration from None

    def _unpack(self, item: Received | Lease) -> tuple[bytes, list[int]]:
        """A queued message with descriptors or credentials, or in the peer's pool: take
        its parts (a pooled message is copied out, and its slot released). Where a message
        was lost, the error that lost it."""
        if type(item) is Lost:
            raise item.error.with_traceback(None)
        if isinstance(item, Lease):
            return self._shm.copy_out(item), []  # type: ignore[union-attr]
        data, fds, cred = item
        self._ready_bytes -= len(data)
        self._ready_fds -= len(fds)
        if isinstance(cred, PeerCred):
            self._peer = cred
        elif cred is UNKNOWN_SENDER:
            self._peer = None  # never the previous sender's
        return data, fds

    async def _wait_readable(self) -> None:
        """Nothing is queued: raise what ended the connection, else wait for the reader
        callback (starting it if need be) or for the timeout."""
        self._raise_for_state()
        loop = self._bind_loop()
        if self._rwaiter is not None:
            raise RuntimeError(
                f"another task is already receiving on {self!r}; one task at a time may"
            )
        if not self._reading:
            self._start_reading(loop)
        future = self._rwaiter = loop.create_future()
        timer = None if self._timeout is None else loop.call_later(self._timeout, expire, future)
        try:
            expired = await future is EXPIRED
        finally:
            self._rwaiter = None
            if timer is not None:
                timer.cancel()
        if expired:
            with translating("recv", self._remote):
                raise TimeoutError

    def _raise_for_state(self) -> None:
        """Nothing is queued: raise if the channel is closed, the peer has gone, or reading
        failed (a one-off failure is raised once, and reading resumes)."""
        self._check_open()
        failed = self._read_failed
        if failed is not None:
            raise failed.with_traceback(None)
        error = self._read_error
        if error is not None:
            self._read_error = None
            raise error
        if self._eof:
            if not self._owns_socket:
                raise ConnectionClosed(f"{self._where()}: no more datagrams in this session")
            raise ConnectionClosed(f"{self._where()}: the peer closed the connection")

    def _start_reading(self, loop: asyncio.AbstractEventLoop) -> None:
        size = RECV_CHUNK if self._framing is not None else self._max_message
        if self._wire is not None:
            size = packet_buffer_size(size)
        self._rbuf = scratch(size)[:size]
        self._rview = [self._rbuf]
        if self._framing is not None:
            self._feed = self._framing.feed
        callback = self._read_stream if self._framing is not None else self._read_packets
        if self._wire is not None:
            callback = self._read_wire
        self._reader = callback
        if not isinstance(loop, asyncio.BaseEventLoop):
            # uvloop: libuv ends a poll handle on a socket error (POLLERR: the peer closed
            # with our data unread), after one last callback. A callback that stops before
            # EAGAIN (to hand a message over first) would never be called again, and a
            # recv() would wait for ever: on a socket in that state it goes on reading
            # from the loop's next turn.
            callback = self._read_on
        loop.add_reader(self._fd, callback)
        self._reading = True

    def _read_on(self) -> None:
        """The reader callback on a loop whose readiness ends at a socket error: read, and
        if the read stopped before EAGAIN on a socket with an error or hung up, read again
        on the loop's next turn. Only then: while the poll handle lives, the loop calls us
        again anyway, and a turn of our own each time would split the reads (a third of
        the throughput at 64 KiB messages, measured with udskit bench)."""
        if not self._reading:
            return  # closed, or paused (read-ahead) since this turn was asked for
        self._read_idle = False
        self._reader()
        if not self._read_idle and self._reading and _ended(self._fd):
            loop = self._loop
            if loop is not None and not loop.is_closed():
                loop.call_soon(self._read_on)

    def _wake_receiver(self) -> None:
        waiter = self._rwaiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _read_stream(self) -> None:
        """Reader callback (stream): decode what arrived into the ready queue; wake the
        receiver. A read of small whole messages, the common case, stays on a short path."""
        into = self._into  # a large message being read in place reads on there
        if into is None:
            try:
                size, ancdata, flags, _ = self._sock.recvmsg_into(
                    self._rview, self._ancsize, RECV_FLAGS
                )
            except (BlockingIOError, InterruptedError):
                self._read_idle = True
                return
            except OSError as exc:
                self._fail_read(translate(exc, "recv", self._remote), fatal=True)
                return
            except BaseException:
                self._fail_read(read_interrupted(self._where()), fatal=True)
                raise
        try:
            if into is not None:
                self._read_in_place(into)
            elif size and size <= FEED_SLICE and not ancdata and not flags & _CTRUNC:
                # Inline, the first message of the read (usually the only one).
                message = self._feed(self._rbuf[:size])
                if isinstance(message, bytes):
                    if self._fds_seen:
                        fds = self._framing.take_fds()  # type: ignore[union-attr]
                        self._ready.append((message, fds, None) if fds else message)
                        self._ready_fds += len(fds)
                    else:  # no descriptor ever arrived: the framing holds none
                        self._ready.append(message)
                    self._ready_bytes += len(message)
                    if self._framing.buffered:  # type: ignore[union-attr]
                        self._decode(self._framing)  # type: ignore[arg-type]
                elif type(message) is Control:  # shared memory: a record
                    self._take(self._framing, message)  # type: ignore[arg-type]
                else:  # a message begun: if a large one, read the rest in place
                    into = self._in_place(self._framing)  # type: ignore[arg-type]
                    if into is not None:
                        self._read_in_place(into)
            else:
                self._read_stream_slow(size, ancdata, flags)
        except UdsError as exc:  # bad framing: FrameTooLarge, a stream cut off mid-message
            self._fail_read(exc, fatal=True)
            return
        except BaseException:  # not ours (a signal handler's): what was read may be lost
            self._fail_read(read_interrupted(self._where()), fatal=True)
            raise
        self._after_read()

    def _after_read(self) -> None:
        """A reader callback's end: pause reading if enough waits unconsumed; wake the
        receiver."""
        if self._rwaiter is None and (
            self._ready_bytes > READ_AHEAD
            or self._ready_fds > FDS_AHEAD
            or len(self._ready) > _MESSAGES_AHEAD
        ):
            self._stop_reading()  # resumed by the next recv() that finds nothing queued
        waiter = self._rwaiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _read_stream_slow(self, size: int, ancdata: Ancillary, flags: int) -> None:
        """Descriptors, the end of the stream, or a large read (and maybe more to read)."""
        framing: Framing = self._framing  # type: ignore[assignment]
        view = self._rview[0]
        reads = 1
        while True:
            queued = len(self._ready)
            if not self._feed_read(framing, view[:size], ancdata, flags):
                return
            if len(self._ready) == queued:  # a message under way: if a large one, in place
                into = self._in_place(framing)
                if into is not None:
                    self._read_in_place(into)
                    return
            # Read on only while one large message is coming in: once messages are complete,
            # let the receiver take them first (decoding further ahead only piles up memory
            # that glibc hands back and forth to the kernel, a page fault per page).
            if size < RECV_CHUNK or len(self._ready) > queued or reads == _READS_PER_WAKEUP:
                return
            reads += 1
            try:
                size, ancdata, flags, _ = self._sock.recvmsg_into(
                    self._rview, self._ancsize, RECV_FLAGS
                )
            except (BlockingIOError, InterruptedError):
                self._read_idle = True
                return
            except OSError as exc:
                self._fail_read(translate(exc, "recv", self._remote), fatal=True)
                return

    def _feed_read(
        self, framing: Framing, data: memoryview | bytes, ancdata: Ancillary, flags: int
    ) -> bool:
        """Hand one read's bytes and descriptors to the framing, queueing what completes;
        False if reading has ended (the end of the stream, or an error reported)."""
        fds: list[int] = []
        if ancdata or flags & _CTRUNC:
            self._fds_seen = True
            try:
                fds = unpack(ancdata, flags, self._where(), self._max_fds).fds
            except ProtocolError as exc:
                # The read's bytes cannot be used without them (a hole in the stream, or
                # a message given descriptors not its own): after the messages already
                # received, every recv() says so, as the blocking channel does.
                self._fail_read(stream_read_lost(exc), fatal=True)
                return False
        size = len(data)
        if not size:
            close_fds(fds)
            self._stop_reading()
            self._take(framing, framing.feed(b""))  # CLOSED, or raises mid-message
            return False
        if fds:
            self._take(framing, framing.feed(data, fds))  # whole: see proto
        else:
            for start in range(0, size, FEED_SLICE):
                self._take(framing, framing.feed(data[start : min(size, start + FEED_SLICE)]))
        return True

    def _in_place(self, framing: Framing) -> _InPlace | None:
        """If the framing holds the start of a large message (_IN_PLACE_MIN or more), its
        own ``bytes``, to read the rest straight into: no copy through the receive buffer
        and the framing's, and from FRESH_MIN on, backed by huge pages (as the blocking
        Channel reads)."""
        if self._shm is not None or not isinstance(framing, LengthPrefixed):
            return None
        size, have = framing.partial()
        if size < _IN_PLACE_MIN:
            return None
        prepared = fresh(size, huge=size >= FRESH_MIN)
        if prepared is None:
            return None
        message, view = prepared
        framing.copy_partial(view)
        self._into = _InPlace(message, view, have)
        return self._into

    def _read_in_place(self, into: _InPlace) -> None:
        """Reader (stream) while a large message is read straight into its own bytes: read
        on until it is whole (then queue it) or the socket has nothing more for now."""
        framing = self._framing
        assert isinstance(framing, LengthPrefixed)
        view = into.view
        for _ in range(_READS_PER_WAKEUP):
            try:
                got, ancdata, flags, _ = self._sock.recvmsg_into(
                    [view[into.filled :]], self._ancsize, RECV_FLAGS
                )
            except (BlockingIOError, InterruptedError):
                self._read_idle = True
                return
            except OSError as exc:
                self._drop_in_place()
                self._fail_read(translate(exc, "recv", self._remote), fatal=True)
                return
            if got and not ancdata and not flags & _CTRUNC:
                into.filled += got
                if into.filled < len(view):
                    continue
                self._into = None
                view.release()
                self._take(framing, framing.receive_rest(into.message))
                return
            # The end of the stream, or descriptors with a later part of the message (from
            # a peer that is not udskit): what came goes to the framing as ordinary reads.
            earlier = bytes(view[into.have : into.filled])
            this = bytes(view[into.filled : into.filled + got])
            self._drop_in_place()
            if earlier:
                self._take(framing, framing.feed(earlier))
            self._feed_read(framing, this, ancdata, flags)
            return

    def _drop_in_place(self) -> None:
        """Give up the message being read in place (its bytes were not handed to anyone)."""
        into = self._into
        if into is not None:
            self._into = None
            into.view.release()

    def _take(self, framing: Framing, message: bytes | object) -> None:
        """Queue ``message`` (what feed() returned) and every complete one after it; act
        on shared-memory records."""
        while True:
            if isinstance(message, bytes):
                fds = framing.take_fds()
                self._ready.append((message, fds, None) if fds else message)
                self._ready_bytes += len(message)
                self._ready_fds += len(fds)
            elif type(message) is Control:
                self._record(message.body, framing.take_fds())
            else:
                break
            message = framing.next_message()
        if message is CLOSED:
            self._eof = True
            self._space.wake_all()

    def _decode(self, framing: Framing) -> None:
        """Queue every complete message still in the framing."""
        self._take(framing, framing.next_message())

    def _read_packets(self) -> None:
        """Reader callback (seqpacket, dgram): queue the packets that arrived; wake the
        receiver."""
        limit = self._max_message
        views = self._rview
        view = views[0]
        sock = self._sock
        ancsize = self._ancsize
        ready = self._ready
        while True:
            try:
                size, ancdata, flags, _ = sock.recvmsg_into(views, ancsize, RECV_FLAGS)
            except (BlockingIOError, InterruptedError):
                self._read_idle = True
                break
            except ConnectionResetError as exc:
                if self._type != "seqpacket":
                    self._fail_read(translate(exc, "recv", self._remote), fatal=True)
                    break
                # The peer closed with packets of ours unread. A seqpacket socket reports
                # that first (the kernel checks the socket's error before its queue), then
                # hands over what the peer sent before closing, then the end: read on, so
                # that its last messages are not lost (as with shared memory, below).
                continue
            except OSError as exc:
                self._fail_read(translate(exc, "recv", self._remote), fatal=True)
                break
            try:
                got = (
                    unpack(ancdata, flags, self._where(), self._max_fds)
                    if ancdata or flags & _CTRUNC
                    else None
                )
            except ProtocolError as exc:
                self._fail_read(exc, fatal=False)
                break
            fds = got.fds if got is not None else []
            if flags & _TRUNC:
                close_fds(fds)
                self._fail_read(truncated(self._where(), limit), fatal=False)
                break
            if size == 0 and self._type == "seqpacket":
                close_fds(fds)
                self._eof = True
                self._stop_reading()
                break
            data = view[:size].tobytes()
            if got is None:
                ready.append(data)
            elif got.creds_sent and got.cred is None:  # a datagram that held no credentials
                ready.append((data, fds, UNKNOWN_SENDER))
            else:
                ready.append((data, fds, got.cred))
            self._ready_bytes += size
            self._ready_fds += len(fds)
            if self._pause_after_queueing():
                break
        self._wake_receiver()

    def _pause_after_queueing(self) -> bool:
        """After a packet was queued: whether the reader callback should stop here (a
        receiver waits to take it first; or the read-ahead is full, and reading pauses)."""
        if self._rwaiter is not None:
            # Hand this one over first; level-triggered polling (on uvloop, _read_on)
            # brings the rest.
            return True
        if (
            len(self._ready) >= _PACKETS_AHEAD
            or self._ready_bytes > READ_AHEAD
            or self._ready_fds > FDS_AHEAD
        ):
            self._stop_reading()
            return True
        return False

    def _read_wire(self) -> None:
        """Reader callback (seqpacket with shared memory): act on the records that arrived,
        queue the messages; wake the receiver. An exception that is not ours (a
        MemoryError, a signal handler's) may have cut a packet off after its read: a lost
        record would leave the pools out of step, so reading ends, as in the blocking
        Channel."""
        try:
            self._take_packets()
        except BaseException:
            self._fail_read(read_interrupted(self._where()), fatal=True)
            raise

    def _take_packets(self) -> None:
        wire = self._wire
        shm = self._shm
        assert wire is not None
        assert shm is not None
        body = self._rbuf
        sock = self._sock
        ready = self._ready
        while True:
            tagged, views = packet_views(wire, self._tag, body)
            try:
                got, ancdata, flags, _ = sock.recvmsg_into(views, self._ancsize, RECV_FLAGS)
            except (BlockingIOError, InterruptedError):
                self._read_idle = True
                break
            except ConnectionResetError:
                # As in the blocking Channel: the peer closed with packets of ours unread;
                # reported once, before what it sent. Read that, then the end.
                continue
            except OSError as exc:
                self._fail_read(translate(exc, "recv", self._remote), fatal=True)
                break
            tag, size = split_packet(tagged, self._tag, got)
            message = is_message(tag)  # its loss costs it; any other packet's, the channel
            try:
                fds = (
                    unpack(ancdata, flags, self._where(), self._max_fds).fds
                    if ancdata or flags & _CTRUNC
                    else []
                )
                if flags & _TRUNC:
                    close_fds(fds)
                    raise truncated(self._where(), self._max_message)
            except ProtocolError as exc:
                if not message:
                    self._fail_read(self._shared_failed(exc), fatal=True)
                    break
                # A message lost: recv() raises this in its place, in order, and reading
                # goes on (a sender waiting for pool space needs the releases behind it).
                wire.lost()
                ready.append(Lost(exc))
                if self._pause_after_queueing():
                    break
                continue
            if tag is None and not size:
                close_fds(fds)
                self._eof = True
                self._stop_reading()
                self._space.wake_all()
                break
            try:
                item = take_packet(wire, tag, body[:size], fds)
            except ProtocolError as exc:
                self._fail_read(self._shared_failed(exc), fatal=True)
                break
            if item is SWITCHED:
                shm.ready = True
                continue
            if type(item) is list:
                try:
                    for i, record in enumerate(item):
                        self._record(record, fds if i == 0 else [])
                except ProtocolError as exc:
                    self._fail_read(exc, fatal=True)
                    break
                continue
            ready.append((item, fds, None) if fds else item)  # type: ignore[arg-type]
            self._ready_bytes += size
            self._ready_fds += len(fds)
            if self._pause_after_queueing():
                break
        self._wake_receiver()

    def _on_broken(self, error: Exception) -> None:
        self._fail_read(error, fatal=True)

    def _fail_read(self, error: Exception, *, fatal: bool) -> None:
        """Report ``error`` to the receiver after the messages already queued.

        Reading pauses until then. A ``fatal`` error ends the connection and is raised by
        every later recv() (a message being read in place is given up now, not held until
        close()); another (descriptors refused, a truncated packet) once, after which
        reading resumes.
        """
        if fatal:
            self._read_failed = error
            self._drop_in_place()
            self._space.wake_all()
        else:
            self._read_error = error
        self._stop_reading()
        self._wake_receiver()

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            loop = self._loop
            if loop is not None and not loop.is_closed():
                loop.remove_reader(self._fd)

    # -- shared memory --------------------------------------------------------------------
    @property
    def shared_memory(self) -> bool:
        """Whether large messages to the peer go through shared memory now (see the
        blocking Channel)."""
        return self._shm is not None and self._shm.ready

    @property
    def pool_in_use(self) -> int:
        """Bytes of our shared-memory pool in use: messages the peer has not released,
        and our loans not yet sent (nor released)."""
        return 0 if self._shm is None else self._shm.in_use

    async def recv_view(self) -> memoryview:
        """Receive one message as a read-only memoryview, in the sender's shared memory
        when it came that way (no copy); valid until released, as for the blocking
        Channel's ``recv_view``. A message that came through the socket is returned as a
        view of its bytes."""
        if self._shm is not None and self._shm.owes():
            self._flush_releases()  # releases a view's end could not send at once
        ready = self._ready
        while not ready:
            await self._wait_readable()
        item = ready.popleft()
        if isinstance(item, Lease) and type(item) is not Lost:
            return self._shm.view(item)  # type: ignore[union-attr]
        if isinstance(item, bytes):
            self._ready_bytes -= len(item)
            return memoryview(item)
        data, fds = self._unpack(item)
        if fds:
            close_fds(fds)
        return memoryview(data)

    async def loan(self, size: int) -> memoryview:
        """A writable buffer of ``size`` bytes to fill and pass to ``send()``, which sends
        it without a copy (see the blocking Channel's ``loan``); waits, like ``send``, while
        the pool is full."""
        check_loan_size(size, self._max_message)
        self._check_open()  # closed, or broken by a protocol error: no loan to send
        self._raise_write_error()
        shm = self._shm
        if shm is not None and size >= SHARED_THRESHOLD and not shm.ready:
            self._look_for_offer()
        if shm is None or size < SHARED_THRESHOLD or not shm.usable_for(size):
            return memoryview(bytearray(size))
        shm.ensure_pool()
        offset = await self._lend(size, "loan")
        return shm.loan(offset, size)

    async def _send_shared(self, data: Buffer) -> None:
        shm = self._shm
        assert shm is not None
        offset = shm.loaned(data)
        if offset is None:
            try:
                view = data if type(data) is bytes else memoryview(data).cast("B")
            except (TypeError, ValueError):
                check_message(data, "send")
                raise
            size = len(view)
            if not shm.ready:
                self._look_for_offer()
            if not shm.usable_for(size):
                try:
                    await self._send_large(data)
                except FrameTooLarge as exc:
                    if self._wire is None:
                        raise
                    raise not_pooled(exc, self._wire, size, shm) from exc
                return
        else:
            size = len(data)
        self._check_open()
        self._raise_write_error()
        self._flush_releases()
        shm.ensure_pool()
        if offset is None:
            offset = await self._lend(size)
            try:
                shm.write(offset, view)
            except BaseException:
                shm.give_back(offset)  # not sent: ours again
                raise
        else:
            shm.hand_over(data)  # type: ignore[arg-type]
        if self._wire is not None:
            await self._slot_packet(offset, size)
            return
        # Both records go to the kernel (or the send queue, in order) before any await.
        fd = shm.open_pool()
        try:
            if fd >= 0:
                # In a sendmsg() of its own (the send queue keeps one for anything with
                # descriptors), so that the pool arrives with this record.
                self._write([encode_record(ATTACH, shm.pool_size)], [fd])
            self._write([encode_record(SLOT, offset, size)], [])
        except BaseException:
            if fd >= 0 and self._write_error is None:
                shm.attach_failed()
            if self._write_error is None:
                shm.give_back(offset)
            raise
        if fd >= 0:
            shm.pool_sent()  # the kernel has the descriptor, or the send queue a duplicate
        if self._out.full:
            await self._drained(self._out.low)

    async def _slot_packet(self, offset: int, size: int) -> None:
        """Seqpacket: a SLOT in one records packet, after ATTACH with our pool's descriptor
        on the first (the same packet: whole or not at all). A packet may wait for room
        in the socket, and every SLOT must come after the ATTACH: while one task's ATTACH
        waits, other tasks' SLOTs wait for it."""
        shm = self._shm
        assert shm is not None
        try:
            loop = self._bind_loop()
            while self._attaching:
                if await self._space.wait(loop, self._timeout) is EXPIRED:
                    with translating("send", self._remote):
                        raise TimeoutError  # noqa: TRY301
                self._check_open()
            fd = shm.open_pool()
        except BaseException:
            shm.give_back(offset)
            raise
        records = [(ATTACH, shm.pool_size, 0)] if fd >= 0 else []
        records.append((SLOT, offset, size))
        self._attaching = fd >= 0
        try:
            await self._send_packet(
                encode_packet(records), rights([fd], 1) if fd >= 0 else [], records=True
            )
        except BaseException:
            # Nothing went: the system call takes the packet whole, and no await follows it.
            if fd >= 0:
                shm.attach_failed()
            shm.give_back(offset)
            raise
        finally:
            if fd >= 0:
                self._attaching = False
                self._space.wake_all()
        if fd >= 0:
            shm.pool_sent()

    async def _lend(self, size: int, call: str = "send") -> int:
        """A free extent of ``size`` bytes in our pool, waiting (within the timeout) while
        it is full: backpressure, never growth. Releases come in through the reader
        callback, started here if no task is receiving."""
        shm = self._shm
        assert shm is not None
        loop = self._bind_loop()
        deadline = None if self._timeout is None else loop.time() + self._timeout
        while True:
            offset = shm.lend(size)
            if offset is not None:
                return offset
            self._check_open()
            failed = self._read_failed
            if failed is not None:
                raise failed.with_traceback(None)
            if self._eof:
                raise ConnectionClosed(
                    f"{self._where()}: the peer closed the connection while our shared-memory "
                    "pool was full"
                )
            if not shm.ready:
                raise ConnectionClosed(f"{self._where()}: the shared-memory pool was closed")
            if not self._reading:
                self._start_reading(loop)
            left = None if deadline is None else deadline - loop.time()
            if shm.lending and (left is None or left > POOL_WAIT):
                # A loan of ours given up frees room with nothing on the socket to say so.
                await self._space.wait(loop, POOL_WAIT)
                continue
            if (left is not None and left <= 0) or await self._space.wait(loop, left) is EXPIRED:
                raise shm.stayed_full(self._where(), self._timeout, call)

    def _look_for_offer(self) -> None:
        """A client that opted in, about to send a large message, has not yet seen whether
        the listener opted in: take in what has arrived (the OFFER comes first), now."""
        if self._closed or self._read_failed is not None or self._eof:
            return
        if not self._reading:
            self._start_reading(self._bind_loop())
        if self._wire is not None:
            self._read_wire()
        else:
            self._read_stream()  # non-blocking: whatever is there

    def _flush_releases(self) -> None:
        """Send (or queue) the RELEASE records we owe. On the loop's thread."""
        shm = self._shm
        if shm is None or not shm.owes() or self._closed or self._write_error is not None:
            return
        if self._wire is not None:
            self._flush_packets(shm)
            return
        records = b"".join([encode_record(RELEASE, offset) for offset in shm.take_pending()])
        try:
            self._write([records], [])
        except UdsError as exc:
            log.debug("%r: releases not sent: %s", self, exc)

    def _flush_packets(self, shm: SharedMemory) -> None:
        """``_flush_releases`` on seqpacket: what the socket does not take now stays owed,
        and goes when it becomes writable (``_writable``)."""
        assert self._wire is not None
        offsets = shm.take_pending()
        for start, packet in release_packets(offsets):
            try:
                send_packet(self._sock, self._wire, packet, [], records=True)
            except (BlockingIOError, InterruptedError):
                with shm.lock:
                    shm.pending.extendleft(reversed(offsets[start:]))
                if not self._writing:
                    self._start_writing()
                return
            except OSError as exc:
                log.debug("%r: releases not sent: %s", self, exc)
                return

    def _writable(self) -> None:
        self._flush_releases()

    def _release_soon(self) -> None:
        """A received view was released (any thread): send the release from the loop."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return  # sent by the next send or receive
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not loop:
            try:
                loop.call_soon_threadsafe(self._flush_releases)
            except RuntimeError:
                pass  # the loop closed since the test above: nothing is left to send on
        elif self._in_write:
            # A garbage collection in a write ended the view, maybe between the part of a
            # message the socket took and the queueing of the rest, or between its parts
            # as they are queued: a record sent or queued now would land inside it.
            loop.call_soon(self._flush_releases)
        else:
            self._flush_releases()

    def _offer(self) -> None:
        """A listener that opted in answers a client that did: OFFER, first of all (on
        seqpacket the hello, which otherwise goes before our first packet anyway)."""
        if self._wire is not None:
            try:
                send_packet(self._sock, self._wire, None, [])
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                raise translate(exc, "send", self._remote) from exc
            return
        self._write([encode_record(OFFER, VERSION)], [])

    def _record(self, body: bytes, fds: list[int]) -> None:
        """Act on one shared-memory record; a bad one closes the channel (ProtocolError)."""
        shm = self._shm
        assert shm is not None
        try:
            lease = shm.on_record(body, fds)
        except ProtocolError as exc:
            raise self._shared_failed(exc) from exc
        if lease is not None:
            self._ready.append(lease)
        else:
            self._space.wake_all()  # a release, maybe: senders waiting for room look again

    def _shared_failed(self, exc: ProtocolError) -> ProtocolError:
        """A bad record, packet or pool: release everything shared, fail every later send,
        let the peer see the end; the error every recv() raises from now on."""
        assert self._shm is not None
        self._shm.close()
        # Messages queued in the peer's pool went with it: recv() raises this error in their
        # place, as the blocking Channel does for those it read ahead (messages that came
        # through the socket are still received first). In place: readers hold the deque.
        kept = [item for item in self._ready if type(item) is not Lease]
        self._ready.clear()
        self._ready.extend(kept)
        self._fail_write(ConnectionClosed(f"{self._where()}: closed after a protocol error: {exc}"))
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        return (FrameTooLarge if isinstance(exc, FrameTooLarge) else ProtocolError)(
            f"{self._where()}: {exc}; the channel cannot be used any more: close it"
        )

    # -- closing --------------------------------------------------------------------------
    async def shutdown_write(self) -> None:
        """Half-close once what is queued has gone out: the peer sees end of stream."""
        await self._drained(0)
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise translate(exc, "send", self._remote) from exc
        if self._write_error is None:  # what a send says from now on (not "peer closed")
            self._write_error = write_shut(self._where())

    async def aclose(self) -> None:
        """Send what is still queued (within the timeout, if one is set), then close."""
        try:
            if not self._closed and self._out and self._write_error is None:
                await self._drained(0)
        except UdsError as exc:
            log.debug("%r: queued data not sent before closing: %s", self, exc)
        finally:
            self.close()

    def close(self) -> None:
        """Close now: the socket, received descriptors nobody took, our bound reply path.

        Data still in the send queue is dropped (``aclose`` sends it first). Tasks waiting
        in ``recv`` or ``send`` get ConnectionClosed.
        """
        if self._closed:
            return
        self._closed = True
        self._stop_reading()
        self._stop_writing()
        self._drop_queue()
        self._drop_in_place()
        self._wake_receiver()
        self._drain.wake_all()
        self._wwait.wake_all()
        self._space.wake_all()
        if self._shm is not None:
            self._shm.close()
        if self._framing is not None:
            close_fds(self._framing.held_fds())
        for item in self._ready:
            if isinstance(item, tuple):
                close_fds(item[1])
        self._ready.clear()
        self._ready_bytes = 0
        self._ready_fds = 0
        if self._claim is not None:
            self._claim.release()  # first: the open socket keeps its file's inode (Claim)
        if self._owns_socket:
            self._sock.close()
        if self._cleanup_dir is not None:
            try:
                os.rmdir(self._cleanup_dir)
            except OSError:
                pass

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        if exc_type is not None and not issubclass(exc_type, Exception):
            # Cancelled (asyncio.timeout, a task's cancel) or interrupted: waiting for the
            # peer to read what is queued would hold the cancel up, without end if the
            # peer never reads. Close now, as close() does.
            self.close()
            return
        await self.aclose()
