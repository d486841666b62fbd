"""udskit.bridge, the library: relays between every pair of address kinds, half-close,
backpressure, many connections, the listening side's claim and policy, and failures."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import udskit
from udskit import bridge

from ..conftest import READY_TIMEOUT, open_fds
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
    """A separate loop for the peers, so that they never share the bridge's."""
    with loop_thread("asyncio") as started:
        yield started


def _address(kind: str, sockdir: Path, name: str) -> str:
    if kind == "tcp":
        return "tcp:127.0.0.1:0"
    if kind == "abstract":
        return f"@udskit-test-{os.getpid()}-{name}-{time.monotonic_ns()}"
    if kind == "long":
        deep = sockdir / ("d" * 60) / ("e" * 60)
        deep.mkdir(parents=True, exist_ok=True)
        return str(deep / f"{name}.sock")
    return str(sockdir / f"{name}.sock")


@pytest.mark.parametrize(
    ("listen_kind", "target_kind"),
    [
        ("tcp", "path"),
        ("path", "tcp"),
        ("abstract", "path"),
        ("path", "abstract"),
        ("long", "long"),
        ("path", "path"),
    ],
)
def test_relays_both_ways_between_address_kinds(
    runner: LoopThread, servers: LoopThread, sockdir: Path, listen_kind: str, target_kind: str
) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 17)
    with (
        echo_server(servers, _address(target_kind, sockdir, "target")) as target,
        running_bridge(
            runner,
            _address(listen_kind, sockdir, "front"),
            target.address,
            allow=udskit.Policy.same_user_only() if listen_kind == "abstract" else None,
        ) as running,
    ):
        assert exchange(running.address, payload) == payload
        counters = stats(runner, running)
    assert counters.accepted == 1
    assert counters.bytes_up == counters.bytes_down == len(payload)


def test_half_close_from_the_client_keeps_the_response_flowing(
    runner: LoopThread, servers: LoopThread, sockdir: Path
) -> None:
    """An HTTP/1.0-style client: request, shutdown(SHUT_WR), then read the whole answer."""

    async def count_then_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received = await reader.read()  # until the client's end of stream
        writer.write(b"got %d bytes\n" % len(received) * 1000)
        await writer.drain()
        writer.close()

    server = StreamServer(servers, str(sockdir / "app.sock"), count_then_answer)
    try:
        with (
            running_bridge(runner, "tcp:127.0.0.1:0", server.address) as running,
            client_for(running.address) as sock,
        ):
            sock.sendall(b"x" * 100_000)
            sock.shutdown(socket.SHUT_WR)
            assert read_to_eof(sock) == b"got 100000 bytes\n" * 1000
    finally:
        server.close()


def test_half_close_from_the_server_keeps_the_request_flowing(
    runner: LoopThread, servers: LoopThread, sockdir: Path
) -> None:
    """The server says its piece and shuts its side; the client may still send."""
    received: list[int] = []
    done = threading.Event()

    async def greet_then_listen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello\n")
        writer.write_eof()
        received.append(len(await reader.read()))
        done.set()
        writer.close()

    server = StreamServer(servers, str(sockdir / "app.sock"), greet_then_listen)
    try:
        with (
            running_bridge(runner, str(sockdir / "front.sock"), server.address) as running,
            client_for(running.address) as sock,
        ):
            greeting = b""
            while not greeting.endswith(b"\n"):
                greeting += sock.recv(100)
            assert sock.recv(100) == b""  # the server's end of stream came through
            sock.sendall(b"y" * 500_000)  # and our direction is still open
            sock.shutdown(socket.SHUT_WR)
            assert done.wait(READY_TIMEOUT)
            assert read_to_eof(sock) == b""
    finally:
        server.close()
    assert greeting == b"hello\n"
    assert received == [500_000]


def test_many_concurrent_connections(
    runner: LoopThread, servers: LoopThread, sockdir: Path
) -> None:
    count = 150
    with (
        echo_server(servers, str(sockdir / "echo.sock")) as target,
        running_bridge(runner, "tcp:127.0.0.1:0", target.address) as running,
    ):
        clients = [client_for(running.address) for _ in range(count)]
        try:
            wait_for(lambda: stats(runner, running).active == count, "all connections")
            for i, sock in enumerate(clients):
                sock.sendall(b"client %d\n" % i)
                sock.shutdown(socket.SHUT_WR)
            answers = [read_to_eof(sock) for sock in clients]
        finally:
            for sock in clients:
                sock.close()
        assert answers == [b"client %d\n" % i for i in range(count)]
        wait_for(lambda: stats(runner, running).active == 0, "connections to end")


