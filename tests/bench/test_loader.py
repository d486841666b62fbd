"""The many-clients load generator against real echo servers, good and faulty."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from udskit.bench.loader import _connect_unix, load
from udskit.bench.wire import Job


def _go() -> None:
    """The runner's go, at once (the loader would otherwise read it from stdin)."""


def _job(path: Path, clients: int, count: int = 200) -> Job:
    return Job("test", "udskit.bench.loader", "load", str(path), size=64, count=count,
               seconds=5.0, clients=clients)  # fmt: skip


@contextmanager
def echo_server(path: Path, clients: int, answer: Callable[[bytes], bytes]) -> Iterator[None]:
    """``clients`` connections, each served by a thread that sends ``answer(data)``."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(clients)
    threads = []

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                reply = answer(data)
                if not reply:
                    return
                conn.sendall(reply)

    def accept() -> None:
        for _ in range(clients):
            conn, _ = listener.accept()
            thread = threading.Thread(target=serve, args=(conn,))
            thread.start()
            threads.append(thread)

    acceptor = threading.Thread(target=accept)
    acceptor.start()
    try:
        yield
    finally:
        acceptor.join(timeout=10)
        for thread in threads:
            thread.join(timeout=10)
        listener.close()


def test_every_client_is_served_and_timed(sockdir: Path, no_fd_leak: None) -> None:
    path = sockdir / "echo.sock"
    with echo_server(path, 5, lambda data: data):
        result = load(_job(path, 5), go=_go)
    assert result.errors == 0, result.first_error
    assert result.clients == 5
    # The cap is reached, then every client's message in flight is still answered.
    assert 200 <= result.messages <= 200 + 5 - 1
    assert len(result.samples_ns) == result.messages
    assert all(sample > 0 for sample in result.samples_ns)
    assert result.seconds > 0


def test_the_go_comes_once_every_client_is_connected_and_echoed(
    sockdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = sockdir / "echo.sock"
    echoes = 0

    def answer(data: bytes) -> bytes:
        nonlocal echoes
        echoes += 1
        return data

    said_before_go: list[str] = []
    seen_before_go: list[int] = []

    def go() -> None:
        said_before_go.append(capsys.readouterr().out)
        seen_before_go.append(echoes)

    with echo_server(path, 4, answer):
        result = load(_job(path, 4), go=go)
    assert said_before_go == ['{"connected": 4}\n']
    assert seen_before_go == [4]  # one untimed echo each, none of the timed ones yet
    assert result.errors == 0, result.first_error
    assert result.messages >= 200


def test_a_wrong_echo_is_an_error(sockdir: Path, no_fd_leak: None) -> None:
    path = sockdir / "echo.sock"
    with echo_server(path, 3, lambda data: data[:-1] + b"!"):
        result = load(_job(path, 3), go=_go)
    assert result.errors == 3
    assert result.first_error == "an echo differed from the message sent"


def test_a_server_that_hangs_up_is_an_error(sockdir: Path, no_fd_leak: None) -> None:
    path = sockdir / "echo.sock"
    with echo_server(path, 2, lambda data: b""):
        result = load(_job(path, 2), go=_go)
    assert result.errors == 2
    assert result.first_error in (
        "the server closed a client's connection",
        "receiving an echo: [Errno 104] Connection reset by peer",
    )


def test_no_server_means_no_client_connected(sockdir: Path, no_fd_leak: None) -> None:
    result = load(_job(sockdir / "absent.sock", 4), go=_go)
    assert (result.errors, result.messages) == (4, 0)
    assert result.first_error.startswith("connected 0 of 4 clients, then: ")
    assert "No such file or directory" in result.first_error


def test_too_few_descriptors_end_the_loader_with_the_reason(
    sockdir: Path, capsys: pytest.CaptureFixture[str], restore_nofile: tuple[int, int]
) -> None:
    with pytest.raises(SystemExit) as ended:
        load(_job(sockdir / "x.sock", 10**9), go=_go)
    assert ended.value.code == 0  # not measured here, which is no failure of the contender
    said = capsys.readouterr()
    assert "RLIMIT_NOFILE" in said.err
    assert json.loads(said.out)["not_measured"] == said.err.strip()


def _full_listener(path: Path) -> tuple[socket.socket, socket.socket]:
    """A listener whose backlog is full: backlog 0, and one connection never accepted
    (Linux refuses the next one once more than the backlog is queued)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(0)
    queued = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    queued.connect(str(path))
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    with probe, pytest.raises(BlockingIOError):  # EAGAIN: the backlog is full indeed
        probe.connect(str(path))
    return listener, queued


def test_a_full_backlog_is_waited_out_within_the_stall_bound(sockdir: Path) -> None:
    path = sockdir / "full.sock"
    listener, queued = _full_listener(path)
    with listener, queued:
        with pytest.raises(TimeoutError, match="accepted no connection for 10 s"):
            _connect_unix(str(path), time.monotonic() + 0.2)
        # Once the server accepts, the waiting client gets in.
        accepted: list[socket.socket] = []
        acceptor = threading.Thread(target=lambda: accepted.append(listener.accept()[0]))
        acceptor.start()
        try:
            with _connect_unix(str(path), time.monotonic() + 30) as sock:
                assert sock.getpeername() == str(path)
        finally:
            acceptor.join(timeout=10)
            for conn in accepted:
                conn.close()
