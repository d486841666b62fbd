"""Blocking channels: one connected endpoint that sends and receives whole messages.

A ``Channel`` wraps a connected socket of any type. On a stream socket, messages are framed
by the sans-IO core in :mod:`udskit.proto`; seqpacket and datagram sockets keep the kernel's
message boundaries. Descriptors travel with ``send_fds``/``recv_fds``; every received one is
close-on-exec, and closed by us on every error path.

Receiving has one path (``_read``) for every socket type: recvmsg_into() where descriptors or
credentials may come, recv_into() on a stream that can carry none (TCP, or ``max_fds=0``
where the kernel refuses descriptors: see ``ancillary.refuse_descriptors``), which spares
the kernel the control data and the peer address on every read. A stream channel's receive
buffer starts at one page and grows only while reads fill it (see RECV_START), so a server
holding thousands of idle clients does not hold a large buffer for each.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import logging
import math
import mmap
import os
import select
import socket
import threading
import weakref
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from time import monotonic, monotonic_ns
from typing import TYPE_CHECKING, Final, NoReturn, TypeAlias

from .address import Address, sun_path
from .ancillary import (
    RECV_FLAGS,
    ancillary_size,
    close_fds,
    descriptors,
    discard,
    refuse_descriptors,
    rights,
    unpack,
)
from .creds import PeerCred
from .errors import ConnectionClosed, FrameTooLarge, ProtocolError, Timeout, UdsError
from .freshbytes import FRESH_MIN, fresh
from .options import (
    SocketType,
    base_type,
    check_message,
    check_timeout,
    max_frame_for,
    type_name,
)
from .proto import (
    CLOSED,
    HEADER,
    NEED_DATA,
    Closed,
    Control,
    Framing,
    LengthPrefixed,
    NeedData,
    make_framing,
)
from .proto.shm import (
    ATTACH,
    OFFER,
    RELEASE,
    SHARED_THRESHOLD,
    SLOT,
    SWITCHED,
    VERSION,
    PacketWire,
    encode_packet,
    encode_record,
)
from .shm import Lease, SharedMemory, check_loan_size
from .shmpackets import (
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
from .translate import translate

if TYPE_CHECKING:
    from .sockfile import Claim

__all__ = ["Buffer", "Channel", "ChannelFacts"]

log = logging.getLogger("udskit")

Buffer = bytes | bytearray | memoryview

#: Most bytes read per system call on a stream. Large enough that a burst of small messages
#: is one system call and a 1 MiB message a few.
RECV_CHUNK: Final = 256 * 1024

#: A stream channel's receive buffer starts at this size, and goes back to it. A server holds
#: a channel per client, most of them idle between short requests: RECV_CHUNK each would be
#: 2.5 GiB of zero-filled memory at 10,000 clients. One page holds a typical request whole. A
#: read that fills the buffer means a burst is under way, and the buffer grows to RECV_CHUNK
#: at once (not by doubling: one allocation, not six); RECV_SHRINK_AFTER reads of less than
#: this size give the memory back. (The framing copies every read out of the buffer, so its
#: size is all that changes.)
RECV_START: Final = 4 * 1024

#: Short reads (under RECV_START) into a grown buffer before it goes back to RECV_START.
#: Enough that a conversation alternating large and small messages reallocates (256 KiB,
#: zero-filled: ~20 us) once every so many messages, not for every one; few enough that a
#: client that goes quiet after a burst soon holds a page again.
RECV_SHRINK_AFTER: Final = 16

#: Payloads up to this size are joined with their header and sent with one send(); above
#: it, the header and payload go out with sendmsg() scatter-gather to avoid copying them.
_JOIN_LIMIT: Final = 64 * 1024

#: No SIGPIPE on a closed peer: the error comes back as EPIPE (Python ignores SIGPIPE
#: anyway, but an embedding application may not).
_SEND_FLAGS: Final = int(socket.MSG_NOSIGNAL)

#: Stands for the write lock where the caller holds it already (``_send_shared``).
_HELD: Final = contextlib.nullcontext()

#: What ``_read`` reports as control data where none can come.
_NO_CONTROL: Final[list[tuple[int, int, bytes]]] = []

# Plain ints: socket.MSG_* are IntFlag members, and `flags & socket.MSG_CTRUNC` on the hot
# path goes through enum.__and__, which cost more than the recvmsg() call itself.
_CTRUNC: Final = int(socket.MSG_CTRUNC)
_TRUNC: Final = int(socket.MSG_TRUNC)
_WAITALL: Final = int(socket.MSG_WAITALL)

#: Messages received before the channel was made (a datagram that a listener read), with
#: their descriptors, in the order recv() returns them.
_Inbox: TypeAlias = deque[tuple[bytes, list[int]]]

#: A message at least this large makes the channel read the next header on its own, so that a
#: large payload goes from the kernel straight into the bytes object returned (one copy, as
#: in C) instead of through the receive buffer (three). It costs one extra recvmsg() per
#: message, which is noise at this size; the first small message switches it off again.
DIRECT_READ_MIN: Final = 256 * 1024

#: How long close() waits, in all, for the threads it woke in recv() and send() to leave,
#: before it closes the descriptors the framing holds and the socket. Those threads are
#: returning already; this only bounds one stuck elsewhere (in a signal handler, say),
#: whose received descriptors then stay open, and which may then meet the socket's number
#: reused by the next open() (see close()).
CLOSE_WAIT: Final = 1.0

#: Longest a sender waiting for space in its shared-memory pool waits without looking at the
#: pool again: while another thread is the one reading the socket (that thread passes
#: releases on as it reads them; this bounds the wait for one that stopped reading with a
#: message), and while loans of ours are out (one given up frees room with nothing on the
#: socket to say so).
POOL_WAIT: Final = 0.05

#: Bytes of the peer's messages (through the socket) a sender waiting for pool space reads
#: ahead and keeps for recv(), while it looks for releases; past it, it waits for recv() to
#: take them, so that a peer sending many messages and no release cannot grow our memory.
ARRIVED_MAX: Final = 4 * 1024 * 1024
#: What one message read ahead costs beyond its bytes, counted against ARRIVED_MAX: its
#: bytes object, tuple, descriptor list and queue slot (about 230 bytes, measured). Without
#: it a flood of 1-byte messages (or of lost ones, which have none) would grow the queue
#: without bound: 4 MiB of them held about 900 MiB.
ARRIVAL_COST: Final = 256

#: Packets a look at a seqpacket socket with shared memory (``_pump(wait=False)``) takes in
#: at most: the releases that arrived, without reading on for ever behind a fast peer.
_PACKETS_PER_LOOK: Final = 64

#: Upper bound for ``spin``: past a millisecond, polling burns a CPU for no gain over being
#: woken (a wake-up costs tens of microseconds, not milliseconds).
MAX_SPIN_US: Final = 1000


class ChannelFacts:
    """What a channel says about itself; shared by the blocking and asyncio channels."""

    __slots__ = ()
    _type: SocketType
    _framing: Framing | None
    _peer: PeerCred | None
    _remote: Address | None
    _closed: bool

    # -- properties -----------------------------------------------------------------------
    @property
    def type(self) -> SocketType:
        return self._type

    @property
    def framing(self) -> str | None:
        """The framing name on a stream channel; None on seqpacket and dgram."""
        return None if self._framing is None else self._framing.name

    @property
    def peer(self) -> PeerCred | None:
        """The peer's credentials, as the kernel reported them.

        Stream and seqpacket: the connecting (or accepting) process, from SO_PEERCRED.
        Datagram: the sender of the last datagram received (SCM_CREDENTIALS); None before
        the first. TCP: None.
        """
        return self._peer

    @property
    def address(self) -> Address | None:
        """The other end's address, where it has one (a bound client may have none)."""
        return self._remote

    @property
    def closed(self) -> bool:
        return self._closed