def test_backpressure_bounds_what_the_bridge_holds(
    runner: LoopThread, servers: LoopThread, sockdir: Path
) -> None:
    """A target that does not read: the bridge pauses the client instead of buffering."""
    size = 64 * 1024 * 1024
    payload = os.urandom(1024 * 1024) * 64
    may_read = threading.Event()
    digest: list[str] = []

    async def slow_reader(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.get_running_loop().run_in_executor(None, may_read.wait, READY_TIMEOUT)
        hasher = hashlib.sha256()
        while data := await reader.read(1 << 20):
            hasher.update(data)
        digest.append(hasher.hexdigest())
        writer.close()

    server = StreamServer(servers, str(sockdir / "slow.sock"), slow_reader)
    try:
        with running_bridge(runner, "tcp:127.0.0.1:0", server.address) as running:
            sock = client_for(running.address)
            sent = threading.Event()

            def send() -> None:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
                sent.set()

            sender = threading.Thread(target=send, daemon=True)
            sender.start()
            try:
                wait_for(lambda: stats(runner, running).paused >= 1, "reading to pause")
                held = stats(runner, running).buffered
                # One read beyond the high-water mark at most, far below what was sent.
                assert held <= bridge.RELAY_HIGH_WATER + 256 * 1024
                assert not sent.is_set()
                may_read.set()
                sender.join(READY_TIMEOUT)
                assert sent.is_set()
                wait_for(lambda: bool(digest), "the target to read everything")
            finally:
                may_read.set()
                sock.close()
    finally:
        server.close()
    assert digest == [hashlib.sha256(payload).hexdigest()]
    assert len(payload) == size


def test_target_down_costs_one_connection_and_one_log_line(
    runner: LoopThread, servers: LoopThread, sockdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    target = sockdir / "app.sock"
    caplog.set_level(logging.WARNING, logger="udskit")
    with running_bridge(runner, "tcp:127.0.0.1:0", str(target)) as running:
        with client_for(running.address) as sock:
            assert read_to_eof(sock) == b""  # closed, nothing relayed
        wait_for(lambda: stats(runner, running).failed == 1, "the failure to count")
        failures = [r.getMessage() for r in caplog.records if "cannot connect" in r.getMessage()]
        assert len(failures) == 1
        assert str(target) in failures[0]
        assert "no such file" in failures[0]
        # The bridge keeps serving: once the target is up, the next client goes through.
        with echo_server(servers, str(target)):
            assert exchange(running.address, b"back up") == b"back up"


def test_stale_target_is_explained(
    runner: LoopThread, sockdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    target = sockdir / "crashed.sock"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(target))  # bound, never listening, closed: what a crash leaves
    caplog.set_level(logging.WARNING, logger="udskit")
    with running_bridge(runner, "tcp:127.0.0.1:0", str(target)) as running:
        with client_for(running.address) as sock:
            assert read_to_eof(sock) == b""
        wait_for(lambda: stats(runner, running).failed == 1, "the failure to count")
    assert any("nothing is listening" in r.getMessage() for r in caplog.records)


def test_tcp_target_refused_is_reported(
    runner: LoopThread, sockdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))  # a port nobody listens on while we hold it
        port = placeholder.getsockname()[1]
        caplog.set_level(logging.WARNING, logger="udskit")
        with running_bridge(
            runner, str(sockdir / "front.sock"), f"tcp:127.0.0.1:{port}"
        ) as running:
            with client_for(running.address) as sock:
                assert read_to_eof(sock) == b""
            wait_for(lambda: stats(runner, running).failed == 1, "the failure to count")
    assert any("connection refused" in r.getMessage() for r in caplog.records)


def test_policy_refuses_other_users_before_reaching_the_target(
    runner: LoopThread, servers: LoopThread, sockdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="udskit")
    someone_else = udskit.Policy(uids={os.geteuid() + 1})
    with (
        echo_server(servers, str(sockdir / "echo.sock")) as target,
        running_bridge(
            runner, str(sockdir / "front.sock"), target.address, allow=someone_else
        ) as running,
    ):
        with client_for(running.address) as sock:
            try:
                sock.sendall(b"let me in")
                answer = read_to_eof(sock)
            except (BrokenPipeError, ConnectionResetError):  # refused before or after we sent
                answer = b""
            assert answer == b""
        counters = stats(runner, running)
    assert (counters.refused, counters.accepted) == (1, 0)
    assert any("refused peer" in r.getMessage() for r in caplog.records)


def test_policy_admits_allowed_users(
    runner: LoopThread, servers: LoopThread, sockdir: Path
) -> None:
    with (
        echo_server(servers, str(sockdir / "echo.sock")) as target,
        running_bridge(
            runner,
            str(sockdir / "front.sock"),
            target.address,
            allow=udskit.Policy(uids={os.geteuid()}),
        ) as running,
    ):
        assert exchange(running.address, b"welcome") == b"welcome"


def test_socket_file_mode_and_removal(
    runner: LoopThread, servers: LoopThread, sockdir: Path
) -> None:
    front = sockdir / "front.sock"
    with (
        echo_server(servers, str(sockdir / "echo.sock")) as target,
        running_bridge(runner, str(front), target.address, mode=0o660) as running,
    ):
        assert front.is_socket()
        assert front.stat().st_mode & 0o7777 == 0o660
        assert exchange(running.address, b"x") == b"x"
    assert not front.exists()


def test_listening_side_is_claimed_safely(runner: LoopThread, sockdir: Path) -> None:
    live = sockdir / "live.sock"
    with udskit.listen(live):
        with pytest.raises(udskit.AddressInUse, match="live server"):
            runner.call(bridge.start(str(live), "tcp:127.0.0.1:1"))
        assert live.is_socket()
    stale = sockdir / "stale.sock"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(stale))
    with running_bridge(runner, str(stale), "tcp:127.0.0.1:1") as running:
        assert running.address.path == str(stale)  # reclaimed
    assert not stale.exists()
    regular = sockdir / "notes.txt"
    regular.write_text("keep me")
    with pytest.raises(udskit.SocketFileError, match="never deletes"):
        runner.call(bridge.start(str(regular), "tcp:127.0.0.1:1"))
    assert regular.read_text() == "keep me"


