"""The shared-memory path's protocol, sans-IO: opt-in, records, pool accounting, validation.

A stream or seqpacket channel with ``shared_memory=`` moves large messages through a memfd
*pool* that each sender owns and its peer maps read-only; the socket carries small *records*
between ordinary messages. A record's body is fixed, 17 bytes: a kind and two 64-bit
numbers. On a stream a record is a frame whose 4-byte header has the top bit set
(``CONTROL_BIT``); on seqpacket, which has no header, see ``PacketWire``.

=========  ========================  ==============================================
kind       numbers                   meaning
=========  ========================  ==============================================
OFFER      version, 0                the listener opted in too (first thing it sends)
ATTACH     pool size, 0              my pool: the memfd comes with it (SCM_RIGHTS)
SLOT       offset, length            a message: ``length`` bytes at ``offset`` of my pool
RELEASE    offset, 0                 I am done with your slot at ``offset``
=========  ========================  ==============================================

A channel that did not opt in never decodes records: to its framing a header with the top
bit set announces a frame over max_frame, a ProtocolError, so a pool message reaches no one
who did not ask for it. Who opted in is learnt without a byte (see ``MARKER_PREFIX``).

Ownership: a slot belongs to the receiver from SLOT until it sends RELEASE; the sender
writes only into free space (``Pool``), so a message is never changed under a receiver by a
udskit sender. The receiver checks every SLOT against the mapping, max_frame and the slots
it holds (``Ledger``); the sender checks every RELEASE against the slots it lent.
"""

from __future__ import annotations

import struct
from bisect import bisect_left
from typing import Final, NamedTuple

from ..errors import FrameTooLarge, ProtocolError

__all__ = [
    "ATTACH",
    "CONTROL_BIT",
    "DEFAULT_POOL",
    "HELLO",
    "MARKER_PREFIX",
    "MAX_POOL",
    "OFFER",
    "PAGE",
    "RECORDS_PER_PACKET",
    "RECORD_PACKET_MAX",
    "RECORD_SIZE",
    "RELEASE",
    "SHARED_THRESHOLD",
    "SLOT",
    "SWITCHED",
    "TAG_MESSAGE",
    "TAG_RECORDS",
    "VERSION",
    "Ledger",
    "PacketWire",
    "Pool",
    "Record",
    "check_pool_size",
    "check_record",
    "decode_record",
    "encode_packet",
    "encode_record",
    "hello_packet",
    "is_marker",
]

#: Set in a length header: the frame is a record, not a message. Channels that opt in keep
#: max_frame below it (a message header never has it set), so the two never collide.
CONTROL_BIT: Final = 0x8000_0000

_BODY: Final = struct.Struct(">BQQ")
#: Bytes of a record's body.
RECORD_SIZE: Final = _BODY.size
_HEADER: Final = struct.Struct(">I")

OFFER: Final = 1
ATTACH: Final = 2
SLOT: Final = 3
RELEASE: Final = 4
_KINDS: Final = {OFFER: "OFFER", ATTACH: "ATTACH", SLOT: "SLOT", RELEASE: "RELEASE"}

#: Protocol version carried by OFFER; a listener offers the version it speaks.
VERSION: Final = 1

#: The opt-in signal, out of band. A client that opts in binds its socket, before it
#: connects, to an abstract name starting with this; a listener that opted in sees it in
#: accept()'s peer address and answers with OFFER as the first record on the connection.
#: So nothing goes on the wire unasked: a client that did not opt in (or any program that is
#: not udskit) never gets an OFFER, and a listener that did not opt in (or any server that is
#: not udskit) just sees a client with a name, as with ``bind=``, and never a record.
MARKER_PREFIX: Final = b"\0udskit-shm/"

#: Granularity of slots in a pool: each message starts on a page, so that a receiver's view
#: is aligned for any dtype (numpy.frombuffer) and two messages never share a page.
PAGE: Final = 4096

