"""``udskit wait``: ready means accepting connections, not merely existing."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from tests.cli.conftest import UDSKIT, Background, one_line_error, serve, udskit


def test_ready_server(sockdir: Path, background: list[Background]) -> None:
    path = sockdir / "r.sock"
    serve(background, path, "--echo")
    assert udskit("wait", path).code == 0


def test_waits_for_a_server_that_starts_later(sockdir: Path, background: list[Background]) -> None:
    path = sockdir / "later.sock"
    waiter = Background([*UDSKIT, "wait", "--timeout", "20", path])
    background.append(waiter)
    serve(background, path, "--type", "dgram", "--echo")
    assert waiter.wait() == 0


def test_timeout_names_the_last_reason(sockdir: Path) -> None:
    line = one_line_error(udskit("wait", "--timeout", "0.1", sockdir / "never.sock"), 1)
    assert "did not accept a connection within 0.1 s" in line
    assert "no such file" in line


def test_a_stale_file_is_not_ready(sockdir: Path) -> None:
    path = sockdir / "stale.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(os.fspath(path))
    sock.close()
    line = one_line_error(udskit("wait", "--timeout", "0.1", path), 1)
    assert "nothing is listening" in line


def test_a_bound_but_not_listening_socket_is_not_ready(sockdir: Path) -> None:
    path = sockdir / "bound.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(os.fspath(path))  # exists, alive, but no listen() yet
        result = udskit("wait", "--timeout", "0.1", path)
        assert result.code == 1
        sock.listen()
        assert udskit("wait", "--timeout", "5", path).code == 0


def test_a_regular_file_is_not_ready(sockdir: Path) -> None:
    path = sockdir / "file"
    path.write_text("x")
    line = one_line_error(udskit("wait", "--timeout", "0", path), 1)
    assert "not a socket" in line


def test_wrong_type(sockdir: Path, background: list[Background]) -> None:
    path = sockdir / "d.sock"
    serve(background, path, "--type", "dgram", "--echo")
    assert udskit("wait", "--type", "dgram", path).code == 0
    line = one_line_error(udskit("wait", "--type", "stream", "--timeout", "0.1", path), 1)
    assert "another type" in line


def test_abstract(background: list[Background]) -> None:
    name = f"@udskit-wait-{os.getpid()}"
    server = Background([*UDSKIT, "serve", "--echo", name])
    background.append(server)
    assert udskit("wait", "--timeout", "20", name).code == 0
    assert server.stop() == 0


def test_fd_addresses_are_refused() -> None:
    line = one_line_error(udskit("wait", "fd:3"), 1)
    assert "wait for a path, @name or tcp:HOST:PORT" in line
