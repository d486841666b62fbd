"""A datagram server handed over while a handler runs and datagrams it has read wait: the
handler still replies, every datagram the old process took is answered, and once it has
handed over it takes no more (they are the successor's)."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import udskit
import udskit.aio

from ..conftest import READY_TIMEOUT, unread
from .harness import FLAVOURS, PATIENCE, Child, control_path, wait_for

HOLD = b"hold"
QUEUED = [b"q1", b"q2", b"q3"]
AFTER = [b"after1", b"after2", b"after3"]


class OldServer:
    """The process serving before the handover, in this process so that the test holds its
    handler: a reply to ``hold`` waits for ``release``; every reply is ``old:MESSAGE``."""

    def __init__(self, flavour: str, path: Path, drain_timeout: float = 30.0) -> None:
        self.flavour = flavour
        self.path = path
        self.options: dict[str, Any] = {
            "type": "dgram",
            "handover": True,
            "drain_timeout": drain_timeout,
        }
        self.entered = threading.Event()  # the handler of ``hold`` runs
        self.release = threading.Event()
        self.handed = threading.Event()  # the server has acted on the handover
        self.started = threading.Event()
        self.server: Any = None
        self.endpoint: Any = None  # the listener
        self.loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    # The handlers of the four servers.
    def _held(self, message: bytes) -> bytes:
        if message == HOLD:
            self.entered.set()
            assert self.release.wait(READY_TIMEOUT)
        return b"old:" + message

    def _conversational(self, channel: udskit.Channel) -> None:
        channel.send(self._held(channel.recv()))

    def _per_message(self, conn: udskit.Connection, message: bytes) -> bytes:
        return self._held(message)

    async def _aio_conversational(self, channel: Any) -> None:
        message = await channel.recv()
        await channel.send(await asyncio.to_thread(self._held, message))

    def _aio_per_message(self, conn: udskit.Connection, message: bytes) -> Any:
        if message == HOLD:
            return asyncio.to_thread(self._held, message)
        return b"old:" + message

    def _run(self) -> None:
        try:
            if self.flavour == "server":
                self.server = udskit.Server(self.path, self._conversational, **self.options)
                self._serve_blocking(self.handed.set)
            elif self.flavour == "messageserver":
                # Workers: the serving thread reads on while a worker holds the handler.
                self.server = udskit.MessageServer(
                    self.path, self._per_message, workers=2, **self.options
                )
                self._serve_blocking(lambda: self.server.call_soon(self.handed.set))
            else:
                udskit.aio.run(self._serve_aio())
        except BaseException as exc:  # reported to the test
            self.error = exc
            self.started.set()

    def _serve_blocking(self, handed: Callable[[], object]) -> None:
        self.endpoint = self.server.listener
        # After the server's own callback: once this one runs, the server has acted.
        self.upgrader().on_handed_over(handed)
        self.started.set()
        self.server.serve_forever()

    async def _serve_aio(self) -> None:
        if self.flavour == "aioserver":
            self.server = await udskit.aio.start_server(
                self.path, self._aio_conversational, **self.options
            )
            self.endpoint = self.server.listener
        else:
            self.endpoint = udskit.listen(self.path, type="dgram", handover=True)
            self.server = udskit.aio.MessageServer(
                self.endpoint,
                self._aio_per_message,
                drain_timeout=self.options["drain_timeout"],
            )
        loop = self.loop = asyncio.get_running_loop()
        serving = loop.create_task(self.server.serve_forever())
        # serve_forever registers its callback before it offers handover (the control
        # socket appears): this one runs after it, its call after the server's.
        await asyncio.to_thread(wait_for, control_path(self.path))
        self.upgrader().on_handed_over(lambda: loop.call_soon_threadsafe(self.handed.set))
        self.started.set()
        await serving

    def start(self) -> None:
        self.thread.start()
        assert self.started.wait(READY_TIMEOUT)
        if self.error is not None:
            raise self.error
        wait_for(control_path(self.path))

    def upgrader(self) -> udskit.Upgrader:
        upgrader: udskit.Upgrader = self.endpoint.upgrader
        return upgrader

    def join(self) -> None:
        self.thread.join(READY_TIMEOUT)
        assert not self.thread.is_alive(), "the old server did not end after the handover"
        assert self.error is None, self.error


def replies(client: udskit.Channel, count: int) -> list[bytes]:
    return [client.recv() for _ in range(count)]


def arrived(client: udskit.Channel) -> list[bytes]:
    """The replies already in the client's queue (it waits for none)."""
    client.settimeout(0)
    got = []
    for _ in range(100):
        try:
            got.append(client.recv())
        except udskit.Timeout:
            break
    client.settimeout(PATIENCE)
    return got


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_datagram_server_handed_over_answers_what_it_took_and_takes_no_more(
    flavour: str, sockdir: Path
) -> None:
    path = sockdir / "d.sock"
    old = OldServer(flavour, path)
    old.start()
    try:
        with udskit.connect(path, type="dgram", timeout=PATIENCE) as client:
            client.send(HOLD)
            assert old.entered.wait(READY_TIMEOUT)
            for message in QUEUED:
                client.send(message)
            if flavour != "server":  # the others read on while the handler runs
                sock = old.endpoint.socket
                wait_for_condition(lambda: unread(sock) == 0)
            with Child(flavour, path, "dgram") as new:
                new.expect(f"took over from pid {os.getpid()}")
                assert old.handed.wait(READY_TIMEOUT)
                # The old process, its handler still running, takes none of these.
                for message in AFTER:
                    client.send(message)
                got = []
                while not all(b"%d:%s" % (new.pid, m) in got for m in AFTER):
                    got.append(client.recv())  # bounded: each waits PATIENCE at most
                old.release.set()
                old.join()  # it has answered all it ever will
                got += replies(client, 1 + len(QUEUED) + len(AFTER) - len(got))
                expected_queued = [
                    b"old:" + m if flavour != "server" else b"%d:%s" % (new.pid, m) for m in QUEUED
                ]
                assert sorted(got) == sorted(
                    [b"old:" + HOLD, *expected_queued, *(b"%d:%s" % (new.pid, m) for m in AFTER)]
                )
                assert os.path.exists(path), "the old process removed the successor's file"
                client.send(b"last")
                assert client.recv() == b"%d:last" % new.pid
                assert new.terminate() == 0
                assert new.leaked() == "leaked []"
    finally:
        old.release.set()
        if old.thread.is_alive():
            stop_old(old)
    assert not os.path.lexists(path)