#: A message at least this large goes through shared memory; smaller ones through the
#: socket as before. Measured with benchmarks/shm_threshold.py (docs/shared-memory.md):
#: below 128 KiB the socket wins by up to 3x (a record each way, a view and the slot's
#: bookkeeping cost more than the copies saved); at 128 KiB it is about even; from 256 KiB
#: reading in place is ahead in every run (1.5-1.9x) and copy-out about even (0.9-1.35x),
#: and from 512 KiB both are ahead.
SHARED_THRESHOLD: Final = 256 * 1024

#: Pool size with ``shared_memory=True``: four messages of the default max_frame (16 MiB)
#: in flight. A memfd costs nothing until its pages are written, and a pool never grows:
#: the sender waits for releases when it is full (backpressure), so this bounds the memory
#: one direction of a connection can hold.
DEFAULT_POOL: Final = 64 * 1024 * 1024

#: Largest pool either side accepts: a peer's pool is only address space to the receiver,
#: but a bound keeps a hostile size from exhausting it; 4 GiB also keeps offsets and
#: lengths far inside the 64-bit fields.
MAX_POOL: Final = 4 * 1024 * 1024 * 1024


class Record(NamedTuple):
    """One decoded record: ``kind`` and its two numbers (see the module table). A tuple:
    one is made for every record received, and a tuple is the cheapest to make."""

    kind: int
    first: int
    second: int

    def __repr__(self) -> str:
        return f"Record({_KINDS.get(self.kind, self.kind)}, {self.first}, {self.second})"


def encode_record(kind: int, first: int, second: int = 0) -> bytes:
    """A record as it goes on the stream: its header (top bit set) and body."""
    return _HEADER.pack(CONTROL_BIT | RECORD_SIZE) + _BODY.pack(kind, first, second)


def encode_packet(records: list[tuple[int, int, int]]) -> bytes:
    """The body of a seqpacket records packet (what follows TAG_RECORDS): the records'
    bodies, back to back; at most RECORDS_PER_PACKET of them."""
    assert 0 < len(records) <= RECORDS_PER_PACKET
    return b"".join([_BODY.pack(kind, first, second) for kind, first, second in records])


def decode_record(body: bytes) -> Record:
    """A record's body (without its header), checked: ProtocolError if it is not one."""
    if len(body) != RECORD_SIZE:
        size = f"{len(body)} bytes" if body else "0 bytes, or over the limit"
        raise ProtocolError(
            f"shared-memory record of {size} (expected {RECORD_SIZE}): the peer does not speak "
            "this protocol"
        )
    record = Record._make(_BODY.unpack(body))
    if record.kind not in _KINDS:
        raise ProtocolError(f"unknown shared-memory record kind {record.kind}")
    return record


def check_record(record: Record, fds: int, *, peer_opted: bool) -> None:
    """Whether ``record``, arriving with ``fds`` descriptors, may come now: ATTACH carries
    exactly one descriptor and the rest none; OFFER comes only to a client still waiting
    to learn whether the listener opted in, and in our version; nothing else before it."""
    if record.kind == ATTACH:
        if fds != 1:
            raise ProtocolError(f"peer's shared-memory pool came with {fds} descriptors, not 1")
    elif fds:
        raise ProtocolError(f"shared-memory record {record} came with descriptors")
    if record.kind == OFFER:
        if peer_opted:
            raise ProtocolError("unexpected shared-memory offer: only a listener offers, once")
        if record.first != VERSION:
            raise ProtocolError(
                f"listener offers shared-memory protocol version {record.first}; this udskit "
                f"speaks {VERSION}: use the same udskit version on both sides"
            )
    elif not peer_opted:
        raise ProtocolError(f"shared-memory record {record} before the listener's offer")


def is_marker(address: object) -> bool:
    """Whether an accepted client's peer address says it opted in (see MARKER_PREFIX)."""
    return isinstance(address, bytes) and address.startswith(MARKER_PREFIX)


