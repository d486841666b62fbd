"""Test peers for the bridge: an event loop in a thread, echo and scripted servers, clients.

The servers are written with asyncio's high-level streams, independently of the bridge's
transport code, so that a bug in one does not hide a bug in the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import udskit
import udskit.aio
from udskit import bridge

from ..conftest import READY_TIMEOUT, stop_loop_thread

T = TypeVar("T")

StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class LoopThread:
    """An event loop (asyncio's or uvloop's) running in a daemon thread."""

    def __init__(self, kind: str = "asyncio") -> None:
        self.loop = udskit.aio.new_event_loop(use_uvloop=kind == "uvloop")
        self.kind = kind
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = READY_TIMEOUT) -> T:
        """Run ``coro`` on the loop and return its result (bounded wait)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        stop_loop_thread(self.loop, self._thread)


@contextlib.contextmanager
def loop_thread(kind: str = "asyncio") -> Iterator[LoopThread]:
    runner = LoopThread(kind)
    try:
        yield runner
    finally:
        runner.close()


@contextlib.contextmanager
def running_bridge(
    runner: LoopThread, listen: object, target: object, **options: Any
) -> Iterator[bridge.Bridge]:
    """A bridge started on ``runner``'s loop; closed (and its connections ended) on exit."""
    started = runner.call(bridge.start(listen, target, **options))  # type: ignore[arg-type]
    try:
        yield started
    finally:
        runner.call(started.aclose(grace=1.0))


def stats(runner: LoopThread, running: bridge.Bridge) -> bridge.BridgeStats:
    async def read() -> bridge.BridgeStats:
        return running.stats()

    return runner.call(read())


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo until end of stream, then half-close: what a relay must carry both ways."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


class StreamServer:
    """An asyncio streams server on a Unix path, abstract name or TCP port."""

    def __init__(self, runner: LoopThread, address: str, handler: StreamHandler) -> None:
        self._runner = runner
        self._writers: set[asyncio.StreamWriter] = set()
        target = udskit.Address.parse(address)
        # udskit binds socket files of any length; asyncio serves on the socket.
        self._listener = udskit.listen(target) if target.kind == "path" else None
        self._server = runner.call(self._start(target, self._tracked(handler), self._listener))
        if target.kind == "tcp":
            port = self._server.sockets[0].getsockname()[1]
            target = udskit.Address("tcp", host=target.host, port=port)
        self.address = target

    def _tracked(self, handler: StreamHandler) -> StreamHandler:
        """``handler``, with its connection known to ``close()`` while it runs."""

        async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self._writers.add(writer)
            try:
                await handler(reader, writer)
            finally:
                self._writers.discard(writer)

        return run

    @staticmethod
    async def _start(
        target: udskit.Address, handler: StreamHandler, listener: udskit.Listener | None
    ) -> asyncio.AbstractServer:
        if target.kind == "tcp":
            return await asyncio.start_server(handler, target.host, target.port)
        if listener is not None:
            listener.socket.setblocking(False)
            return await asyncio.start_unix_server(handler, sock=listener.socket)
        return await asyncio.start_unix_server(handler, target.sockaddr())

    def close(self) -> None:
        async def stop() -> None:
            self._server.close()  # stops listening; the connections are ours to end
            for writer in list(self._writers):
                writer.transport.abort()

        self._runner.call(stop())
        if self._listener is not None:
            self._listener.close()


@contextlib.contextmanager
def echo_server(runner: LoopThread, address: str) -> Iterator[StreamServer]:
    server = StreamServer(runner, address, _echo)
    try:
        yield server
    finally:
        server.close()


def client_for(address: udskit.Address) -> socket.socket:
    """A blocking client socket connected to ``address`` (bounded by a timeout)."""
    if address.kind == "tcp":
        sock = socket.create_connection((address.host, address.port), timeout=READY_TIMEOUT)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(READY_TIMEOUT)
        with udskit.address.sun_path(address) as where:
            sock.connect(where)
    return sock


def read_to_eof(sock: socket.socket) -> bytes:
    chunks = []
    while data := sock.recv(1 << 20):
        chunks.append(data)
    return b"".join(chunks)


def exchange(address: udskit.Address, payload: bytes) -> bytes:
    """Send ``payload`` (from a thread), half-close, and return everything read back."""
    with client_for(address) as sock:
        errors: list[BaseException] = []

        def send() -> None:
            try:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
            except BaseException as exc:
                errors.append(exc)

        sender = threading.Thread(target=send)
        sender.start()
        try:
            received = read_to_eof(sock)
        finally:
            sender.join(READY_TIMEOUT)
        assert not errors, errors
        return received


def wait_for(condition: Callable[[], object], what: str) -> None:
    """Poll ``condition()`` until true; fail after READY_TIMEOUT (bounded)."""
    deadline = time.monotonic() + READY_TIMEOUT
    delay = 0.001
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
