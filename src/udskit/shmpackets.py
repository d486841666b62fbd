"""Shared memory on seqpacket: the socket side of :class:`udskit.proto.shm.PacketWire`.

One packet out (our hello first if one is owed, a tag in front once we switched) and one
packet in (read with the tag apart from the body, so that neither is copied to be split);
both layers call these, around their own waiting.
"""

from __future__ import annotations

import socket
from typing import Final

from .proto.shm import (
    RECORD_PACKET_MAX,
    RECORDS_PER_PACKET,
    TAG_MESSAGE,
    TAG_RECORDS,
    PacketWire,
    encode_packet,
    is_marker,
)

__all__ = [
    "make_wire",
    "packet_buffer_size",
    "packet_views",
    "record_packets",
    "send_packet",
    "split_packet",
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


def record_packets(records: list[tuple[int, int, int]]) -> list[bytes]:
    """``records`` as the bodies of records packets, RECORDS_PER_PACKET to a packet."""
    return [
        encode_packet(records[i : i + RECORDS_PER_PACKET])
        for i in range(0, len(records), RECORDS_PER_PACKET)
    ]


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