def check_pool_size(shared_memory: object) -> int:
    """The pool size ``shared_memory=`` asks for: 0 (off) for False, DEFAULT_POOL for True,
    or a byte count, rounded up to a page. ValueError names the keyword."""
    if shared_memory is False or shared_memory is None:
        return 0
    if shared_memory is True:
        return DEFAULT_POOL
    if (
        isinstance(shared_memory, int)
        and not isinstance(shared_memory, bool)
        and SHARED_THRESHOLD <= shared_memory <= MAX_POOL
    ):
        return -(-shared_memory // PAGE) * PAGE
    raise ValueError(
        "shared_memory must be True, False, or a pool size in bytes from "
        f"{SHARED_THRESHOLD} to {MAX_POOL}, not {shared_memory!r}"
    )


def _pages(length: int) -> int:
    return -(-length // PAGE) * PAGE


class Pool:
    """The sender's accounting of its own pool: which extents are free, which are lent.

    First fit over page-rounded extents: the same low pages are reused message after
    message, so they stay faulted in (fresh pages cost a fault each, which dominates a
    fresh-memfd-per-message scheme).
    """

    __slots__ = ("_free", "lent", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self._free: list[tuple[int, int]] = [(0, size)]  # sorted (offset, length)
        self.lent: dict[int, int] = {}  # offset -> rounded length, until released

    def fits(self, length: int) -> bool:
        """Whether a message of ``length`` bytes can ever be in this pool."""
        return length > 0 and _pages(length) <= self.size

    def allocate(self, length: int) -> int | None:
        """The offset of a free extent for ``length`` bytes, now lent; None if the pool
        is too full for it at the moment."""
        need = _pages(length)
        for i, (offset, free) in enumerate(self._free):
            if free >= need:
                if free == need:
                    del self._free[i]
                else:
                    self._free[i] = (offset + need, free - need)
                self.lent[offset] = need
                return offset
        return None

    def release(self, offset: int) -> None:
        """The receiver is done with the extent at ``offset``: free it. A RELEASE for an
        extent not lent is a ProtocolError (a confused or hostile peer)."""
        need = self.lent.pop(offset, None)
        if need is None:
            raise ProtocolError(
                f"peer released offset {offset} of our shared-memory pool, which is not lent"
            )
        free = self._free
        lo = bisect_left(free, (offset,))  # the first free extent after it
        free.insert(lo, (offset, need))
        # Merge with the neighbours, so a large message finds room again.
        if lo + 1 < len(free) and offset + need == free[lo + 1][0]:
            free[lo] = (offset, need + free[lo + 1][1])
            del free[lo + 1]
        if lo > 0 and free[lo - 1][0] + free[lo - 1][1] == offset:
            free[lo - 1] = (free[lo - 1][0], free[lo - 1][1] + free[lo][1])
            del free[lo]

    @property
    def in_use(self) -> int:
        """Bytes lent out (page-rounded)."""
        return sum(self.lent.values())


class Ledger:
    """The receiver's check of the slots a peer announces in its pool.

    Every SLOT must lie inside the mapped pool, carry 1 to ``max_frame`` bytes, start on a
    page, and overlap no slot we still hold (the sender would be writing into a message we
    have not released). Anything else is a ProtocolError: the channel closes. The held
    slots are kept sorted by offset, so that a check looks at two neighbours, not at all
    of them (a sender running ahead leaves thousands held).
    """

    __slots__ = ("_starts", "held", "max_frame", "size")

    def __init__(self, size: int, max_frame: int) -> None:
        self.size = size
        self.max_frame = max_frame
        self.held: dict[int, int] = {}  # offset -> length
        self._starts: list[int] = []  # the offsets in ``held``, sorted

    def accept(self, offset: int, length: int) -> None:
        """Check a SLOT and hold it until ``release``."""
        if length > self.max_frame:
            raise FrameTooLarge(
                f"peer announced a shared-memory message of {length} bytes, over max_frame "
                f"({self.max_frame} bytes): give this end the peer's max_frame"
            )
        if length <= 0:
            raise ProtocolError(f"peer announced a shared-memory message of {length} bytes")
        if offset % PAGE or offset + length > self.size:
            raise ProtocolError(
                f"peer announced a shared-memory slot at offset {offset} with {length} bytes, "
                f"outside its pool of {self.size} bytes"
            )
        starts = self._starts
        index = bisect_left(starts, offset)
        # Held slots do not overlap each other, so only the neighbours can overlap this one.
        clash = None
        if index < len(starts) and starts[index] < offset + _pages(length):
            clash = starts[index]
        elif index and starts[index - 1] + _pages(self.held[starts[index - 1]]) > offset:
            clash = starts[index - 1]
        if clash is not None:
            raise ProtocolError(
                f"peer announced a shared-memory slot at offset {offset} that overlaps "
                f"one we have not released (offset {clash})"
            )
        starts.insert(index, offset)
        self.held[offset] = length

    def release(self, offset: int) -> None:
        """We are done with the slot at ``offset``."""
        del self.held[offset]
        starts = self._starts
        del starts[bisect_left(starts, offset)]


# -- seqpacket --------------------------------------------------------------------------------
#: First byte of every packet, on a seqpacket connection with shared memory, once its sender
#: has switched (see PacketWire): the rest is one message ...
TAG_MESSAGE: Final = 0
#: ... or 1 to RECORDS_PER_PACKET record bodies.
TAG_RECORDS: Final = 1

#: Records per seqpacket packet: RELEASEs owed pile up while a sender is busy, and one
#: packet must fit any receiver's buffer and the kernel's packet limit (the socket's send
#: buffer), whatever max_frame is: 64 records are 1,089 bytes.
RECORDS_PER_PACKET: Final = 64
#: Largest records packet after its tag; a receiver's packet buffer holds at least this.
RECORD_PACKET_MAX: Final = RECORDS_PER_PACKET * RECORD_SIZE

#: The switch packet's prefix. Its first byte is no tag, so a switch packet arriving on a
#: tagged direction is a ProtocolError, never a message.
HELLO: Final = b"\xffudskit-shm-hello/"

#: What ``PacketWire.incoming`` returns for the peer's switch packet.
SWITCHED: Final = object()


def hello_packet(marker: bytes, version: int = VERSION) -> bytes:
    """The switch packet of the connection whose client bound ``marker``: HELLO, the
    marker's random part, the protocol version. Only a peer that knows this connection's
    marker (the listener that accepted it, the client that bound it) can send it."""
    return HELLO + marker[len(MARKER_PREFIX) :] + bytes([version])


class PacketWire:
    """The wire of one seqpacket connection with shared memory, per direction: plain
    packets (exactly what a channel without the option sends) until its sender switches,
    tagged packets after. Seqpacket has no header that could mark a record, so a record can
    only be told from a message by a byte in front of each packet; a peer that did not opt
    in must never see that byte, so each side switches only when it knows the other opted
    in, and says so with one packet, the *hello* (``hello_packet``):

    * ``pair()``: both ends opted in; tagged from the first packet, no hello.
    * A listener that sees the client's marker sends the hello first of all (it is the
      OFFER), then tagged packets; it reads the client's packets as plain until the client's
      hello, tagged after.
    * A client reads the first packet that arrives: the listener's hello (the listener
      opted in: the client's next packet is its own hello, then tagged ones), or anything
      else (it did not: plain packets both ways, for good).

    The one packet that could be misread is a client's plain message equal to the hello,
    sent before the client read the listener's first packet: ``check_plain`` refuses to
    send it (it holds the connection's 64 random marker bits: no message is that by
    chance).
    """

    __slots__ = ("decided", "hello", "switch_pending", "tag_in", "tag_out")

    def __init__(self, role: str, marker: bytes = b"") -> None:
        """``role``: "pair", "listener" or "client"; ``marker``: the client's bound name
        (listener and client)."""
        if role not in ("pair", "listener", "client"):
            raise ValueError(f"unknown role {role!r}")
        self.hello = b"" if role == "pair" else hello_packet(marker)
        #: our packets carry a tag (after our hello, if one is owed)
        self.tag_out = role == "pair"
        #: our hello goes out before our next packet
        self.switch_pending = role == "listener"
        #: the peer's packets carry a tag
        self.tag_in = role == "pair"
        #: a client knows whether the listener opted in (its first packet said so)
        self.decided = role != "client"

    def switched(self) -> None:
        """Our hello went out: every later packet of ours carries a tag."""
        self.switch_pending = False
        self.tag_out = True

    def check_plain(self, data: bytes | bytearray | memoryview) -> None:
        """Before a plain (untagged) packet goes out: ProtocolError for the one message a
        listener that opted in would take for our hello: while we have not read its first
        packet, and once we have read its hello until ours has gone (another thread may be
        sending while the reader switches). Whatever its last byte (the version): the
        listener refuses a hello of another version, and would close the connection. Sizes
        are compared in bytes: ``len()`` of a multi-dimensional buffer counts rows."""
        if (
            (not self.decided or self.switch_pending)
            and memoryview(data).nbytes == len(self.hello)
            and bytes(data)[:-1] == self.hello[:-1]
        ):
            raise ProtocolError(
                "cannot send this message yet: it is this connection's shared-memory hello, "
                "which the listener would take for it; receive first (nothing was sent)"
            )

    def incoming(self, tag: int | None, body: memoryview) -> bytes | list[bytes] | object:
        """One packet from the peer: ``tag`` (None on a plain direction) and the rest.
        Returns the message (bytes), the record bodies (a list), or SWITCHED for the peer's
        hello; ProtocolError for anything a udskit peer does not send."""
        if tag is None:
            if len(body) == len(self.hello) and bytes(body[: len(HELLO)]) == HELLO:
                return self._switch_in(bytes(body))
            if not self.decided:
                self.decided = True  # the listener's first packet is a message: no option
            return body.tobytes()
        if tag == TAG_MESSAGE:
            if not body:
                raise ProtocolError("peer sent an empty tagged message (udskit never does)")
            return body.tobytes()
        if tag == TAG_RECORDS:
            size = len(body)
            if not size or size % RECORD_SIZE or size > RECORD_PACKET_MAX:
                raise ProtocolError(
                    f"shared-memory records packet of {size} bytes: the peer does not speak "
                    "this protocol"
                )
            return [body[i : i + RECORD_SIZE].tobytes() for i in range(0, size, RECORD_SIZE)]
        raise ProtocolError(f"packet with unknown shared-memory tag {tag}")

    def _switch_in(self, packet: bytes) -> bytes | object:
        """A plain packet shaped like a hello: the peer's switch if it is this connection's
        (a client that has not decided yet, or a listener); else a message."""
        if self.decided and self.tag_out and not self.switch_pending and not self.tag_in:
            expected = self.hello  # a listener, waiting for the client's switch
        elif not self.decided:
            expected = self.hello  # a client: the listener's offer
        else:
            return packet  # a plain connection (or a pair): only a message
        if packet[:-1] != expected[:-1]:
            self.decided = True
            return packet
        if packet[-1] != VERSION:
            raise ProtocolError(
                f"peer speaks shared-memory protocol version {packet[-1]}; this udskit "
                f"speaks {VERSION}: use the same udskit version on both sides"
            )
        if not self.decided:
            # switch_pending first: a sender that sees ``decided`` also sees it (check_plain)
            self.switch_pending = True  # ours goes before our next packet
            self.decided = True
        self.tag_in = True
        return SWITCHED

    def lost(self) -> None:
        """A packet from the peer was lost (truncated, or its descriptors refused). On a
        plain direction it was no hello (a hello is small and carries none), so a client
        waiting for the listener's first packet has it: the listener did not opt in, and
        nothing switches any more."""
        if not self.tag_in:
            self.decided = True