def test_max_connections_holds_the_rest_in_the_backlog(
    runner: LoopThread, servers: LoopThread, sockdir: Path
) -> None:
    with (
        echo_server(servers, str(sockdir / "echo.sock")) as target,
        running_bridge(runner, "tcp:127.0.0.1:0", target.address, max_connections=2) as running,
    ):
        first, second = client_for(running.address), client_for(running.address)
        try:
            wait_for(lambda: stats(runner, running).active == 2, "two connections")
            third = client_for(running.address)  # queued by the kernel, not relayed
            try:
                third.sendall(b"third\n")
                third.shutdown(socket.SHUT_WR)
                first.sendall(b"ping")
                assert first.recv(4) == b"ping"  # the loop has seen the third by now
                assert stats(runner, running).accepted == 2
                first.close()  # a slot frees up: the third is accepted and relayed
                assert read_to_eof(third) == b"third\n"
                assert stats(runner, running).accepted == 3
            finally:
                third.close()
        finally:
            first.close()
            second.close()


def test_stop_ends_connections_and_leaks_nothing(
    runner: LoopThread, servers: LoopThread, sockdir: Path
) -> None:
    front = sockdir / "front.sock"

    def cycle() -> None:
        with echo_server(servers, str(sockdir / "echo.sock")) as target:
            running = runner.call(bridge.start(str(front), target.address))
            clients = [client_for(running.address) for _ in range(5)]
            try:
                wait_for(lambda: stats(runner, running).active == 5, "five connections")
                runner.call(running.aclose(grace=1.0))
                assert not front.exists()
                assert [read_to_eof(sock) for sock in clients] == [b""] * 5
                assert stats(runner, running).active == 0
            finally:
                for sock in clients:
                    sock.close()

    # The first cycle lets the event loop make its own lasting descriptors (uvloop opens
    # /dev/null once); the second must leave exactly as many open as there were before it.
    cycle()
    before = open_fds()
    cycle()
    # The echo server closes its ends on its own loop, asynchronously: wait for that, bounded.
    wait_for(lambda: open_fds() <= before, "descriptors to close")


@pytest.mark.parametrize(
    ("listen", "target", "message"),
    [
        ("tcp:127.0.0.1:0", "fd:3", "not a descriptor"),
        ("nope:x", "/tmp/x.sock", "unknown address scheme"),
        ("tcp:127.0.0.1:0", "tcp:127.0.0.1", "malformed tcp address"),
    ],
)
def test_bad_addresses(runner: LoopThread, listen: str, target: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        runner.call(bridge.start(listen, target))


def test_policy_on_a_tcp_listener_is_refused(runner: LoopThread) -> None:
    with pytest.raises(ValueError, match="TCP clients carry no credentials"):
        runner.call(
            bridge.start("tcp:127.0.0.1:0", "/tmp/x.sock", allow=udskit.Policy.same_user_only())
        )


@pytest.mark.parametrize("value", [0, -1, True, 1.5])
def test_bad_max_connections(runner: LoopThread, value: object) -> None:
    with pytest.raises(ValueError, match="max_connections"):
        runner.call(bridge.start("tcp:127.0.0.1:0", "/tmp/x.sock", max_connections=value))  # type: ignore[arg-type]


def test_connect_socket_reports_why(sockdir: Path) -> None:
    async def attempt(target: str) -> None:
        sock = await bridge.connect_socket(udskit.Address.parse(target))
        sock.close()

    with pytest.raises(udskit.ConnectError, match="no such file"):
        asyncio.run(attempt(str(sockdir / "missing.sock")))
    with pytest.raises(ValueError, match="descriptor"):
        asyncio.run(attempt("fd:0"))
