"""``--pcap FILE``: what the tap relays, as a capture Wireshark and tshark open and dissect.

A Unix socket has no packets, addresses or ports, so the capture makes them up, the way a
dissector expects to find them: each stream or seqpacket connection becomes a TCP
connection (handshake, data segments with their true sequence numbers, FIN for each end of
stream) from ``10.0.0.2:<client port>`` to ``10.0.0.1:<port>``, each datagram a UDP
datagram. ``port`` (``--pcap-port``) picks the dissector: 80 for HTTP, 5432 for
PostgreSQL, and so on. The packets are built and written by dpkt (the ``tap`` extra).
Descriptors passed alongside the bytes have no place in a capture; the text output shows
them.
"""

from __future__ import annotations

import socket
from typing import IO, Any, Final

from .events import Closed, Data, Event, Opened

__all__ = ["DEFAULT_PORT", "PcapWriter"]

#: The server's port when none is given: HTTP's, the protocol most often spoken over a
#: Unix socket (gunicorn, uWSGI, Docker's API); Wireshark's heuristics handle the rest.
DEFAULT_PORT: Final = 80

#: Largest payload per segment: an IPv4 packet holds 65535 bytes with its headers, and
#: dissectors reassemble streams split across segments anyway.
_SEGMENT: Final = 65000

#: The made-up addresses: the server, and the clients.
_SERVER_IP: Final = socket.inet_aton("10.0.0.1")
_CLIENT_IP: Final = socket.inet_aton("10.0.0.2")

#: Client ports: one per connection, from the first ephemeral port, wrapping around.
_FIRST_PORT: Final = 32768
_PORTS: Final = 28000

#: The capture's snap length: whole packets are kept.
_SNAPLEN: Final = 65535


class _Stream:
    __slots__ = ("fin", "port", "seq")

    def __init__(self, port: int) -> None:
        self.port = port
        self.seq = {"up": 1000, "down": 5000}  # the next sequence number each way
        self.fin = {"up": False, "down": False}


class PcapWriter:
    """Writes events to ``file`` (a binary file object) as a pcap capture."""

    def __init__(
        self, file: IO[bytes], *, port: int = DEFAULT_PORT, datagrams: bool = False
    ) -> None:
        import dpkt  # type: ignore[import-untyped]  # the ``tap`` extra; dpkt has no types

        if not 0 < port < 65536:
            raise ValueError(f"pcap port must be 1..65535, not {port}")
        self._dpkt: Any = dpkt
        self._writer = dpkt.pcap.Writer(file, snaplen=_SNAPLEN, linktype=dpkt.pcap.DLT_EN10MB)
        self._file = file
        self._port = port
        self._datagrams = datagrams
        self._streams: dict[int, _Stream] = {}

    def __call__(self, event: Event) -> None:
        if isinstance(event, Opened):
            self._open(event)
        elif isinstance(event, Data):
            self._data(event)
        elif isinstance(event, Closed):
            self._closed(event)

    def close(self) -> None:
        self._file.flush()

    def _stream(self, conn: int) -> _Stream:
        stream = self._streams.get(conn)
        if stream is None:
            stream = _Stream(_FIRST_PORT + (conn - 1) % _PORTS)
            self._streams[conn] = stream
        return stream

    def _open(self, event: Opened) -> None:
        if self._datagrams:
            return
        stream = self._stream(event.conn)
        tcp = self._dpkt.tcp
        up, down = stream.seq["up"], stream.seq["down"]
        self._segment(event.time, stream, "up", tcp.TH_SYN, up - 1, 0, b"")
        self._segment(event.time, stream, "down", tcp.TH_SYN | tcp.TH_ACK, down - 1, up, b"")
        self._segment(event.time, stream, "up", tcp.TH_ACK, up, down, b"")

    def _data(self, event: Data) -> None:
        if self._datagrams:
            self._udp(event)
            return
        stream = self._stream(event.conn)
        tcp = self._dpkt.tcp
        other = "down" if event.direction == "up" else "up"
        view = memoryview(event.data)
        for offset in range(0, len(view), _SEGMENT):
            chunk = bytes(view[offset : offset + _SEGMENT])
            seq = stream.seq[event.direction]
            self._segment(
                event.time,
                stream,
                event.direction,
                tcp.TH_PUSH | tcp.TH_ACK,
                seq,
                stream.seq[other],
                chunk,
            )
            stream.seq[event.direction] = (seq + len(chunk)) & 0xFFFFFFFF

    def _closed(self, event: Closed) -> None:
        if self._datagrams:
            return
        stream = self._streams.get(event.conn)
        if stream is None:
            return
        if event.direction is None:
            del self._streams[event.conn]
            return
        if stream.fin[event.direction]:
            return
        stream.fin[event.direction] = True
        tcp = self._dpkt.tcp
        other = "down" if event.direction == "up" else "up"
        seq = stream.seq[event.direction]
        self._segment(
            event.time,
            stream,
            event.direction,
            tcp.TH_FIN | tcp.TH_ACK,
            seq,
            stream.seq[other],
            b"",
        )
        stream.seq[event.direction] = (seq + 1) & 0xFFFFFFFF

    def _segment(
        self,
        when: float,
        stream: _Stream,
        direction: str,
        flags: int,
        seq: int,
        ack: int,
        payload: bytes,
    ) -> None:
        dpkt = self._dpkt
        client, server = stream.port, self._port
        sport, dport = (client, server) if direction == "up" else (server, client)
        segment = dpkt.tcp.TCP(
            sport=sport, dport=dport, seq=seq, ack=ack, flags=flags, win=65535, data=payload
        )
        self._packet(when, direction, dpkt.ip.IP_PROTO_TCP, segment)

    def _udp(self, event: Data) -> None:
        dpkt = self._dpkt
        client = _FIRST_PORT + (event.conn - 1) % _PORTS
        sport, dport = (client, self._port) if event.direction == "up" else (self._port, client)
        datagram = dpkt.udp.UDP(sport=sport, dport=dport, data=event.data[:_SEGMENT])
        datagram.ulen = len(datagram)
        self._packet(event.time, event.direction, dpkt.ip.IP_PROTO_UDP, datagram)

    def _packet(self, when: float, direction: str, proto: int, payload: Any) -> None:
        dpkt = self._dpkt
        src, dst = (_CLIENT_IP, _SERVER_IP) if direction == "up" else (_SERVER_IP, _CLIENT_IP)
        packet = dpkt.ip.IP(src=src, dst=dst, p=proto, ttl=64, data=payload)
        packet.len = len(packet)  # with its payload: dpkt fills in the checksums on bytes()
        frame = dpkt.ethernet.Ethernet(
            src=b"\x02\x00\x00\x00\x00\x02" if direction == "up" else b"\x02\x00\x00\x00\x00\x01",
            dst=b"\x02\x00\x00\x00\x00\x01" if direction == "up" else b"\x02\x00\x00\x00\x00\x02",
            type=dpkt.ethernet.ETH_TYPE_IP,
            data=packet,
        )
        self._writer.writepkt(bytes(frame), ts=when)