class Channel(ChannelFacts):
    """A connected endpoint that sends and receives whole messages.

    Use it as a context manager; iterate over it to receive until the peer closes.

    Threads may share a channel: each ``send*`` call puts its message (or batch) on the wire
    whole, never interleaved with another thread's, and each ``recv*`` call takes whole
    messages; senders and receivers do not wait for each other (a thread waits for another
    thread's send, or receive, to finish; each is bounded by the timeout). ``shutdown_write``
    waits for a send under way; ``close`` wakes the threads inside a call, and closes the
    socket once they have left. A signal handler must not use a channel that the thread it
    interrupted is using: it would wait for ever.

    A stream send that fails after part of a message may have gone out (a timeout, a
    signal handler's exception, an error) leaves the channel *broken*: the peer sees the
    stream end, and every later call here raises ``ConnectionClosed``, so no message is
    ever spliced into the remains of another. Likewise a stream read cut short by an
    exception that is not udskit's, or that brings more descriptors than ``max_fds``:
    its bytes cannot be used, so that ``recv`` and every later one raise ``ProtocolError``.
    """

    __slots__ = (
        "__weakref__",  # a released view tells its channel through a weak reference
        "_ancsize",
        "_batcher",
        "_broken",
        "_claim",
        "_cleanup_dir",
        "_closed",
        "_closing",
        "_direct",
        "_fds_seen",
        "_framing",
        "_grow_at",
        "_held",
        "_inbox",
        "_max_fds",
        "_max_message",
        "_owner_pid",
        "_owns_socket",
        "_peer",
        "_plain",
        "_poller",
        "_rbuf",
        "_rbufs",
        "_remote",
        "_rlock",
        "_rview",
        "_shm",
        "_short_reads",
        "_shrink_below",
        "_sock",
        "_spin_ns",
        "_tag",
        "_timeout",
        "_type",
        "_unreadable",
        "_unusable",
        "_wire",
        "_wlock",
        "_write_shut",
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
        owns_socket: bool = True,
        inbox: Sequence[tuple[bytes, list[int]]] = (),
        shared_memory: int = 0,
        peer_opted: bool = False,
    ) -> None:
        """``shared_memory``: the pool size (0: off) of a channel that opted in (checked by
        its caller: a stream with length framing, or seqpacket); ``peer_opted``: the peer
        opted in too."""
        self._sock = sock
        self._type: SocketType = type_name(base_type(sock))
        # With shared memory, large messages go through the pool, not the socket: a
        # seqpacket channel's default max_frame is then the stream's (16 MiB), not the one
        # a socket packet is held to.
        limit = max_frame_for("stream" if shared_memory else self._type, max_frame)
        self._framing: Framing | None = (
            make_framing(framing, max_frame=max_frame) if self._type == "stream" else None
        )
        self._remote = remote  # first: the shared-memory pools' errors name it
        self._shm: SharedMemory | None = None
        self._wire: PacketWire | None = None  # seqpacket with shared memory
        self._tag = bytearray(1)  # a tagged packet's first byte (see shmpackets)
        if shared_memory:
            if self._type == "stream":
                self._framing = LengthPrefixed(limit, records=True)
            else:
                self._wire = make_wire(sock, peer_opted)
            self._shm = SharedMemory(
                shared_memory, limit, peer_opted=peer_opted, where=self._where()
            )
            self._shm.tie_to(self, self._release_soon)
        self._max_message = limit
        self._max_fds = max_fds
        is_unix = sock.family == socket.AF_UNIX
        self._ancsize = ancillary_size(max_fds) if is_unix else 0
        # recv_into(), no control data: a stream on which no descriptor can arrive.
        self._plain = self._framing is not None and (
            not is_unix or (max_fds == 0 and refuse_descriptors(sock))
        )
        # The receive buffer (see RECV_START). A packet channel's must hold a whole max_frame
        # message: allocated by its first read, since a datagram session never reads.
        self._resize(RECV_START if self._framing is not None else 0)
        self._direct = False
        self._fds_seen = False  # no descriptor has arrived yet: recv() need not ask for any
        self._spin_ns = 0
        self._poller: select.poll | None = None
        self._peer = peer
        self._claim = claim
        self._owns_socket = owns_socket
        self._owner_pid = os.getpid()  # a forked child's close() is told apart (see close)
        self._inbox: _Inbox = deque(inbox)
        # Closes what a channel dropped without close() holds (see _holding_fds).
        self._held: weakref.finalize[[Framing | None, _Inbox], Channel] | None = None
        if any(fds for _, fds in self._inbox):
            self._holding_fds()
        self._closed = False
        self._closing = threading.Lock()  # taken by the first close(), never given back
        # _unusable: closed or broken, one test on the hot paths; _broken says why
        self._unusable = False
        self._write_shut = False  # shutdown_write() was called: sends say so
        self._broken: ConnectionClosed | None = None  # part of a frame went out
        self._unreadable: ProtocolError | None = None  # a read had to be dropped
        self._wlock = threading.Lock()  # one message (or batch) on the wire at a time
        self._batcher = 0  # the thread sending a batch, while it holds _wlock (see loan)
        self._rlock = threading.Lock()  # one reader of the framing and buffer at a time
        self._cleanup_dir: bytes | None = None
        self._timeout: float | None = None
        self.settimeout(sock.gettimeout())

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def socket(self) -> socket.socket:
        """The underlying socket, for select() and socket options. Do not read from it."""
        return self._sock

    def settimeout(self, timeout: float | None) -> None:
        """Seconds to wait in send/recv before raising ``Timeout`` (None: wait forever)."""
        timeout = check_timeout(timeout)
        if self._closed:
            self._check_open()
        self._timeout = timeout
        # With a timeout the socket is non-blocking and a call that finds nothing to do
        # waits in poll() (``_wait``): the call is tried first, so the common case costs one
        # system call. (A socket's own timeout polls before every call: two.) Skipped when
        # the socket is so already (a server makes a channel per client), and on a socket
        # that is not ours: a datagram session must not change its listener's mode.
        mode = None if self._timeout is None else 0.0
        if self._owns_socket and self._sock.gettimeout() != mode:
            try:
                self._sock.setblocking(mode is None)
            except OSError:
                self._check_open()  # closed by another thread meanwhile: EBADF
                raise

    def gettimeout(self) -> float | None:
        """The timeout set by ``settimeout`` (or ``connect(timeout=)``)."""
        return self._timeout

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self._sock.fileno()}"
        return f"<Channel {self._type} {self._remote or 'unnamed'} peer=({self._peer}) {state}>"

    # -- sending --------------------------------------------------------------------------
    def send(self, data: Buffer) -> None:
        """Send one message (on a stream: framed; on seqpacket/dgram: one packet).

        With shared memory, a message of SHARED_THRESHOLD bytes or more is copied into our
        pool (a buffer from ``loan()`` is not copied at all) and only its slot is sent.
        """
        if self._write_shut:
            raise write_shut(self._where())
        if self._shm is not None:
            if type(data) is not bytes or len(data) >= SHARED_THRESHOLD:
                self._send_shared(data)  # a loan, or a message that may go through the pool
            else:
                self._send_framed(data)
            self._write_lock_left()
            return
        self._send_framed(data)

    def _send_framed(self, data: Buffer) -> None:
        framing = self._framing
        try:
            small = framing is not None and len(data) <= _JOIN_LIMIT
            frame = framing.frame(data) if small else None  # type: ignore[union-attr]
        except (TypeError, ValueError):
            check_message(data, "send")
            raise
        if frame is None:
            self._send(data, [])
            return
        # The hot path of every client: one frame, one send() (see _write for the rules).
        # `with` takes the lock with no gap in which a signal handler's exception could
        # leave it taken (acquire() followed by try: has one).
        with self._wlock:
            if self._unusable:
                self._check_open()
            try:
                sent = self._sock.send(frame, _SEND_FLAGS)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                raise self._send_error(exc) from exc  # closed under us, or half-closed
            except BaseException:
                self._break("a send was interrupted")
                raise
            if sent != len(frame):  # the socket is full: wait, then write the rest
                self._write([frame], [], len(frame), sent=sent, full=True)

    def send_many(self, messages: Iterable[Buffer]) -> None:
        """Send several messages, on a stream with as few system calls as possible.

        The frames are joined into one buffer of up to ``_JOIN_LIMIT`` bytes per write, so a
        burst of small messages costs one send() instead of one each. On seqpacket and dgram
        every message is still its own packet. No other thread's message goes between two
        of a batch. On a stream the batch is one unit: if it fails (or ``messages`` raises)
        after any of it went out, the channel is broken. With shared memory a large message
        (or a loan) goes through the pool, as with send().
        """
        if self._write_shut:
            raise write_shut(self._where())
        framing = self._framing
        if framing is None:
            self._send_packets(messages)
            return
        shm = self._shm
        with self._wlock:
            self._check_open()
            batch: list[bytes] = []
            batched = 0
            went = 0
            self._batcher = threading.get_ident()
            try:
                for message in messages:
                    if shm is not None and (
                        type(message) is not bytes or len(message) >= SHARED_THRESHOLD
                    ):
                        if batch:  # the frames before it go first, in order
                            went = self._write([b"".join(batch)], [], batched, went)
                            batch.clear()
                            batched = 0
                        went += self._send_shared(message, held=True)
                        continue
                    try:
                        frame = framing.frame(message)
                    except (TypeError, ValueError):
                        check_message(message, "send_many")
                        raise
                    batch.append(frame)
                    batched += len(frame)
                    if batched >= _JOIN_LIMIT:
                        went = self._write([b"".join(batch)], [], batched, went)
                        batch.clear()
                        batched = 0
                if batch:
                    self._write([b"".join(batch)], [], batched, went)
            except BaseException:
                if went and self._broken is None:
                    self._break(f"send_many failed after {went} bytes of its batch went out")
                raise
            finally:
                self._batcher = 0
        self._write_lock_left()

    def _send_packets(self, messages: Iterable[Buffer]) -> None:
        """``send_many`` on seqpacket and dgram: a packet each, all under one hold of the
        write lock, so that no other thread's message lands between two of the batch.
        With shared memory a large message goes through the pool, as with send()."""
        shm = self._shm
        with self._wlock:
            self._check_open()
            self._batcher = threading.get_ident()
            try:
                for message in messages:
                    if shm is not None and (
                        type(message) is not bytes or len(message) >= SHARED_THRESHOLD
                    ):
                        self._send_shared(message, held=True)
                    else:
                        check_message(message, "send_many")
                        self._send_packet(message, [])
            finally:
                self._batcher = 0
        self._write_lock_left()

    def send_fds(self, data: Buffer, fds: Sequence[int]) -> None:
        """Send one message with open descriptors attached (SCM_RIGHTS).

        The descriptors stay open here; the receiver gets its own duplicates.
        """
        if not self._is_unix():
            raise ProtocolError("descriptors can only be passed over Unix sockets")
        self._send(data, rights(descriptors(fds, "send_fds"), self._max_fds))

    def _send(self, data: Buffer, ancillary: list[tuple[int, int, bytes]]) -> None:
        if self._write_shut:
            raise write_shut(self._where())
        check_message(data, "send")
        framing = self._framing
        with self._wlock:
            self._check_open()
            if framing is None:
                self._send_packet(data, ancillary)
            else:
                parts = framing.encode(data)
                views: list[Buffer] = [memoryview(p).cast("B") for p in parts if len(p)]
                self._write(views, ancillary, sum(map(len, views)))
        self._write_lock_left()

    def _send_packet(self, data: Buffer, ancillary: list[tuple[int, int, bytes]]) -> None:
        """One seqpacket message or datagram: the kernel takes all of it or none."""
        if self._type == "seqpacket" and not data:
            raise ProtocolError(
                "cannot send an empty seqpacket message: the receiver reads it as end of connection"
            )
        if self._wire is not None:
            self._packet_out(data, ancillary)
            return
        deadline: float | None = None
        while True:
            try:
                if self._owns_socket or self._remote is None:
                    if ancillary:
                        self._sock.sendmsg([data], ancillary, _SEND_FLAGS)
                    else:
                        self._sock.send(data, _SEND_FLAGS)
                    return
                # A datagram session on a server: the reply goes to the sender's address.
                with sun_path(self._remote) as where:
                    self._sock.sendmsg([data], ancillary, _SEND_FLAGS, where)
                return
            except BlockingIOError:
                try:
                    deadline = self._wait(select.POLLOUT, deadline)
                except OSError as exc:
                    raise self._send_error(exc) from exc  # closed under us, or half-closed
            except OSError as exc:
                raise self._send_error(exc) from exc  # closed under us, or half-closed

    def _packet_out(
        self,
        data: Buffer | None,
        ancillary: list[tuple[int, int, bytes]],
        *,
        records: bool = False,
    ) -> None:
        """One packet on a seqpacket channel with shared memory (see shmpackets.send_packet;
        None: our hello alone, if owed), waiting within the timeout while the socket is
        full. Caller holds the write lock. A packet goes whole or not at all, so a failure
        of the system call leaves the channel as it was; an exception from elsewhere (a
        signal handler's) may land after a packet went out unrecorded (our hello, a slot),
        so it breaks the channel, as on a stream."""
        wire = self._wire
        assert wire is not None
        deadline: float | None = None
        while True:
            try:
                send_packet(self._sock, wire, data, ancillary, records=records)
                return
            except BlockingIOError:
                try:
                    deadline = self._wait(select.POLLOUT, deadline)
                except OSError as exc:
                    raise self._send_error(exc) from exc
                except BaseException:
                    self._break("a send was interrupted")
                    raise
            except OSError as exc:
                raise self._send_error(exc) from exc  # closed under us, or half-closed
            except UdsError:
                raise
            except BaseException:
                self._break("a send was interrupted")
                raise

    def _write(
        self,
        parts: list[Buffer],
        ancillary: list[tuple[int, int, bytes]],
        size: int,
        went: int = 0,
        sent: int = 0,
        full: bool = False,
    ) -> int:
        """Put ``parts`` (``size`` bytes of whole frames, of which ``sent`` are written
        already; ``full``: the last try found the socket full) on the stream; return
        ``went`` plus ``size``. Caller holds the write lock.

        A failure raised by the first system call of a unit (``went`` + ``sent`` == 0)
        means nothing of it was written: the stream is still whole, and the error is raised
        as is. Any later failure, or an exception that did not come from the system call
        itself (a signal handler's KeyboardInterrupt may land just after a write returned),
        leaves an unknown part of a frame on the wire: the channel is broken before the
        error is raised.
        """
        sock = self._sock
        deadline: float | None = None
        try:
            views = advance([memoryview(p).cast("B") for p in parts], sent)
            if full:
                deadline = self._wait(select.POLLOUT, deadline)
            while views:
                try:
                    n = sock.sendmsg(views, ancillary, _SEND_FLAGS)
                except BlockingIOError:
                    deadline = self._wait(select.POLLOUT, deadline)
                    continue
                sent += n
                ancillary = []  # descriptors go with the first byte only
                views = advance(views, n)
        except OSError as exc:
            self._check_open()  # closed under us by another thread
            if not went + sent:
                raise self._send_error(exc) from exc
            self._break(f"a send failed after {went + sent} of {went + size} bytes went out")
            error = self._broken
            assert error is not None
            if isinstance(exc, (TimeoutError, BlockingIOError)):
                # Say both: it timed out, and the channel cannot be used any more.
                raise Timeout(f"{error}; the send timed out") from exc
            raise copy.copy(error) from exc
        except BaseException:
            self._break("a send was interrupted")
            raise
        return went + size

    def _wait(self, events: int, deadline: float | None) -> float:
        """The socket would block: wait until it is ready for ``events`` or the timeout
        passes (``TimeoutError``, translated by the caller). Returns the deadline, set on
        the first wait of a call, so that retries share one timeout."""
        timeout = self._timeout
        if not timeout:
            # Timeout 0 means "never wait"; and no timeout on a non-blocking socket means its
            # owner made it so through ``.socket``: both ask for "would block", not a wait.
            raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        if deadline is None:
            deadline = monotonic() + timeout
        poller = select.poll()
        try:
            poller.register(self._sock, events)
        except ValueError:  # fileno() is -1: another thread's close() came first
            self._check_open()
            raise
        while True:
            left = deadline - monotonic()
            if left <= 0:
                raise TimeoutError
            if poller.poll(max(1, math.ceil(left * 1000))):
                return deadline

    def _break(self, why: str) -> None:
        """Mark the stream broken (part of a frame is on the wire) and tell the peer."""
        self._broken = broken(self._where(), why)
        self._unusable = True
        try:
            self._sock.shutdown(socket.SHUT_WR)  # the peer sees the message cut off
        except OSError:
            pass

    # -- receiving ------------------------------------------------------------------------
    def recv(self) -> bytes:
        """Receive one message. Descriptors that arrive with it are closed (see recv_fds).

        Raises ``ConnectionClosed`` when the peer has closed (``mid_message`` if it left a
        message unfinished), ``Timeout`` after ``settimeout`` seconds.
        """
        if self._shm is not None:
            return self._recv_shared(view=False)  # type: ignore[return-value]
        with self._rlock:
            try:
                framing = self._framing
                if framing is not None and not self._unusable and not self._inbox:
                    # The stream path of _recv(), inlined: the hot loop of every client.
                    message = framing.next_message()
                    while message is NEED_DATA:
                        message = self._feed(framing)
                    if message is CLOSED:
                        raise ConnectionClosed(  # noqa: TRY301
                            f"{self._where()}: the peer closed the connection"
                        )
                    if self._fds_seen:  # else the framing holds none: skip asking it
                        fds = framing.take_fds()
                        if fds:
                            close_fds(fds)
                    self._direct = len(message) >= DIRECT_READ_MIN  # type: ignore[arg-type]
                    return message  # type: ignore[return-value]
                data, fds = self._recv()
            except UdsError:
                raise
            except BaseException:
                self._read_interrupted()
                raise
        if fds:
            log.debug("%r: closing %d descriptors received by recv()", self, len(fds))
            close_fds(fds)
        return data

    def recv_fds(self) -> tuple[bytes, list[int]]:
        """Receive one message and the descriptors sent with it (now owned by the caller)."""
        with self._rlock:
            try:
                return self._recv()
            except UdsError:
                raise
            except BaseException:
                self._read_interrupted()
                raise

    def recv_many(self) -> list[bytes]:
        """Wait for at least one message, then return every complete message already here.

        On a stream this drains what one read brought in, without further system calls: the
        receiving half of ``send_many``. Descriptors that arrive are closed, as by recv().
        """
        with self._rlock:
            try:
                data, fds = self._recv()
                if fds:
                    close_fds(fds)
                messages = [data]
                if self._shm is not None:
                    if self._framing is not None and not self._unusable:
                        self._take_buffered()  # recv() leaves them there
                    arrived = self._shm.arrived
                    while arrived and type(arrived[0][0]) is not Lost:  # raised by the next
                        data, fds = self._recv()
                        close_fds(fds)
                        messages.append(data)
                    return messages
                framing = self._framing
                if framing is None:
                    return messages
                while framing.buffered:
                    try:
                        message = framing.next_message()
                    except UdsError:
                        # A frame over max_frame, a cut-off end: the framing raises it again
                        # on the next call, after the messages before it are returned.
                        break
                    if message is NEED_DATA or message is CLOSED:
                        break
                    messages.append(message)  # type: ignore[arg-type]
                    fds = framing.take_fds()
                    if fds:
                        close_fds(fds)
                return messages
            except UdsError:
                raise
            except BaseException:
                self._read_interrupted()
                raise

    def _read_interrupted(self) -> None:
        """An exception that is not ours (a signal handler's KeyboardInterrupt, say) cut a
        read short: bytes the kernel handed over may not have reached the framing, so on a
        stream nothing more can be read safely. (A packet is lost, if anything; no splice.)"""
        # With shared memory a seqpacket channel is in the same case: a records packet
        # lost would leave the pools out of step.
        if (self._framing is not None or self._wire is not None) and self._unreadable is None:
            self._unreadable = read_interrupted(self._where())
            self._unusable = True

    def __iter__(self) -> Iterator[bytes]:
        """Receive messages until the peer closes cleanly."""
        while True:
            try:
                yield self.recv()
            except ConnectionClosed as exc:
                if exc.mid_message:
                    raise
                return

    def _recv(self) -> tuple[bytes, list[int]]:
        """One message and its descriptors. Caller holds the read lock."""
        if self._unusable:
            self._check_open()
            if self._unreadable is not None:
                raise copy.copy(self._unreadable)
        if self._inbox:
            return self._inbox.popleft()
        if self._shm is not None:
            item, fds = self._next_arrival()
            if isinstance(item, Lease):
                return self._shm.copy_out(item), fds
            return item, fds
        framing = self._framing
        if framing is None:
            if not self._owns_socket:
                # A datagram session (Server, dgram) holds exactly the datagram it was made for.
                raise ConnectionClosed(f"{self._where()}: no more datagrams in this session")
            return self._recv_packet()
        message = framing.next_message()
        while message is NEED_DATA:
            message = self._feed(framing)
        if message is CLOSED:
            raise ConnectionClosed(f"{self._where()}: the peer closed the connection")
        self._direct = len(message) >= DIRECT_READ_MIN  # type: ignore[arg-type]
        return message, framing.take_fds()  # type: ignore[return-value]

    def _read(
        self, views: list[memoryview]
    ) -> tuple[int, list[tuple[int, int, bytes]], int, object]:
        """One read into ``views``: recvmsg_into()'s (bytes, control data, flags, address).
        recv_into() where no control data can come (``_plain``: no control data, no
        address); polls first for ``spin`` microseconds; on EAGAIN waits within the
        timeout. Every receive goes through here."""
        if self._spin_ns:
            self._spin()
        try:
            if self._plain:
                size = self._sock.recv_into(views[0])
                if not size and self._closed:
                    self._check_open()  # close() in another thread woke us with an empty read
                return size, _NO_CONTROL, 0, None
            got = self._sock.recvmsg_into(views, self._ancsize, RECV_FLAGS)
        except OSError as exc:
            got = self._read_failed(exc, views)
        if not got[0] and self._closed:
            if got[1]:  # an empty datagram may bring descriptors: nobody will take them
                discard(got[1], got[2], self._where())
            self._check_open()
        return got

    def _spin(self) -> None:
        poller = self._poller
        if poller is None:
            return
        # Ask poll(0) rather than trying a non-blocking read: a read that finds nothing
        # raises BlockingIOError, and raising costs ~2.8 us a try against ~0.5 us for
        # poll(), which sets how fast a waiting reply is noticed.
        ready = poller.poll
        deadline = monotonic_ns() + self._spin_ns
        while not ready(0) and monotonic_ns() < deadline:
            pass

    def _read_failed(
        self, exc: OSError, views: list[memoryview]
    ) -> tuple[int, list[tuple[int, int, bytes]], int, object]:
        """The read raised ``exc``: on EAGAIN wait (within the timeout) and read; otherwise
        raise the udskit error."""
        try:
            if not isinstance(exc, BlockingIOError):
                raise exc
            deadline = None
            while True:
                deadline = self._wait(select.POLLIN, deadline)
                try:
                    if self._plain:
                        return self._sock.recv_into(views[0]), _NO_CONTROL, 0, None
                    return self._sock.recvmsg_into(views, self._ancsize, RECV_FLAGS)
                except BlockingIOError:
                    # Another process took what woke us; or close() did: a shut-down
                    # datagram socket polls readable and still yields EAGAIN (Linux).
                    self._check_open()
                    continue
        except OSError as error:
            self._check_open()  # close() in another thread: EBADF says nothing useful
            raise translate(error, "recv", self._remote) from error

    def _feed(self, framing: Framing) -> bytes | NeedData | Closed | Control:
        """Read once and hand the bytes (and any descriptors) to the framing."""
        if self._direct and isinstance(framing, LengthPrefixed):
            if not framing.buffered:
                message = self._feed_direct(framing)
                if message is not NEED_DATA or framing.buffered:
                    return message
            elif self._timeout is None:
                size, have = framing.partial()
                if size >= DIRECT_READ_MIN:
                    done = self._read_rest(framing, size, have)
                    if done is not None:
                        return done
        view = self._rview
        size, ancdata, flags, _ = self._read(self._rbufs)
        if ancdata or flags & _CTRUNC:
            if not self._fds_seen:
                self._holding_fds()
            fds = self._stream_fds(ancdata, flags)
            if size == 0:
                close_fds(fds)
                fds = []
            message = framing.feed(view[:size], fds)
        else:
            message = framing.feed(view[:size])
        if size >= self._grow_at or size < self._shrink_below:
            self._fit(size)  # a full page (a burst), or a short read into a grown buffer
        return message

    def _holding_fds(self) -> None:
        """Descriptors arrive from now on: a channel dropped without ``close()`` closes
        those it still holds, as a dropped socket closes itself."""
        self._fds_seen = True
        self._held = weakref.finalize(self, _close_held, self._framing, self._inbox)
        self._held.atexit = False

    def _fit(self, size: int) -> None:
        """Grow or shrink the receive buffer after a read of ``size`` (see RECV_START). The
        framing has copied what it keeps: the old buffer holds nothing we need."""
        if size >= self._grow_at:
            self._resize(RECV_CHUNK)
            return
        self._short_reads += 1
        if self._short_reads >= RECV_SHRINK_AFTER:
            self._resize(RECV_START)

    def _resize(self, size: int, *, lazy: bool = False) -> None:
        """A new receive buffer of ``size`` bytes (the old one holds nothing we need);
        ``lazy``: private anonymous memory, whose pages are taken only when written."""
        self._rbuf: bytearray | mmap.mmap = (
            mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE) if lazy else bytearray(size)
        )
        self._rview = memoryview(self._rbuf)
        self._rbufs = [self._rview]  # recvmsg_into() takes a list; build it once
        # Thresholds for _feed, so that a read that changes nothing costs two comparisons.
        self._grow_at = size if 0 < size < RECV_CHUNK else RECV_CHUNK + 1
        self._shrink_below = RECV_START if size > RECV_START else 0
        self._short_reads = 0

    def _feed_direct(self, framing: LengthPrefixed) -> bytes | NeedData | Closed | Control:
        """Read a header alone; if it announces a large payload, read that straight into
        the bytes object that becomes the message (MSG_WAITALL: one call, no copy)."""
        if self._timeout is not None:
            # With a timeout the socket is non-blocking, and MSG_WAITALL returns whatever
            # is there: no gain over the buffered path.
            self._direct = False
            return NEED_DATA
        header = self._rview[: HEADER.size]
        size, ancdata, flags, _ = self._read([header])
        fds = []
        if ancdata or flags & _CTRUNC:
            if not self._fds_seen:
                self._holding_fds()
            fds = self._stream_fds(ancdata, flags)
        if size == 0:
            close_fds(fds)
            return framing.feed(b"")
        message = framing.feed(header[:size], fds)
        expected = framing.header_only()
        if message is not NEED_DATA or expected < DIRECT_READ_MIN:
            self._direct = False
            return message
        done = self._read_rest(framing, expected, 0)
        if done is not None:
            return done
        try:
            # recvmsg(), not recv(): descriptors sent with a later part of the payload (by a
            # peer that is not udskit) end the read there, and without a control buffer the
            # kernel would close them unseen (MSG_CTRUNC, which recv() cannot report).
            payload, ancdata, flags, _ = self._sock.recvmsg(
                expected, self._ancsize, _WAITALL | RECV_FLAGS
            )
        except OSError as exc:
            self._check_open()
            raise translate(exc, "recv", self._remote) from exc
        except MemoryError:
            # No room for the size announced (only the peer's word, so far), refused before
            # anything was read: the message goes through the buffer, which holds only
            # what arrives.
            self._direct = False
            return NEED_DATA
        if ancdata or flags & _CTRUNC:
            if not self._fds_seen:
                self._holding_fds()
            fds = self._stream_fds(ancdata, flags)
            if not payload:
                close_fds(fds)
                return framing.feed(b"")
            return framing.feed(payload, fds)
        return framing.receive_payload(payload)

    def _read_rest(
        self, framing: LengthPrefixed, size: int, have: int
    ) -> bytes | NeedData | Closed | Control | None:
        """A large message whose first ``have`` payload bytes the framing holds (a read
        that went past the message before): make the message's own bytes object, copy
        those in, and read the rest straight into it (MSG_WAITALL: one call, and one more
        after each signal), skipping the framing's buffer and the copy out of it. None
        where no such object can be made (the caller reads into its buffer as usual)."""
        prepared = fresh(size, huge=size >= FRESH_MIN)
        if prepared is None:
            return None
        message, into = prepared
        filled = 0  # bytes of the rest read into it so far
        with into:
            framing.copy_partial(into)
            with into[have:] as rest:
                while True:
                    try:
                        with rest[filled:] as free:
                            got, ancdata, flags, _ = self._sock.recvmsg_into(
                                [free], self._ancsize, _WAITALL | RECV_FLAGS
                            )
                    except OSError as exc:
                        if filled:  # what came before the error is the framing's
                            framing.receive_data(rest[:filled])
                        self._check_open()
                        raise translate(exc, "recv", self._remote) from exc
                    filled += got
                    if filled == size - have and not (ancdata or flags & _CTRUNC):
                        return framing.receive_rest(message)
                    if not got or ancdata or flags & _CTRUNC:
                        break
                    # Cut short with no error: a signal handler ran (MSG_WAITALL returns
                    # what it has then). Read on into the same object: starting over would
                    # copy all that came so far again, at every signal (a 256 MiB message
                    # under a 1 kHz interval timer took 24 times as long).
                if not got and self._closed:
                    discard(ancdata, flags, self._where())
                    self._check_open()  # close() in another thread woke us
                # Cut short (the end of the stream), or descriptors came with a later part
                # of the message: what did come goes to the framing as any read's bytes.
                earlier = filled - got
                if earlier:
                    framing.receive_data(rest[:earlier])
                came = bytes(rest[earlier:filled])
        fds: list[int] = []
        if ancdata or flags & _CTRUNC:
            if not self._fds_seen:
                self._holding_fds()
            fds = self._stream_fds(ancdata, flags)
            if not came:
                close_fds(fds)
                fds = []
        return framing.feed(came, fds)

    def _stream_fds(self, ancdata: list[tuple[int, int, bytes]], flags: int) -> list[int]:
        """The descriptors of one stream read; if they cannot be taken, reading ends here
        (see ``stream_read_lost``)."""
        try:
            return unpack(ancdata, flags, self._where(), self._max_fds).fds
        except ProtocolError as exc:
            self._unreadable = stream_read_lost(exc)
            self._unusable = True
            raise self._unreadable from exc

    def _recv_packet(self) -> tuple[bytes, list[int]]:
        if not self._rbuf:  # a packet buffer holds the largest message: made on use
            # Mapped, not allocated: a bytearray of max_frame (256 KiB by default) is zeroed
            # whole, 2.5 GiB resident for 10,000 seqpacket clients of a Server that each sent
            # one short message; mapped, each holds the pages its largest packet filled.
            self._resize(self._max_message, lazy=True)
        size, ancdata, flags, _ = self._read(self._rbufs)
        got = (
            unpack(ancdata, flags, self._where(), self._max_fds)
            if ancdata or flags & _CTRUNC
            else None
        )
        fds = got.fds if got is not None else []
        if flags & _TRUNC:
            close_fds(fds)
            raise truncated(self._where(), self._max_message)
        if size == 0 and self._type == "seqpacket":
            close_fds(fds)
            raise ConnectionClosed(f"{self._where()}: the peer closed the connection")
        if got is not None and got.creds_sent:
            # The sender's credentials; None if the datagram held none (queued before
            # SO_PASSCRED was set): never the previous sender's.
            self._peer = got.cred
        return self._rview[:size].tobytes(), fds

    # -- shared memory --------------------------------------------------------------------
    @property
    def shared_memory(self) -> bool:
        """Whether large messages to the peer go through shared memory now: both ends opted
        in, and (on a connecting client) the listener's offer has been received."""
        return self._shm is not None and self._shm.ready

    @property
    def pool_in_use(self) -> int:
        """Bytes of our shared-memory pool in use: messages the peer has not released,
        and our loans not yet sent (nor released)."""
        return 0 if self._shm is None else self._shm.in_use

    def recv_view(self) -> memoryview:
        """Receive one message as a read-only memoryview, without copying it where it came
        through shared memory.

        The view stays valid, and the sender will not touch its bytes, until it is released:
        ``with channel.recv_view() as view:``, ``view.release()``, or dropping it -- along
        with every view or array made from it (``numpy.frombuffer``). Release it soon: the
        slot counts against the sender's pool until then. A message that came through the
        socket is returned as a view of its bytes.
        """
        if self._shm is None:
            return memoryview(self.recv())
        return self._recv_shared(view=True)  # type: ignore[return-value]

    def loan(self, size: int) -> memoryview:
        """A writable buffer of ``size`` bytes to fill and hand to ``send()`` (the same
        object), which then sends it without a copy.

        With shared memory and ``size`` at or above the threshold, the buffer is a free part
        of our pool (waiting, like ``send``, while the pool is full); after ``send()`` it
        belongs to the receiver and is released here. Otherwise (below the threshold, over
        the pool's size, no shared memory) it is an ordinary buffer, sent as any message. A
        loan that is never sent holds its part of the pool until it is released
        (``loan.release()``, or the end of its ``with`` block) or the channel closes: a
        ``loan()`` waiting for room that our own unsent loans hold waits for the timeout.
        """
        check_loan_size(size, self._max_message)
        self._check_open()  # closed, or broken by a protocol error: no loan to send
        if self._batcher == threading.get_ident():
            raise RuntimeError(
                "loan() inside the messages that send_many() is sending on the same channel: "
                "send_many() holds the sending side until it ends, so the loan would wait for "
                "itself; take the loans first (a list), then send_many() them"
            )
        shm = self._shm
        if shm is not None and size >= SHARED_THRESHOLD and not shm.ready:
            self._look_for_offer()
        if shm is None or size < SHARED_THRESHOLD or not shm.usable_for(size):
            return memoryview(bytearray(size))
        with self._wlock:
            self._check_open()
            shm.ensure_pool()
            offset = self._lend(size, "loan")
        self._write_lock_left()
        return shm.loan(offset, size)

    def _send_shared(self, data: Buffer, *, held: bool = False) -> int:
        """Send one message of a channel with shared memory, through the pool if it goes
        there (``held``: the caller holds the write lock, for a batch); return its size."""
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
            if size >= SHARED_THRESHOLD and not shm.ready:
                self._look_for_offer()
            if size < SHARED_THRESHOLD or not shm.usable_for(size):
                try:
                    if not held:
                        self._send_framed(data)
                    elif self._framing is None:  # a packet (see _send_packets)
                        self._send_packet(data, [])
                    else:  # a frame of a batch (see send_many)
                        self._write([*self._framing.encode(data)], [], size + HEADER.size)
                except FrameTooLarge as exc:
                    if self._wire is None or size < SHARED_THRESHOLD:
                        raise
                    raise not_pooled(exc, self._wire, size, shm) from exc
                return size
        else:
            size = len(data)
        with _HELD if held else self._wlock:
            self._check_open()
            self._flush_releases()
            shm.ensure_pool()
            if offset is None:
                offset = self._lend(size, held=held)
                try:
                    shm.write(offset, view)
                except BaseException:
                    shm.give_back(offset)  # not sent: ours again
                    raise
            else:
                shm.hand_over(data)  # type: ignore[arg-type]
            fd = shm.open_pool()
            try:
                if self._wire is not None:
                    self._slot_packet(fd, offset, size)
                    return size
                if fd >= 0:
                    # Alone in its sendmsg(): the descriptor must arrive with this record
                    # and no later one (see proto.framing on descriptors in a stream).
                    attach = encode_record(ATTACH, shm.pool_size)
                    try:
                        self._write([attach], rights([fd], 1), len(attach))
                    except BaseException:
                        if self._broken is None:
                            shm.attach_failed()
                        raise
                    shm.pool_sent()
                # A unit of its own: ATTACH is whole without it, so a SLOT that cannot go
                # leaves the stream whole (the peer has our pool, and no message).
                self._put(encode_record(SLOT, offset, size))
            except BaseException:
                if self._broken is None:
                    shm.give_back(offset)  # the slot never went out: ours again
                raise
        return size

    def _slot_packet(self, fd: int, offset: int, size: int) -> None:
        """Seqpacket: a SLOT in one records packet, after ATTACH with our pool's descriptor
        if ``fd`` >= 0 (the same packet: it arrives whole, or not at all)."""
        shm = self._shm
        assert shm is not None
        records = [(ATTACH, shm.pool_size, 0)] if fd >= 0 else []
        records.append((SLOT, offset, size))
        try:
            self._packet_out(
                encode_packet(records), rights([fd], 1) if fd >= 0 else [], records=True
            )
        except BaseException:
            if fd >= 0 and self._broken is None:
                shm.attach_failed()
            raise
        if fd >= 0:
            shm.pool_sent()

    def _lend(self, size: int, call: str = "send", *, held: bool = False) -> int:
        """A free extent of ``size`` bytes in our pool, waiting (within the timeout) while
        it is full: backpressure, never growth. Caller holds the write lock; it is let go
        while we wait (``_waiting_for_room``), unless ``held`` (a batch).

        Releases come in on the socket. If no other thread is reading it, we read it here
        (messages that arrive meanwhile wait, in order, for recv); if one is, it hands the
        releases over as it reads them."""
        shm = self._shm
        assert shm is not None
        deadline = None if self._timeout is None else monotonic() + self._timeout
        if shm.pool is not None and shm.pool.lent and shm.arrived_bytes <= ARRIVED_MAX:
            # Take in the releases already here first, so that the lowest free pages are
            # reused: pages already touched cost nothing, a fresh page a fault and zeroing
            # (measured: writing a never-touched 1 MiB runs at 1.5 GB/s, a reused one at
            # 10+). Without this a sender running ahead would walk the whole pool.
            self._take_in(wait=False)
        while True:
            if self._unusable:  # closed or broken by another thread while we waited
                self._check_open()
            offset = shm.lend(size)
            if offset is not None:
                return offset
            if not shm.ready:
                self._check_open()
                raise ConnectionClosed(f"{self._where()}: the shared-memory pool was closed")
            self._flush_releases()  # ours first: the peer may be waiting for them to send
            left = None if deadline is None else deadline - monotonic()
            if left is not None and left <= 0:
                raise shm.stayed_full(self._where(), self._timeout, call)
            look = POOL_WAIT if left is None else min(left, POOL_WAIT)
            with self._waiting_for_room(held):
                if self._rlock.locked() or shm.arrived_bytes > ARRIVED_MAX:
                    # Another thread reads; or we read ahead as much as we hold for recv():
                    # wait for the receiving side to take some (the peer's releases may be
                    # behind its messages, as on a socket whose two ends both write).
                    shm.wait_for_space(look)
                    continue
                if shm.lending and not self._readable(look):
                    continue  # a loan of ours given up here frees room with nothing to read
                try:
                    self._take_in(wait=True)
                except Timeout as exc:
                    raise shm.stayed_full(self._where(), self._timeout, call) from exc
            if shm.eof:
                raise ConnectionClosed(
                    f"{self._where()}: the peer closed the connection while our shared-"
                    "memory pool was full"
                )

    @contextlib.contextmanager
    def _waiting_for_room(self, held: bool) -> Iterator[None]:
        """While a sender waits for room in our pool, other threads may send: a loan that
        another thread holds frees its room only once it has been sent, and the receiver
        has released it; holding the write lock, we would wait for it for ever. Nothing of
        our message has gone yet. A batch (``held``) keeps the lock: no other thread's
        message may go between two of its messages."""
        if held:
            yield
            return
        self._wlock.release()
        try:
            yield
        finally:
            self._wlock.acquire()

    def _readable(self, seconds: float) -> bool:
        """Whether something is there to be read (or arrives within ``seconds``): bytes
        the framing holds undecoded, which recv() leaves after the message it took, count."""
        framing = self._framing
        if framing is not None and (framing.buffered or framing.at_eof):
            return True
        # A poll object of its own: several senders may wait for room at once, and the
        # reader polls ``_poller`` meanwhile (a poll object refuses a second caller).
        poller = select.poll()
        try:
            poller.register(self._sock, select.POLLIN)
        except ValueError:  # fileno() is -1: another thread's close() came first
            self._check_open()
            raise
        return bool(poller.poll(seconds * 1000))

    def _poll_object(self) -> select.poll:
        """The poll object that asks whether our socket is readable (made on first use)."""
        poller = self._poller
        if poller is None:
            poller = self._poller = select.poll()
            poller.register(self._sock.fileno(), select.POLLIN)
        return poller

    def _put(self, records: bytes, went: int = 0) -> int:
        """Send shared-memory records (a few dozen bytes) after ``went`` bytes of the same
        unit; caller holds the write lock. One send() when the socket takes them whole, as
        send() does for a small message; otherwise ``_write``'s rules."""
        try:
            sent = self._sock.send(records, _SEND_FLAGS)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._check_open()
            if went:
                self._break(f"a send failed after {went} bytes of its unit went out")
                raise copy.copy(self._broken) from exc  # type: ignore[misc]
            raise self._send_error(exc) from exc
        except BaseException:
            self._break("a send was interrupted")
            raise
        if sent != len(records):
            return self._write([records], [], len(records), went, sent=sent, full=True)
        return went + sent

    def _look_for_offer(self) -> None:
        """A client that opted in, about to send a large message, has not yet seen whether
        the listener opted in: take in what has arrived (the listener's OFFER comes first,
        written as it accepted us), without waiting for anything."""
        try:
            self._take_in(wait=False)
        except UdsError:
            pass  # the receiver will meet it again: this send goes through the socket

    def _take_in(self, *, wait: bool) -> None:
        """From the sending side: read what has arrived (``wait``: wait for something)
        unless another thread is reading, acting on records and queueing messages for
        recv. Skipped on a channel that cannot be read any more."""
        if not self._rlock.acquire(blocking=False):
            return  # a reader is at work: it passes on what it reads
        try:
            if not self._unusable and not self._shm.eof:  # type: ignore[union-attr]
                self._pump(wait=wait)
        except UdsError:
            raise
        except BaseException:
            self._read_interrupted()
            raise
        finally:
            self._rlock.release()

    def _flush_releases(self) -> None:
        """Send the RELEASE records we owe. Caller holds the write lock."""
        shm = self._shm
        if shm is None or not shm.owes() or self._unusable:
            return
        offsets = shm.take_pending()
        if self._wire is None:
            self._put(b"".join([encode_record(RELEASE, offset) for offset in offsets]))
            return
        for start, packet in release_packets(offsets):
            try:
                self._packet_out(packet, [], records=True)
            except UdsError:
                if self._broken is None:  # these did not go: owed still, in order
                    with shm.lock:
                        shm.pending.extendleft(reversed(offsets[start:]))
                raise

    def _release_soon(self) -> None:
        """A received view was released (any thread): send the release now if no send is
        under way; otherwise that send does as it ends (``_write_lock_left``)."""
        shm = self._shm
        while shm is not None and self._wlock.acquire(blocking=False):
            try:
                self._flush_releases()
            except (UdsError, OSError) as exc:
                log.debug("%r: release not sent: %s", self, exc)
                return
            finally:
                self._wlock.release()
            if not shm.owes() or self._unusable:
                return  # else views released meanwhile found the lock taken: theirs too

    def _write_lock_left(self) -> None:
        """A send left the write lock: releases owed while it held it (a view released in
        another thread, or by a garbage collection in this one) could not go then, and go
        now, not with some later call that may never come."""
        if self._shm is not None and self._shm.owes():
            self._release_soon()

    def _offer(self) -> None:
        """A listener that opted in answers a client that did (see proto.shm): OFFER."""
        with self._wlock:
            if self._wire is not None:
                self._packet_out(None, [])  # the hello (see proto.shm.PacketWire)
            else:
                self._put(encode_record(OFFER, VERSION))

    def _recv_shared(self, *, view: bool) -> bytes | memoryview:
        shm = self._shm
        assert shm is not None
        with self._rlock:
            try:
                item, fds = self._next_arrival()
            except UdsError:
                raise
            except BaseException:
                self._read_interrupted()
                raise
        if fds:
            log.debug("%r: closing %d descriptors received by recv()", self, len(fds))
            close_fds(fds)
        if isinstance(item, Lease):
            return shm.view(item) if view else shm.copy_out(item)
        return memoryview(item) if view else item

    def _next_arrival(self) -> tuple[bytes | Lease, list[int]]:
        """The next message (bytes, or a Lease in the peer's pool) and its descriptors.
        Caller holds the read lock."""
        shm = self._shm
        assert shm is not None
        if self._unusable:
            if self._unreadable is not None and not self._closed:
                raise copy.copy(self._unreadable)
            self._check_open()
        if shm.owes():
            self._release_soon()
        framing = self._framing
        if not shm.arrived and framing is not None:
            # A stream with nothing read ahead: straight from the framing, not queued.
            while not shm.eof:
                message = framing.next_message()
                while message is NEED_DATA:
                    message = self._feed(framing)
                if type(message) is bytes:
                    return message, framing.take_fds() if self._fds_seen else []
                item = self._arrival(message)  # type: ignore[arg-type]
                if item is not None:
                    return item
        while not shm.arrived:
            if shm.eof:
                raise ConnectionClosed(f"{self._where()}: the peer closed the connection")
            self._pump()
        item = shm.arrived.popleft()
        if type(item[0]) is bytes:
            shm.arrived_bytes -= len(item[0]) + ARRIVAL_COST
        elif type(item[0]) is Lost:
            shm.arrived_bytes -= ARRIVAL_COST
            raise item[0].error
        return item

    def _pump(self, *, wait: bool = True) -> None:
        """Read until something complete arrives, and take in everything complete: records
        are acted on, messages queued for recv. Caller holds the read lock. ``wait=False``:
        read once, and only if something is there."""
        if self._wire is not None:
            self._pump_packet(wait=wait)
            return
        framing = self._framing
        shm = self._shm
        assert framing is not None
        assert shm is not None
        message = framing.next_message()
        if message is NEED_DATA and not wait:
            if not (self._poller or self._poll_object()).poll(0):
                return
            message = self._feed(framing)
            if message is NEED_DATA:
                return
        while message is NEED_DATA:
            message = self._feed(framing)
        self._queue(message)  # type: ignore[arg-type]
        self._take_buffered()

    def _take_buffered(self) -> None:
        """Queue for recv every complete frame the framing holds (acting on records),
        reading nothing. Caller holds the read lock."""
        framing = self._framing
        shm = self._shm
        assert framing is not None
        assert shm is not None
        while not shm.eof and (framing.buffered or framing.at_eof):
            message = framing.next_message()
            if message is NEED_DATA:
                return
            self._queue(message)  # type: ignore[arg-type]

    def _queue(self, message: bytes | Closed | Control) -> None:
        """Act on one decoded frame (see ``_arrival``), queueing what is for recv."""
        item = self._arrival(message)
        if item is not None:
            shm = self._shm
            assert shm is not None
            shm.arrived.append(item)
            if type(item[0]) is bytes:
                shm.arrived_bytes += len(item[0]) + ARRIVAL_COST

    def _arrival(self, message: bytes | Closed | Control) -> tuple[bytes | Lease, list[int]] | None:
        """One frame decoded on a stream with shared memory: a message and its descriptors,
        or the Lease of one in the peer's pool; None for a record acted on, or the end of
        the stream (``eof`` set)."""
        framing = self._framing
        shm = self._shm
        assert framing is not None
        assert shm is not None
        if type(message) is bytes:
            return message, framing.take_fds() if self._fds_seen else []
        if message is CLOSED:
            shm.eof = True
            return None
        lease = self._record(message.body, framing.take_fds())  # type: ignore[union-attr]
        return None if lease is None else (lease, [])

    def _pump_packet(self, *, wait: bool) -> None:
        """``_pump`` on seqpacket: read one packet (``wait=False``: only if one is there)
        and act on it: a record, the peer's hello, or a message queued for recv. Caller
        holds the read lock."""
        shm = self._shm
        wire = self._wire
        assert shm is not None
        assert wire is not None
        if not wait:
            # Take in what is there, a packet at a time (releases, mostly): a sender
            # looking before it lends reuses the lowest pages, as on a stream.
            poller = self._poller or self._poll_object()
            for _ in range(_PACKETS_PER_LOOK):
                if shm.eof or shm.arrived_bytes > ARRIVED_MAX or not poller.poll(0):
                    return
                self._pump_packet(wait=True)
            return
        if not self._rbuf:  # holds the largest message or records packet: made on use
            # max_frame is 16 MiB here: mapped, not allocated, so that only the pages the
            # largest packet so far filled are taken (a bytearray is zeroed, all of it).
            self._resize(packet_buffer_size(self._max_message), lazy=True)
        tagged, views = packet_views(wire, self._tag, self._rview)
        try:
            got, ancdata, flags, _ = self._read(views)  # type: ignore[arg-type]
        except ConnectionClosed as exc:
            if not isinstance(exc.__cause__, ConnectionResetError):
                raise
            # The peer closed with packets of ours unread (our hello, say), and the kernel
            # reports that once, before the packets it sent: read those, then the end.
            got, ancdata, flags, _ = self._read(views)  # type: ignore[arg-type]
        tag, size = split_packet(tagged, self._tag, got)
        fds: list[int] = []
        try:
            if ancdata or flags & _CTRUNC:
                fds = unpack(ancdata, flags, self._where(), self._max_fds).fds
            if flags & _TRUNC:
                close_fds(fds)
                raise truncated(self._where(), self._max_message)
        except ProtocolError as exc:
            if not is_message(tag):  # its loss would leave the pools out of step
                self._shared_failed(exc)
            wire.lost()
            shm.arrived.append((Lost(exc), []))  # a message lost: recv() says so, in order
            shm.arrived_bytes += ARRIVAL_COST
            return
        if tag is None and not size:
            close_fds(fds)
            shm.eof = True
            return
        try:
            item = take_packet(wire, tag, self._rview[:size], fds)
        except ProtocolError as exc:
            self._shared_failed(exc)
        if item is SWITCHED:
            shm.ready = True
        elif type(item) is list:
            for i, body in enumerate(item):
                lease = self._record(body, fds if i == 0 else [])
                if lease is not None:
                    shm.arrived.append((lease, []))
        else:
            shm.arrived.append((item, fds))  # type: ignore[arg-type]
            shm.arrived_bytes += len(item) + ARRIVAL_COST  # type: ignore[arg-type]

    def _record(self, body: bytes, fds: list[int]) -> Lease | None:
        """Act on one shared-memory record: the Lease of a message in the peer's pool (a
        SLOT), else None; a bad record closes the channel (ProtocolError)."""
        shm = self._shm
        assert shm is not None
        try:
            return shm.on_record(body, fds)
        except ProtocolError as exc:
            self._shared_failed(exc)

    def _shared_failed(self, exc: ProtocolError) -> NoReturn:
        """A bad record or pool: the channel is closed for use (every later call raises),
        everything shared is released, and the peer sees the connection end."""
        error = (FrameTooLarge if isinstance(exc, FrameTooLarge) else ProtocolError)(
            f"{self._where()}: {exc}; the channel cannot be used any more: close it"
        )
        self._unreadable = error
        self._broken = ConnectionClosed(f"{self._where()}: closed after a protocol error: {exc}")
        self._unusable = True
        if self._shm is not None:
            # Messages a sender read ahead of recv() go with the pools, their descriptors
            # too (the caller holds the read lock; close() finds the queue empty).
            self._shm.close()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        raise error from exc

    # -- tuning ---------------------------------------------------------------------------
    @property
    def spin(self) -> int:
        """Microseconds recv() polls without sleeping before it blocks (0: off).

        A blocked thread is woken by the scheduler, which costs tens of microseconds when
        the peer runs on another CPU that has gone idle. Polling for a bounded time answers
        faster, at the price of that much CPU per wait. Bounded by MAX_SPIN_US.
        """
        return self._spin_ns // 1000

    @spin.setter
    def spin(self, microseconds: int) -> None:
        if (
            isinstance(microseconds, bool)
            or not isinstance(microseconds, int)
            or not 0 <= microseconds <= MAX_SPIN_US
        ):
            raise ValueError(f"spin must be 0 to {MAX_SPIN_US} microseconds, not {microseconds!r}")
        if microseconds and self._timeout is not None:
            raise ValueError("spin needs a channel without a timeout (settimeout(None))")
        if microseconds:
            self._poll_object()
        self._spin_ns = microseconds * 1000

    # -- closing --------------------------------------------------------------------------
    def shutdown_write(self) -> None:
        """Half-close: tell the peer we will send no more (it sees end of stream).

        A send under way in another thread ends first, its message whole (this waits for
        it, as another send would); sends that come after raise ``ConnectionClosed``."""
        self._check_open()
        # Under the write lock: a shutdown in the middle of another thread's frame would
        # cut that message off, and break the channel for a send that was not at fault.
        with self._wlock:
            try:
                self._sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                self._check_open()  # closed by another thread meanwhile: EBADF says nothing
                raise translate(exc, "send", self._remote) from exc
            self._write_shut = True

    def close(self) -> None:
        """Close the socket, any unclaimed received descriptors, and our bound reply path.

        Threads blocked in ``send``/``recv`` on this channel are woken; they raise
        ``ConnectionClosed``. The socket is closed once they have left (CLOSE_WAIT at most).
        """
        if not self._closing.acquire(blocking=False):
            return  # closed, or being closed by another thread: once is all it takes
        self._closed = self._unusable = True
        if os.getpid() != self._owner_pid:
            # A forked child's copy: the parent's threads are not in this process, but their
            # holds of the locks were copied. Taken for ours, they would make this close()
            # shut the socket down for the parent too, and wait for threads that never leave.
            self._rlock, self._wlock = threading.Lock(), threading.Lock()
        if self._owns_socket:
            # close() alone wakes nobody blocked on the socket. Only where a thread of ours
            # is blocked: shutdown() reaches every process that shares the socket (a fork).
            # A writer waiting in poll() for room wakes only at SHUT_RDWR (POLLHUP): SHUT_WR
            # leaves the socket as unwritable as it was (Linux, every socket type).
            if self._wlock.locked():
                how: int | None = socket.SHUT_RDWR
            else:
                how = socket.SHUT_RD if self._rlock.locked() else None
            if how is not None:
                try:
                    self._sock.shutdown(how)
                except OSError:
                    pass
        # What the framing holds belongs to the reader, and the socket's number to every
        # thread inside a call: wait (briefly: they were just woken) for a reader and a
        # writer still in recv()/send() to leave, before closing the descriptors the
        # framing holds and the socket. The next open() in any thread may get its number,
        # and a thread that had taken it (to poll it, or between the socket module's read
        # of it and the system call) would then wait on, or write to, that file.
        deadline = monotonic() + CLOSE_WAIT
        reader_gone = self._rlock.acquire(timeout=CLOSE_WAIT)
        writer_gone = self._owns_socket and self._wlock.acquire(
            timeout=max(0.0, deadline - monotonic())
        )
        try:
            if reader_gone:
                _close_held(self._framing, self._inbox)
                if self._held is not None:
                    self._held.detach()
            if self._shm is not None:
                self._shm.close()  # with the descriptors of messages not yet received
            if self._claim is not None:
                self._claim.release()  # first: the open socket keeps its file's inode (Claim)
            if self._owns_socket:
                self._sock.close()
        finally:
            if writer_gone:
                self._wlock.release()
            if reader_gone:
                self._rlock.release()
        if self._cleanup_dir is not None:
            try:
                os.rmdir(self._cleanup_dir)
            except OSError:
                pass

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        # multiprocessing's pickler knows how to send a socket to another process (it
        # duplicates the descriptor); plain pickle refuses, as it should.
        if self._unusable:
            self._check_open()
            if self._unreadable is not None:
                raise copy.copy(self._unreadable)
        if self._framing is not None and self._framing.buffered:
            raise ProtocolError("cannot hand over a channel that holds received, unread data")
        if self._shm is not None:
            raise ProtocolError(
                "cannot hand over a channel with shared_memory: its pools belong to this "
                "process; make the channels before os.fork() (multiprocessing's 'fork' start "
                "method), or open the channel in the process that uses it (listen/connect there)"
            )
        framing = "length" if self._framing is None else self._framing.name
        return (
            _rebuild,
            (self._sock, framing, self._max_message, self._max_fds, self._peer, self._timeout),
        )

    # -- helpers --------------------------------------------------------------------------
    def _send_error(self, exc: OSError) -> Exception:
        """What a send raises for ``exc`` from its first system call (nothing went out):
        ``close()`` or ``shutdown_write()`` in another thread (while this send waited for
        the write lock) say so; the kernel's EBADF or EPIPE would not, or blame the peer."""
        self._check_open()
        if self._write_shut:
            return write_shut(self._where())
        return translate(exc, "send", self._remote)

    def _check_open(self) -> None:
        if self._closed:
            raise ConnectionClosed(f"{self._where()}: this channel is closed")
        if self._broken is not None:
            raise copy.copy(self._broken)

    def _is_unix(self) -> bool:
        return self._sock.family == socket.AF_UNIX

    def _where(self) -> str:
        return self._remote.shown() if self._remote is not None else f"{self._type} channel"

    def _adopt_reply_dir(self, directory: bytes) -> None:
        """Remove ``directory`` (a private dir holding our reply path) on close."""
        self._cleanup_dir = directory


