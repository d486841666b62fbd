"""The commands that hold many connections raise their open-file soft limit to the hard
limit: under the 1,024 a login shell or a systemd service starts with, a server would hold
about a thousand clients and keep the rest waiting. Here each starts under a soft limit of
SOFT, far below the clients it then serves."""

from __future__ import annotations

import os
import resource
import socket
import sys
import time
from pathlib import Path

import pytest

from tests.cli.conftest import COMMAND_TIMEOUT, Background, serve, wait_listening

#: The soft limit each command starts under.
SOFT = 64
#: Clients held at once by the server under test: several times SOFT.
CLIENTS = 4 * SOFT

#: ``udskit ARGV...`` under the open-file limits given first (soft, and hard or "-" for the
#: hard limit as it is).
_UNDER_LIMITS = """
import resource, runpy, sys
soft, hard = int(sys.argv[1]), sys.argv[2]
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1] if hard == "-" else int(hard)
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
sys.argv = ["udskit", *sys.argv[3:]]
runpy.run_module("udskit", run_name="__main__", alter_sys=True)
"""

_HARD = resource.getrlimit(resource.RLIMIT_NOFILE)[1]

#: The bridge's limit (soft and hard) in the test of its default max_connections: room
#: for some dozens of relays, fewer than BRIDGED clients.
BRIDGE_FILES = 200
BRIDGED = 150

pytestmark = pytest.mark.skipif(
    _HARD < 2 * CLIENTS + 64, reason=f"the hard open-file limit ({_HARD}) is too low"
)


def _start(
    started: list[Background],
    *argv: str | os.PathLike[str],
    limits: tuple[int, int | str] = (SOFT, "-"),
) -> Background:
    """``udskit ARGV...`` under ``limits`` (soft, hard; "-": the hard limit as it is)."""
    soft, hard = limits
    command = Background(
        [sys.executable, "-c", _UNDER_LIMITS, str(soft), str(hard), *map(os.fspath, argv)]
    )
    started.append(command)
    return command


def _open_files(pid: int) -> tuple[int, int]:
    """The soft and hard open-file limits of process ``pid``."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError(f"no open-file limit in /proc/{pid}/limits")


def _connect(client: socket.socket, path: Path, number: int) -> None:
    """Connect, waiting (bounded) while the listener's backlog is full: a Unix socket's
    non-blocking connect() fails at once then, and a blocking one would wait unbounded."""
    client.setblocking(False)
    deadline = time.monotonic() + COMMAND_TIMEOUT
    delay = 0.001
    while True:
        try:
            client.connect(os.fspath(path))
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise AssertionError(f"client {number}: the backlog stayed full") from None
        time.sleep(delay)  # back-off while the server accepts the others
        delay = min(2 * delay, 0.05)


def _echoed_by_all(path: Path, count: int = CLIENTS) -> None:
    """``count`` clients connected at once, each getting its own line back (in turn, each
    closed once it has its line)."""
    clients = []
    try:
        for number in range(count):
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            clients.append(client)
            _connect(client, path, number)
            client.settimeout(COMMAND_TIMEOUT)
            client.sendall(b"client %d\n" % number)
        for number, client in enumerate(clients):
            wanted = b"client %d\n" % number
            got = b""
            while len(got) < len(wanted):
                chunk = client.recv(len(wanted) - len(got))
                assert chunk, f"client {number}: the connection ended after {got!r}"
                got += chunk
            assert got == wanted
            client.close()
    finally:
        for client in clients:
            client.close()


def test_serve_holds_clients_beyond_the_soft_limit(
    sockdir: Path, background: list[Background]
) -> None:
    path = sockdir / "echo.sock"
    server = _start(background, "serve", "--echo", path)
    wait_listening(path, server.process)
    assert _open_files(server.pid) == (_HARD, _HARD)
    _echoed_by_all(path)


def test_bridge_relays_clients_beyond_the_soft_limit(
    sockdir: Path, background: list[Background]
) -> None:
    target = sockdir / "echo.sock"
    serve(background, target, "--echo")
    front = sockdir / "front.sock"
    bridge = _start(background, "bridge", front, target)
    wait_listening(front, bridge.process)
    assert _open_files(bridge.pid) == (_HARD, _HARD)
    _echoed_by_all(front)


def test_tap_raises_its_limit_too(sockdir: Path, background: list[Background]) -> None:
    path = sockdir / "echo.sock"
    serve(background, path, "--echo")
    tap = _start(background, "tap", path)
    tap.read_until(b"tapping", stream="stderr")
    assert _open_files(tap.pid) == (_HARD, _HARD)


def test_the_bridge_relays_only_what_its_open_files_allow_and_lets_the_rest_wait(
    sockdir: Path, background: list[Background]
) -> None:
    # Past its open files, the bridge accepted clients and then dropped them, for want of a
    # descriptor to reach the target with. By default it now relays as many as fit; the
    # others wait in the backlog, and are relayed as earlier ones leave.
    target = sockdir / "echo.sock"
    serve(background, target, "--echo")
    front = sockdir / "front.sock"
    bridge = _start(background, "bridge", front, target, limits=(BRIDGE_FILES, BRIDGE_FILES))
    wait_listening(front, bridge.process)
    _echoed_by_all(front, BRIDGED)
    assert bridge.stop() == 0
    assert "cannot connect" not in bridge.err, bridge.err
