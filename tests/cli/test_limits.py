"""The commands that hold many connections raise their open-file soft limit to the hard
limit (a server once it needs to, a relay as it starts): under the 1,024 a login shell or a
systemd service starts with, a server would hold about a thousand clients and keep the rest
waiting. Here each starts under a soft limit of SOFT, far below the clients it serves."""

from __future__ import annotations

import os
import resource
import socket
import sys
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

#: A relay's limit (soft and hard) in the tests of its default cap: room for some dozens of
#: relays, far fewer than BRIDGED clients, while those beyond them fit in the backlog (128).
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


def _echoed_by_all(path: Path, count: int = CLIENTS) -> None:
    """``count`` clients connected at once (all before any sends: a relay finds them
    queued together), each getting its own line back (in turn, each closed once it has
    its line)."""
    clients = []
    try:
        for _ in range(count):
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            clients.append(client)
            # Blocking, as most clients: it waits while the backlog is full (a non-blocking
            # one fails at once there); the test's timeout bounds it.
            client.connect(os.fspath(path))
        for number, client in enumerate(clients):
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
    _echoed_by_all(path)
    assert _open_files(server.pid) == (_HARD, _HARD)  # raised once it needed more
    assert server.stop() == 0
    assert f"raised this process's open-file limit to {_HARD}" in server.err


#: Clients of the --exec test: each takes three open files (its socket and the command's
#: two pipes), so that these need several times SOFT.
EXEC_CLIENTS = SOFT
#: Open files a server of --exec is left, beyond those it has open once it listens: room
#: for a client's socket and one pipe, not for its command's second pipe.
EXEC_ROOM = 3


def _exec_server(background: list[Background], path: Path, *, at_hard_limit: bool) -> Background:
    """``udskit serve --exec cat PATH``, listening, then left EXEC_ROOM open files beyond
    those it has (room for a client's socket and one pipe: its command is what runs out),
    as its soft limit, and its hard limit too if ``at_hard_limit``."""
    server = _start(background, "serve", "--exec", "cat", path)
    wait_listening(path, server.process)
    room = len(os.listdir(f"/proc/{server.pid}/fd")) + EXEC_ROOM
    resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (room, room if at_hard_limit else _HARD))
    return server


def test_serve_exec_holds_clients_beyond_the_soft_limit(
    sockdir: Path, background: list[Background]
) -> None:
    # A command's two pipes are more open files than the client's socket: the server ran
    # out of them in starting the command, not in accept(2), and dropped each client from
    # there on ("too many open files"), its soft limit never raised.
    path = sockdir / "exec.sock"
    server = _exec_server(background, path, at_hard_limit=False)
    _echoed_by_all(path, EXEC_CLIENTS)
    assert _open_files(server.pid) == (_HARD, _HARD)
    assert server.stop() == 0
    assert "too many open files" not in server.err, server.err
    assert f"raised this process's open-file limit to {_HARD}" in server.err


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


def test_tap_relays_clients_beyond_the_soft_limit(
    sockdir: Path, background: list[Background]
) -> None:
    path = sockdir / "echo.sock"
    serve(background, path, "--echo")
    tap = _start(background, "tap", path)
    tap.read_until(b"tapping", stream="stderr")
    _echoed_by_all(path)
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
    assert "no descriptor left" not in bridge.err, bridge.err


def test_the_tap_relays_only_what_its_open_files_allow_and_lets_the_rest_wait(
    sockdir: Path, background: list[Background]
) -> None:
    path = sockdir / "echo.sock"
    serve(background, path, "--echo")
    tap = _start(background, "tap", path, limits=(BRIDGE_FILES, BRIDGE_FILES))
    tap.read_until(b"tapping", stream="stderr")
    _echoed_by_all(path, BRIDGED)
    assert tap.stop() == 0
    # Past its open files, a client the tap had accepted could find no descriptor to reach
    # the server with, and was dropped; now the tap accepts no more than its files allow.
    assert "no descriptor left" not in tap.err, tap.err
    assert "cannot connect" not in tap.err, tap.err


def _answered_from_senders_of_their_own(path: Path, directory: Path, count: int) -> None:
    """``count`` datagram clients, each bound to a name of its own (a sender the tap gives
    a socket of its own) and each getting its datagram back, in turn."""
    for number in range(count):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client:
            client.bind(os.fspath(directory / f"c{number}"))
            client.settimeout(COMMAND_TIMEOUT)
            client.sendto(b"sender %d" % number, os.fspath(path))
            assert client.recv(64) == b"sender %d" % number, f"sender {number}"


def test_the_datagram_tap_keeps_a_socket_per_sender_only_while_its_open_files_allow(
    sockdir: Path, background: list[Background]
) -> None:
    # The datagram tap opened a socket for each new sender up to 1,024, whatever its open
    # files: past them it relayed nothing more, and at the stop had no descriptor left to
    # put the server's socket back with ("could not restore"). It raises its soft limit as
    # the stream tap does, and closes its least recent sender's socket before it runs out.
    path = sockdir / "dgram.sock"
    serve(background, path, "--echo", "--type", "dgram")
    tap = _start(background, "tap", path, limits=(BRIDGE_FILES, BRIDGE_FILES))
    tap.read_until(b"tapping", stream="stderr")
    _answered_from_senders_of_their_own(path, sockdir, BRIDGE_FILES + 50)
    assert tap.stop() == 0
    assert "could not restore" not in tap.err, tap.err
    assert f"restored {path}: the server's socket is back in place" in tap.err


def test_serve_exec_out_of_descriptors_at_its_hard_limit_says_what_to_do(
    sockdir: Path, background: list[Background]
) -> None:
    # It said "pid N: too many open files": neither what failed nor what to do.
    path = sockdir / "exec.sock"
    server = _exec_server(background, path, at_hard_limit=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(os.fspath(path))
        said = server.read_until(b"cannot start the --exec command", stream="stderr")
    assert server.stop() == 0
    line = next(s for s in (said.decode() + server.err).splitlines() if "--exec command" in s)
    assert line.endswith(
        ": cannot start the --exec command: too many open files; this process has no "
        "descriptor left (raise its open-file limit: ulimit -n, or LimitNOFILE= under systemd)"
    ), line