def _close_held(framing: Framing | None, inbox: _Inbox) -> None:
    """Close the descriptors that came with messages never received."""
    if framing is not None:
        close_fds(framing.held_fds())
    for _, fds in inbox:
        close_fds(fds)
    inbox.clear()


def write_shut(where: str) -> ConnectionClosed:
    """What a send says after our own ``shutdown_write()``: the kernel's EPIPE would blame
    the peer."""
    return ConnectionClosed(
        f"{where}: cannot send: this channel's sending side was shut down (shutdown_write()); "
        "nothing more can be sent on it"
    )


def advance(views: list[memoryview], sent: int) -> list[memoryview]:
    """What is left of ``views`` after the kernel took ``sent`` bytes of them."""
    i = 0
    while i < len(views) and sent >= len(views[i]):
        sent -= len(views[i])
        i += 1
    rest = views[i:]
    if rest and sent:
        rest[0] = rest[0][sent:]
    return rest


def stream_read_lost(error: ProtocolError) -> ProtocolError:
    """What a stream channel raises, from then on, after ``unpack`` refused a read's control
    data. On a stream the read's bytes cannot be used without it: dropped, they leave a hole;
    fed, they would give a message descriptors that are not its own. So reading ends there.
    """
    return ProtocolError(
        f"{error}; the bytes that came with them are lost, so nothing more can be received "
        "on this channel: close it and connect again"
    )


