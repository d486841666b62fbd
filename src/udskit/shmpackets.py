"""Shared memory on seqpacket: the socket side of :class:`udskit.proto.shm.PacketWire`.

One packet out (our hello first if one is owed, a tag in front once we switched) and one
packet in (read with the tag apart from the body, so that neither is copied to be split);
both layers call these, around their own waiting.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Final

from .ancillary import close_fds
from .errors import FrameTooLarge, ProtocolError
from .proto.shm import (
    RECORD_PACKET_MAX,
    RECORDS_PER_PACKET,
    RELEASE,
    SWITCHED,
    TAG_MESSAGE,
    TAG_RECORDS,
    PacketWire,
    encode_packet,
    is_marker,
)
from .shm import Lease, SharedMemory

__all__ = [
    "make_wire",
    "not_pooled",
    "packet_buffer_size",
    "packet_views",
    "release_packets",
    "send_packet",
    "Lost",
    "is_message",
    "split_packet",
    "take_packet",
]

#: No SIGPIPE on a closed peer (as the channels send).
_SEND_FLAGS: Final = int(socket.MSG_NOSIGNAL)
_TAGS: Final = (bytes([TAG_MESSAGE]), bytes([TAG_RECORDS]))

Buffer = bytes | bytearray | memoryview


def send_packet(
    sock: socket.socket,
    wire: PacketWire,
    data: Buffer | None,
    ancillary: list[tuple[int, int, bytes]],
    *,
    records: bool = False,
) -> None:
    """Send ``data`` as one packet (``records``: a records packet, from encode_packet;
    None: only our hello, if it is owed): after our hello if it is owed, tagged if we
    switched. Raises what the socket raises
    (BlockingIOError when it is full: nothing of ``data`` went, call again) and
    ProtocolError for the plain message ``check_plain`` refuses. Each packet goes whole or
    not at all, so a retry never repeats or splits one."""
    if wire.switch_pending:
        sock.send(wire.hello, _SEND_FLAGS)
        wire.switched()
    if data is None:
        return
    if wire.tag_out:
        sock.sendmsg([_TAGS[records], data], ancillary, _SEND_FLAGS)
        return
    assert not records, "records go out only once both ends switched"
    wire.check_plain(data)
    if ancillary:
        sock.sendmsg([data], ancillary, _SEND_FLAGS)
    else:
        sock.send(data, _SEND_FLAGS)


def release_packets(offsets: list[int]) -> Iterator[tuple[int, bytes]]:
    """RELEASEs of ``offsets`` as records packets, RECORDS_PER_PACKET to a packet: (index
    of the packet's first offset, the packet's body), so that a caller whose send fails
    knows which releases are still owed."""
    for start in range(0, len(offsets), RECORDS_PER_PACKET):
        chunk = offsets[start : start + RECORDS_PER_PACKET]
        yield start, encode_packet([(RELEASE, offset, 0) for offset in chunk])


def packet_buffer_size(max_frame: int) -> int:
    """The body buffer a receiver needs: a whole message, or a whole records packet."""
    return max(max_frame, RECORD_PACKET_MAX)


def packet_views(
    wire: PacketWire, tag: bytearray, body: memoryview
) -> tuple[bool, list[bytearray | memoryview]]:
    """What the next recvmsg_into() reads into, and whether the packet is tagged: a tagged
    read scatters the first byte into ``tag`` and the rest into ``body`` (no copy to split
    them); a plain one reads all into ``body``."""
    if wire.tag_in:
        return True, [tag, body]
    return False, [body]


def split_packet(tagged: bool, tag: bytearray, size: int) -> tuple[int | None, int]:
    """A packet of ``size`` bytes read into ``packet_views``: its tag (None: plain) and its
    body's size. Size 0 is the end of the connection either way."""
    if tagged and size:
        return tag[0], size - 1
    return None, size


def make_wire(sock: socket.socket, peer_opted: bool) -> PacketWire:
    """The PacketWire of a seqpacket channel with shared memory: a listener's (the client
    bound a marker), a pair's (both ends opted in at once), or a client's (its own marker)."""
    if peer_opted:
        name = sock.getpeername()
        if is_marker(name):
            return PacketWire("listener", name)
        return PacketWire("pair")
    name = sock.getsockname()
    if not is_marker(name):
        raise ValueError("a seqpacket client with shared_memory must be bound to a marker name")
    return PacketWire("client", name)


def not_pooled(
    error: FrameTooLarge, wire: PacketWire, size: int, shm: SharedMemory
) -> FrameTooLarge:
    """The socket refused a large message (``size`` bytes) that did not go through the
    channel's pool ``shm``: ``error``, and why the pool was not used (a seqpacket packet is
    held to the socket's size): too large for it (max_frame, the pool's size), or not in
    use."""
    ready, max_frame, pool = shm.ready, shm.max_frame, shm.pool_size
    if ready and size > max_frame:
        why = (
            f"the shared-memory pool takes no message over max_frame ({max_frame} bytes), so "
            f"this one of {size} went through the socket: raise max_frame on both ends"
        )
    elif ready:
        why = (
            f"our shared-memory pool holds {pool} bytes, so this message of {size} went "
            "through the socket: give shared_memory= a pool that holds it"
        )
    elif wire.decided:
        why = "the listener did not opt in to shared_memory, so it went through the socket"
    else:
        why = (
            "shared_memory is not in use yet: a seqpacket client must receive the "
            "listener's first packet (a greeting, a reply) before its large messages go "
            "through the pool"
        )
    return FrameTooLarge(f"{error}; {why}")


def is_message(tag: int | None) -> bool:
    """Whether a packet with ``tag`` is a message (plain, or tagged as one). A message lost
    (truncated, descriptors refused) costs that message, as on any seqpacket channel; any
    other packet lost would leave the pools out of step, so its loss closes the channel."""
    return tag is None or tag == TAG_MESSAGE


def take_packet(
    wire: PacketWire, tag: int | None, body: memoryview, fds: list[int]
) -> bytes | list[bytes] | object:
    """What one received packet is (see ``PacketWire.incoming``): a message, record
    bodies (the descriptors go with the first), or SWITCHED. ProtocolError for a packet no
    udskit peer sends, the descriptors closed."""
    try:
        item = wire.incoming(tag, body)
        if item is SWITCHED and fds:
            raise ProtocolError("peer's shared-memory hello came with descriptors")  # noqa: TRY301
    except ProtocolError:
        close_fds(fds)
        raise
    return item


class Lost(Lease):
    """In a blocking channel's queue of arrivals, where a message was lost (truncated, or
    its descriptors refused): ``recv`` raises ``error`` there, in order, whichever thread
    read the packet (a sender looking for releases, say). A Lease, so that the queue's
    type holds it; it holds no slot."""

    __slots__ = ("error",)

    def __init__(self, error: ProtocolError) -> None:
        super().__init__(0, 0)
        self.error = error