class Said(logging.Handler):
    """Sets ``event`` once udskit logs a line that contains ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.WARNING)
        self.text = text
        self.event = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


@pytest.mark.parametrize("flavour", ["messageserver", "aioserver", "aiomessageserver"])
def test_a_handed_over_datagram_server_handles_what_it_took_for_drain_timeout_at_most(
    flavour: str, sockdir: Path
) -> None:
    path = sockdir / "d.sock"
    old = OldServer(flavour, path, drain_timeout=0.1)
    warning = Said("still handling datagrams 0.1 s after the handover; stopping")
    logging.getLogger("udskit").addHandler(warning)
    old.start()
    try:
        with udskit.connect(path, type="dgram", timeout=PATIENCE) as client:
            client.send(HOLD)
            assert old.entered.wait(READY_TIMEOUT)
            for message in QUEUED:
                client.send(message)
            sock = old.endpoint.socket
            wait_for_condition(lambda: unread(sock) == 0)  # read, or answered already
            with Child(flavour, path, "dgram") as new:
                new.expect(f"took over from pid {os.getpid()}")
                assert warning.event.wait(READY_TIMEOUT)
                # The handler that runs still replies (SHUTDOWN_GRACE); what waits for one
                # is dropped.
                old.release.set()
                old.join()
                got = arrived(client)
                queued = [b"old:" + m for m in QUEUED]
                if flavour == "aiomessageserver":  # it answered them before the handover
                    assert got == [*queued, b"old:" + HOLD]
                elif flavour == "aioserver":
                    assert got == [b"old:" + HOLD]  # the datagrams still queued: dropped
                else:
                    # Its workers' lanes: those a worker took before the stop are handled
                    # (stop() does so too), the rest dropped; none twice.
                    assert got[0] == b"old:" + HOLD
                    assert got[1:] == queued[: len(got) - 1]
                client.send(b"last")
                assert client.recv() == b"%d:last" % new.pid
                assert new.terminate() == 0
    finally:
        logging.getLogger("udskit").removeHandler(warning)
        old.release.set()
        if old.thread.is_alive():
            stop_old(old)
    assert not os.path.lexists(path)


def stop_old(old: OldServer) -> None:
    server, loop = old.server, old.loop
    if loop is not None:
        loop.call_soon_threadsafe(server.stop)
    elif server is not None:
        server.stop()
    old.thread.join(READY_TIMEOUT)


def wait_for_condition(condition: Callable[[], bool]) -> None:
    """Return once ``condition()`` holds: a bounded poll (another thread makes it true)."""
    deadline = READY_TIMEOUT
    event = threading.Event()
    step = 0.001
    while not condition():
        assert deadline > 0, "the condition never held"
        event.wait(step)
        deadline -= step