def read_interrupted(where: str) -> ProtocolError:
    """What a stream channel raises, from then on, after an exception that was not its own
    cut a read short (both layers)."""
    return ProtocolError(
        f"{where}: a receive was interrupted, and the bytes it had read may be lost, so "
        "nothing more can be received on this channel: close it"
    )


def truncated(where: str, limit: int) -> ProtocolError:
    """A packet larger than the receive buffer (``limit``, from max_frame) arrived cut
    off: what a packet channel reports in its place (both layers)."""
    return ProtocolError(
        f"message from {where} was larger than max_frame ({limit} bytes) and arrived "
        "truncated; raise max_frame on this side"
    )


def broken(where: str, why: str) -> ConnectionClosed:
    """The error every call raises on a stream channel that has part of a frame on the wire
    (both layers)."""
    return ConnectionClosed(
        f"{where}: this channel is broken ({why}, so the peer cannot tell where the next "
        "message starts); close it and open a new one",
        mid_message=True,
    )


def _rebuild(
    sock: socket.socket,
    framing: str,
    max_frame: int,
    max_fds: int,
    peer: PeerCred | None,
    timeout: float | None = None,
) -> Channel:
    channel = Channel(sock, framing=framing, max_frame=max_frame, max_fds=max_fds, peer=peer)
    channel.settimeout(timeout)
    return channel
