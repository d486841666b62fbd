"""The conformance suite's transport interface, and its blocking implementations.

``test_conformance.py`` checks one contract (round trips, empty messages, order, end of
stream, closed peers, timeouts, descriptor passing, peer credentials, closing) over every way
udskit connects two endpoints. The tests never touch a Channel directly: they go through a
*transport*, an object with plain synchronous methods. A new implementation (the asyncio
layer, say) joins the suite by writing one more transport class and adding it to
:data:`TRANSPORTS`; an asyncio transport runs its event loop in a helper thread and wraps
each coroutine with ``asyncio.run_coroutine_threadsafe(...).result(timeout)``.

The interface (``End`` is whatever object the transport uses for one endpoint):

``id``              a short name for test ids, e.g. ``stream-length-listen``
``kind``            ``"stream"``, ``"seqpacket"`` or ``"dgram"``
``boundaries``      True if each ``recv`` returns exactly one sent message; False for raw
                    stream framing, where ``recv`` returns whatever bytes have arrived
``empty``           what ``send(end, b"")`` does: ``"message"`` (an empty message arrives),
                    ``"refused"`` (ProtocolError, the endpoint stays usable) or ``"nothing"``
                    (raw framing: no bytes, no message)
``binary``          False if payloads must not contain ``\\n`` (lines framing)
``eof``             True if ``recv`` sees the peer's close (ConnectionClosed, iteration
                    ends); False for datagrams, which have no end of stream
``sizes``           the message sizes the transport carries in one message
``make_pair()``     a connected ``(client, server)``; both may send first
``send(end, data)``, ``recv(end) -> bytes``
``send_fds(end, data, fds)``, ``recv_fds(end) -> (bytes, [fd, ...])`` (caller owns the fds)
``messages(end) -> [bytes]``   iterate until the peer closes cleanly
``settimeout(end, seconds)``   later ``recv`` raise udskit.Timeout after that long
``peer(end) -> PeerCred | None``
``close(end)``, ``is_closed(end) -> bool``
``closing(end)``    a context manager that closes ``end`` on exit, as the transport's own
                    ``with`` (or ``async with``) does
``teardown()``      close everything still open (listeners included)

Methods raise udskit's errors unchanged, and must be callable from several threads at once
on different ends: the suite sends large messages from a helper thread while the test's
thread receives.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import udskit
from udskit import Channel, DatagramListener, PeerCred

Kind = Literal["stream", "seqpacket", "dgram"]
Empty = Literal["message", "refused", "nothing"]

KIB = 1024
MIB = 1024 * KIB

#: Every size the suite sends; a transport lists the ones it carries in one message.
ALL_SIZES = (1, 64, 4 * KIB, 64 * KIB, MIB)

#: Largest message a seqpacket or datagram socket carries with default buffers (the
#: sender's SO_SNDBUF is about 208 KiB); larger ones belong on a stream.
PACKET_SIZES = (1, 64, 4 * KIB, 64 * KIB)

#: Lines framing limits a line to 64 KiB by default; the suite raises it to carry 1 MiB.
LINES_MAX = 2 * MIB

#: How long a helper thread may take to send one message before the test fails.
THREAD_TIMEOUT = 30.0


class Transport(Protocol):
    """What test_conformance.py needs from a way of connecting two endpoints."""

    id: str
    kind: Kind
    boundaries: bool
    empty: Empty
    binary: bool
    eof: bool
    sizes: tuple[int, ...]

    def make_pair(self) -> tuple[Any, Any]: ...
    def send(self, end: Any, data: bytes) -> None: ...
    def recv(self, end: Any) -> bytes: ...
    def send_fds(self, end: Any, data: bytes, fds: Sequence[int]) -> None: ...
    def recv_fds(self, end: Any) -> tuple[bytes, list[int]]: ...
    def messages(self, end: Any) -> list[bytes]: ...
    def settimeout(self, end: Any, seconds: float | None) -> None: ...
    def peer(self, end: Any) -> PeerCred | None: ...
    def close(self, end: Any) -> None: ...
    def is_closed(self, end: Any) -> bool: ...
    def closing(self, end: Any) -> contextlib.AbstractContextManager[Any]: ...
    def teardown(self) -> None: ...


# -- blocking udskit --------------------------------------------------------------------------


class DatagramServerEnd:
    """The server side of a datagram exchange: the listener, and the client it answers."""

    def __init__(self, listener: DatagramListener, client: udskit.Address | None) -> None:
        self.listener = listener
        self.client = client
        self.last_peer: PeerCred | None = None


class BlockingTransport:
    """udskit's blocking API: ``listen`` + ``accept`` + ``connect``, or ``pair()``."""

    def __init__(
        self, directory: Path, kind: Kind, how: str, framing: str = "length", shm: bool = False
    ) -> None:
        self.kind = kind
        self.how = how
        self.framing = framing if kind == "stream" else None
        self.id = "-".join(filter(None, (kind, self.framing, how, "shm" if shm else "")))
        self.boundaries = self.framing != "raw"
        self.empty: Empty = (
            "nothing" if self.framing == "raw" else "refused" if kind == "seqpacket" else "message"
        )
        self.binary = self.framing != "lines"
        self.eof = kind != "dgram"
        self.sizes: tuple[int, ...] = ALL_SIZES if kind == "stream" else PACKET_SIZES
        self._path = directory / "conformance.sock"
        self._options: dict[str, Any] = {"type": kind}
        if kind == "stream":
            self._options["framing"] = framing
            if framing == "lines":
                self._options["max_frame"] = LINES_MAX
        if shm:
            # Large messages (1 MiB here) go through shared memory, the rest as before.
            self._options["shared_memory"] = True
            if kind == "seqpacket":
                # Seqpacket carries 1 MiB too, through the pool (socket buffers hold less).
                self.sizes = (*PACKET_SIZES, MIB)
        self._open: list[Channel | DatagramListener | udskit.Listener] = []

    def __repr__(self) -> str:
        return f"<BlockingTransport {self.id}>"

    def make_pair(self) -> tuple[Any, Any]:
        if self.how == "pair":
            client, server = udskit.pair(**self._options)
            self._open += [client, server]
            return client, server
        listener = udskit.listen(self._path, **self._options)
        self._open.append(listener)
        client = udskit.connect(self._path, **self._options)
        self._open.append(client)
        if isinstance(listener, DatagramListener):
            # A datagram server learns its client from the client's first datagram.
            client.send(b"hello")
            first = listener.recv()
            assert first.data == b"hello"
            end = DatagramServerEnd(listener, first.sender)
            end.last_peer = first.peer
            return client, end
        server = listener.accept()
        self._open.append(server)
        return client, server

    def send(self, end: Any, data: bytes) -> None:
        if isinstance(end, DatagramServerEnd):
            assert end.client is not None, "the client has no address to answer"
            end.listener.send_to(end.client, data)
        else:
            end.send(data)

    def recv(self, end: Any) -> bytes:
        if isinstance(end, DatagramServerEnd):
            datagram = end.listener.recv()
            end.last_peer = datagram.peer
            for fd in datagram.fds:
                os.close(fd)
            return datagram.data
        data: bytes = end.recv()
        return data

    def send_fds(self, end: Any, data: bytes, fds: Sequence[int]) -> None:
        if isinstance(end, DatagramServerEnd):
            assert end.client is not None
            end.listener.send_to(end.client, data, fds)
        else:
            end.send_fds(data, fds)

    def recv_fds(self, end: Any) -> tuple[bytes, list[int]]:
        if isinstance(end, DatagramServerEnd):
            datagram = end.listener.recv()
            end.last_peer = datagram.peer
            return datagram.data, list(datagram.fds)
        received: tuple[bytes, list[int]] = end.recv_fds()
        return received

    def messages(self, end: Any) -> list[bytes]:
        if isinstance(end, DatagramServerEnd):
            raise TypeError("a datagram listener has no end of stream to iterate to")
        return list(end)

    def settimeout(self, end: Any, seconds: float | None) -> None:
        target = end.listener if isinstance(end, DatagramServerEnd) else end
        target.settimeout(seconds)

    def peer(self, end: Any) -> PeerCred | None:
        if isinstance(end, DatagramServerEnd):
            return end.last_peer
        peer: PeerCred | None = end.peer
        return peer

    def close(self, end: Any) -> None:
        (end.listener if isinstance(end, DatagramServerEnd) else end).close()

    def is_closed(self, end: Any) -> bool:
        closed: bool = (end.listener if isinstance(end, DatagramServerEnd) else end).closed
        return closed

    @contextlib.contextmanager
    def closing(self, end: Any) -> Iterator[Any]:
        with end.listener if isinstance(end, DatagramServerEnd) else end:
            yield end

    def teardown(self) -> None:
        for item in reversed(self._open):
            item.close()
        self._open.clear()


