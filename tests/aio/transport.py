"""The conformance suite's transport interface (tests/integration/conformance.py) over
``udskit.aio``, on asyncio's standard loop and on uvloop.

Each transport runs its event loop in a helper thread; every method hands a coroutine to
that loop and waits for its result, so the suite's synchronous tests (and their helper
threads) drive the asyncio API unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import udskit
import udskit.aio
from udskit import PeerCred

from ..conftest import stop_loop_thread
from ..integration.conformance import (
    ALL_SIZES,
    LINES_MAX,
    MIB,
    PACKET_SIZES,
    THREAD_TIMEOUT,
    Empty,
    Kind,
    Transport,
)

T = TypeVar("T")

#: The event loops every asyncio test runs on.
LOOPS = ("asyncio", "uvloop")


class DatagramServerEnd:
    """The server side of a datagram exchange: the listener, and the client it answers."""

    def __init__(self, listener: udskit.aio.DatagramListener, client: udskit.Address | None):
        self.listener = listener
        self.client = client
        self.last_peer: PeerCred | None = None


class LoopThread:
    """An event loop running in a daemon thread, and a way to run coroutines on it."""

    def __init__(self, loop_name: str) -> None:
        self.loop = udskit.aio.new_event_loop(use_uvloop=loop_name == "uvloop")
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(THREAD_TIMEOUT)

    def call(self, func: Callable[[], T]) -> T:
        """``func()`` on the loop's thread (channels belong to their loop)."""

        async def wrapper() -> T:
            return func()

        return self.run(wrapper())

    def stop(self) -> None:
        stop_loop_thread(self.loop, self._thread)


class AioTransport:
    """``udskit.aio``: ``listen`` + ``accept`` + ``connect``, or ``pair()``, on one loop."""

    def __init__(
        self,
        directory: Path,
        kind: Kind,
        how: str,
        framing: str,
        loop_name: str,
        shm: bool = False,
    ) -> None:
        self.kind = kind
        self.how = how
        self.framing = framing if kind == "stream" else None
        parts = ("aio", loop_name, kind, self.framing, how, "shm" if shm else "")
        self.id = "-".join(filter(None, parts))
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
        self._open: list[Any] = []
        self._loop = LoopThread(loop_name)

    def __repr__(self) -> str:
        return f"<AioTransport {self.id}>"

    def make_pair(self) -> tuple[Any, Any]:
        return self._loop.run(self._make_pair())

    async def _make_pair(self) -> tuple[Any, Any]:
        if self.how == "pair":
            client, server = udskit.aio.pair(**self._options)
            self._open += [client, server]
            return client, server
        listener = await udskit.aio.listen(self._path, **self._options)
        self._open.append(listener)
        client = await udskit.aio.connect(self._path, **self._options)
        self._open.append(client)
        if isinstance(listener, udskit.aio.DatagramListener):
            # A datagram server learns its client from the client's first datagram.
            await client.send(b"hello")
            first = await listener.recv()
            assert first.data == b"hello"
            end = DatagramServerEnd(listener, first.sender)
            end.last_peer = first.peer
            return client, end
        server = await listener.accept()
        self._open.append(server)
        return client, server

    def send(self, end: Any, data: bytes) -> None:
        if isinstance(end, DatagramServerEnd):
            assert end.client is not None, "the client has no address to answer"
            self._loop.run(end.listener.send_to(end.client, data))
        else:
            self._loop.run(end.send(data))

    def recv(self, end: Any) -> bytes:
        if isinstance(end, DatagramServerEnd):
            datagram = self._loop.run(end.listener.recv())
            end.last_peer = datagram.peer
            for fd in datagram.fds:
                os.close(fd)
            return datagram.data
        data: bytes = self._loop.run(end.recv())
        return data

    def send_fds(self, end: Any, data: bytes, fds: Sequence[int]) -> None:
        if isinstance(end, DatagramServerEnd):
            assert end.client is not None
            self._loop.run(end.listener.send_to(end.client, data, fds))
        else:
            self._loop.run(end.send_fds(data, fds))

    def recv_fds(self, end: Any) -> tuple[bytes, list[int]]:
        if isinstance(end, DatagramServerEnd):
            datagram = self._loop.run(end.listener.recv())
            end.last_peer = datagram.peer
            return datagram.data, list(datagram.fds)
        received: tuple[bytes, list[int]] = self._loop.run(end.recv_fds())
        return received

    def messages(self, end: Any) -> list[bytes]:
        if isinstance(end, DatagramServerEnd):
            raise TypeError("a datagram listener has no end of stream to iterate to")

        async def gather() -> list[bytes]:
            return [message async for message in end]

        return self._loop.run(gather())

    def settimeout(self, end: Any, seconds: float | None) -> None:
        target = end.listener if isinstance(end, DatagramServerEnd) else end
        self._loop.call(lambda: target.settimeout(seconds))

    def peer(self, end: Any) -> PeerCred | None:
        if isinstance(end, DatagramServerEnd):
            return end.last_peer
        peer: PeerCred | None = end.peer
        return peer

    def close(self, end: Any) -> None:
        target = end.listener if isinstance(end, DatagramServerEnd) else end
        self._loop.run(target.aclose())

    def is_closed(self, end: Any) -> bool:
        closed: bool = (end.listener if isinstance(end, DatagramServerEnd) else end).closed
        return closed

    @contextlib.contextmanager
    def closing(self, end: Any) -> Iterator[Any]:
        target = end.listener if isinstance(end, DatagramServerEnd) else end
        self._loop.run(target.__aenter__())
        try:
            yield end
        except BaseException as exc:
            self._loop.run(target.__aexit__(type(exc), exc, exc.__traceback__))
            raise
        self._loop.run(target.__aexit__(None, None, None))

    def teardown(self) -> None:
        try:
            for item in reversed(self._open):
                self._loop.call(item.close)
            self._open.clear()
        finally:
            self._loop.stop()


def aio_transport(
    kind: Kind, how: str, framing: str, loop_name: str, shm: bool = False
) -> Callable[[Path], Transport]:
    def make(directory: Path) -> Transport:
        return AioTransport(directory, kind, how, framing, loop_name, shm)

    parts = ("aio", loop_name, kind, framing if kind == "stream" else "", how, "shm" if shm else "")
    make.__name__ = "-".join(filter(None, parts))
    return make


_KINDS: tuple[tuple[Kind, tuple[str, ...]], ...] = (
    ("stream", ("length", "lines", "raw")),
    ("seqpacket", ("length",)),
    ("dgram", ("length",)),
)

#: Every asyncio transport: each socket type (and stream framing), made by listen+connect
#: and by pair(), on each loop.
AIO_TRANSPORTS: list[Callable[[Path], Transport]] = [
    aio_transport(kind, how, framing, loop_name)
    for loop_name in LOOPS
    for kind, framings in _KINDS
    for framing in framings
    for how in ("listen", "pair")
] + [
    # Shared memory, one more transport: on the standard loop (the loop changes nothing in
    # the records' path, and every test here costs CI time).
    aio_transport(kind, how, "length", "asyncio", shm=True)
    for kind in ("stream", "seqpacket")
    for how in ("listen", "pair")
]
