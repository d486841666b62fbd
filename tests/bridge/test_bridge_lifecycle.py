"""udskit.bridge's life and faults: run() stopped by a signal, serve() cancelled, a stop that
has to cut connections, accept() errors (injected), and a target whose backlog stays full."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import select
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import udskit
from udskit import bridge

from ..conftest import READY_TIMEOUT, wait_connectable
from .peers import (
    LoopThread,
    StreamServer,
    client_for,
    echo_server,
    exchange,
    loop_thread,
    read_to_eof,
    running_bridge,
    stats,
    wait_for,
)


@pytest.fixture(params=["asyncio", "uvloop"])
def runner(request: pytest.FixtureRequest) -> Iterator[LoopThread]:
    with loop_thread(request.param) as started:
        yield started


@pytest.fixture
def servers() -> Iterator[LoopThread]:
    with loop_thread("asyncio") as started:
        yield started


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_run_serves_until_a_signal(servers: LoopThread, sockdir: Path, signum: int) -> None:
    """run() in the main thread, as the CLI uses it: the signal stops it, it returns."""
    front = sockdir / "front.sock"
    seen: list[bridge.Bridge] = []
    results: list[bytes] = []

    def client() -> None:
        try:
            wait_connectable(front)
            results.append(exchange(udskit.Address.parse(str(front)), b"via run()"))
        finally:
            os.kill(os.getpid(), signum)

    with echo_server(servers, str(sockdir / "echo.sock")) as target:
        helper = threading.Thread(target=client)
        helper.start()
        try:
            bridge.run(str(front), target.address, started=seen.append)
        finally:
            helper.join(READY_TIMEOUT)
    assert results == [b"via run()"]
    assert len(seen) == 1
    assert seen[0].closed
    assert not front.exists()


def test_serve_until_cancelled(servers: LoopThread, sockdir: Path) -> None:
    front = sockdir / "front.sock"

    async def main(target: udskit.Address) -> bytes:
        ready = asyncio.Event()
        task = asyncio.create_task(bridge.serve(str(front), target, started=lambda _: ready.set()))
        await asyncio.wait_for(ready.wait(), READY_TIMEOUT)
        answer = await asyncio.get_running_loop().run_in_executor(
            None, exchange, udskit.Address.parse(str(front)), b"served"
        )
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return answer

    with echo_server(servers, str(sockdir / "echo.sock")) as target:
        assert asyncio.run(main(target.address)) == b"served"
    assert not front.exists()


def test_stop_cuts_connections_that_cannot_drain(
    runner: LoopThread, servers: LoopThread, sockdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A target that never reads: the data the bridge holds for it can never be written, so
    the stop waits its grace period and then cuts the connection."""
    release, finished = threading.Event(), threading.Event()

    async def never_reads(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.get_running_loop().run_in_executor(None, release.wait, READY_TIMEOUT)
        await _close(writer)
        finished.set()

    caplog.set_level(logging.WARNING, logger="udskit")
    server = StreamServer(servers, str(sockdir / "stuck.sock"), never_reads)
    try:
        running = runner.call(bridge.start("tcp:127.0.0.1:0", server.address))
        sock = client_for(running.address)
        sock.setblocking(False)
        try:
            _fill_until_stuck(runner, running, sock)
            runner.call(running.aclose(grace=0.05))
            assert stats(runner, running).active == 0
        finally:
            release.set()
            sock.close()
            assert finished.wait(READY_TIMEOUT), "the target's handler did not end"
    finally:
        server.close()
    assert any("did not finish within 0.05 s" in r.getMessage() for r in caplog.records)


def test_a_cut_connection_is_reset_not_ended(
    runner: LoopThread, servers: LoopThread, sockdir: Path
) -> None:
    """A download the client is not reading when the stop's grace runs out: the client must
    not read an orderly end of stream (a cut transfer would look complete) but a reset."""
    release, finished = threading.Event(), threading.Event()
    size = 32 << 20  # far more than the socket buffers and the bridge's together

    async def floods(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(bytes(size))
            await writer.drain()
        except ConnectionError:
            pass  # the bridge cut the connection: expected
        finally:
            await asyncio.get_running_loop().run_in_executor(None, release.wait, READY_TIMEOUT)
            await _close(writer)
            finished.set()

    server = StreamServer(servers, str(sockdir / "flood.sock"), floods)
    try:
        running = runner.call(bridge.start("tcp:127.0.0.1:0", server.address))
        with client_for(running.address) as sock:
            try:
                wait_for(lambda: stats(runner, running).paused > 0, "the bridge to pause")
                runner.call(running.aclose(grace=0.05))
                with pytest.raises(ConnectionResetError):
                    read_to_eof(sock)  # bounded: the flood is finite
            finally:
                release.set()
                assert finished.wait(READY_TIMEOUT), "the target's handler did not end"
    finally:
        server.close()


def test_a_cut_unix_client_with_unread_data_reads_a_reset(
    runner: LoopThread, sockdir: Path
) -> None:
    """A Unix socket has no RST; what the docs promise instead: a client whose data the
    bridge had not read when it cut the connection reads ECONNRESET, not an end of stream."""
    # A target that never accepts: the bridge's connection waits in its backlog, where what
    # the bridge sends queues up and is never read, so nothing moves once the buffers fill.
    with udskit.listen(str(sockdir / "stuck.sock")) as stuck:
        running = runner.call(bridge.start(str(sockdir / "front.sock"), stuck.address))
        with client_for(running.address) as sock:
            sock.setblocking(False)
            _fill_until_stuck(runner, running, sock)
            sock.setblocking(True)
            sock.settimeout(READY_TIMEOUT)
            runner.call(running.aclose(grace=0.05))
            with pytest.raises(ConnectionResetError):
                read_to_eof(sock)


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close a test server's connection and wait until it is closed: a handler still
    running when its loop stops would leak its socket."""
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


def _fill_until_stuck(runner: LoopThread, running: bridge.Bridge, sock: socket.socket) -> None:
    """Send from the non-blocking ``sock`` until the bridge has stopped reading it for good
    (its target is full), with data of ours left unread in the bridge's socket."""
    sent = 0
    for _ in range(4096):  # bounded: 256 MiB, far more than all the buffers
        try:
            sent += sock.send(bytes(1 << 16))
            continue
        except BlockingIOError:
            pass
        now = stats(runner, running)  # taken on the loop: no read is under way
        # bytes_up > 0: the target's side is set up. Before, the bridge holds what it reads
        # and pauses for a moment, which is no sign of a full target.
        if now.paused > 0 and 0 < now.bytes_up < sent:
            return
        wait_for(
            lambda: stats(runner, running).paused > 0 or select_writable(sock),
            "the bridge to pause or the socket to drain",
        )
    raise AssertionError(f"the bridge never stopped reading (sent {sent} bytes)")


def select_writable(sock: socket.socket) -> bool:
    return bool(select.select([], [sock], [], 0)[1])


class _FlakyListener:
    """The bridge's listening socket with accept() failing as scripted, then working."""

    def __init__(self, real: socket.socket, failures: list[int]) -> None:
        self._real = real
        self._failures = failures

    def fileno(self) -> int:
        return self._real.fileno()

    def accept(self) -> tuple[socket.socket, object]:
        if self._failures:
            code = self._failures.pop(0)
            raise OSError(code, os.strerror(code))
        return self._real.accept()


def test_accept_out_of_descriptors_backs_off_and_recovers(
    runner: LoopThread, servers: LoopThread, sockdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="udskit")
    with (
        echo_server(servers, str(sockdir / "echo.sock")) as target,
        running_bridge(runner, "tcp:127.0.0.1:0", target.address) as running,
    ):
        flaky = _FlakyListener(running._sock, [errno.EMFILE, errno.ECONNABORTED])
        running._sock = flaky  # type: ignore[assignment]
        assert exchange(running.address, b"after the pause") == b"after the pause"
        assert not flaky._failures
    said = [r.getMessage() for r in caplog.records]
    # Once as the failures begin, saying what to do; once as accepting works again.
    assert sum("accept failed (Too many open files)" in line for line in said) == 1, said
    assert any("ulimit -n" in line for line in said), said
    assert sum("accepting again, after 1 failed tries" in line for line in said) == 1, said


def test_accept_failing_for_good_stops_accepting(
    runner: LoopThread, servers: LoopThread, sockdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="udskit")
    with (
        echo_server(servers, str(sockdir / "echo.sock")) as target,
        running_bridge(runner, "tcp:127.0.0.1:0", target.address) as running,
    ):
        running._sock = _FlakyListener(running._sock, [errno.EINVAL])  # type: ignore[assignment]
        with client_for(running.address):
            wait_for(
                lambda: any("no longer accepting" in r.getMessage() for r in caplog.records),
                "the accept error to be logged",
            )
        assert stats(runner, running).accepted == 0


def test_target_backlog_full_times_out(sockdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A target that stopped accepting, its backlog full: the connect is retried, then fails
    with a message that says so."""
    monkeypatch.setattr(bridge, "CONNECT_TIMEOUT", 0.2)
    path = sockdir / "busy.sock"
    with socket.socket(socket.AF_UNIX) as busy:
        busy.bind(str(path))
        busy.listen(0)
        fillers = []
        try:
            while True:  # queue connections until the kernel refuses more
                filler = socket.socket(socket.AF_UNIX)
                filler.setblocking(False)
                fillers.append(filler)
                try:
                    filler.connect(str(path))
                except BlockingIOError:
                    break
                assert len(fillers) < 64, "the backlog never filled"

            async def attempt() -> None:
                (await bridge.connect_socket(udskit.Address.parse(str(path)))).close()

            with pytest.raises(udskit.ConnectError, match="backlog stayed full"):
                asyncio.run(attempt())
        finally:
            for filler in fillers:
                filler.close()


def test_start_keeps_the_loop_free_while_another_process_claims_the_path(
    sockdir: Path,
) -> None:
    """The claim waits for the path's lock in a worker thread: the event loop runs on."""
    import fcntl

    path = sockdir / "front.sock"
    target = sockdir / "back.sock"
    lock = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)  # as a process in the middle of its own claim

    async def main() -> int:
        starting = asyncio.ensure_future(bridge.start(f"unix:{path}", f"unix:{target}"))
        turns = 0
        while turns < 50:  # the loop goes round while start() waits for the lock
            await asyncio.sleep(0)
            turns += 1
        assert not starting.done()
        fcntl.flock(lock, fcntl.LOCK_UN)
        running = await asyncio.wait_for(starting, 10)
        await running.aclose()
        return turns

    try:
        assert udskit.aio.run(main()) == 50
    finally:
        os.close(lock)