def _blocking(
    kind: Kind, how: str, framing: str = "length", shm: bool = False
) -> Callable[[Path], Transport]:
    def make(directory: Path) -> Transport:
        return BlockingTransport(directory, kind, how, framing, shm)

    parts = (kind, framing if kind == "stream" else "", how, "shm" if shm else "")
    make.__name__ = "-".join(filter(None, parts))
    return make


#: Every transport the suite runs over: a factory taking a private temporary directory.
TRANSPORTS: list[Callable[[Path], Transport]] = [
    *(
        _blocking("stream", how, framing)
        for framing in ("length", "lines", "raw")
        for how in ("listen", "pair")
    ),
    *(_blocking("seqpacket", how) for how in ("listen", "pair")),
    *(_blocking("dgram", how) for how in ("listen", "pair")),
    *(
        _blocking(kind, how, shm=True)
        for kind in ("stream", "seqpacket")
        for how in ("listen", "pair")
    ),
]


# -- helpers for the tests --------------------------------------------------------------------


def payload(size: int, *, binary: bool = True, seed: int = 0) -> bytes:
    """``size`` reproducible pseudo-random bytes (no newline unless ``binary``)."""
    data = random.Random(size * 7919 + seed).randbytes(size)
    return data if binary else data.replace(b"\n", b"N")


def receive_exactly(transport: Transport, end: Any, size: int) -> bytes:
    """One message, or (without message boundaries) ``size`` bytes gathered over reads."""
    if transport.boundaries:
        return transport.recv(end)
    parts: list[bytes] = []
    got = 0
    while got < size:
        chunk = transport.recv(end)
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


class Background:
    """Run ``func(*args)`` in a thread; ``join()`` re-raises what it raised."""

    def __init__(self, func: Callable[..., object], *args: object) -> None:
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(func, *args), daemon=True)
        self._thread.start()

    def _run(self, func: Callable[..., object], *args: object) -> None:
        try:
            func(*args)
        except BaseException as exc:
            self._error = exc

    def join(self) -> None:
        self._thread.join(THREAD_TIMEOUT)
        assert not self._thread.is_alive(), f"helper thread still running after {THREAD_TIMEOUT} s"
        if self._error is not None:
            raise self._error
