"""``udskit bridge`` as a process: readiness line, relaying, clean stop on SIGTERM/SIGINT,
one-line errors, and a target that is down."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import READY_TIMEOUT
from .cli import bridge_process, run_udskit, udskit_command
from .peers import LoopThread, client_for, echo_server, exchange, loop_thread, read_to_eof


@pytest.fixture
def servers() -> Iterator[LoopThread]:
    with loop_thread("asyncio") as started:
        yield started


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_bridge_relays_then_stops_cleanly(servers: LoopThread, sockdir: Path, signum: int) -> None:
    front = sockdir / "front.sock"
    with (
        echo_server(servers, str(sockdir / "echo.sock")) as target,
        bridge_process("--mode", "660", str(front), str(target.address)) as (process, where),
    ):
        assert where.path == str(front)
        assert front.stat().st_mode & 0o777 == 0o660
        assert exchange(where, b"through the bridge") == b"through the bridge"
        code, err = process.stop(signum)
    assert code == 0, err
    assert not front.exists()
    assert "Traceback" not in err


def test_tcp_listener_reports_the_port_it_got(servers: LoopThread, sockdir: Path) -> None:
    with (
        echo_server(servers, str(sockdir / "echo.sock")) as target,
        bridge_process("tcp:127.0.0.1:0", str(target.address)) as (process, where),
    ):
        assert where.kind == "tcp"
        assert where.port > 0
        assert exchange(where, b"tcp to unix") == b"tcp to unix"
        code, _ = process.stop()
    assert code == 0


def test_target_down_is_one_line_per_connection_and_serving_goes_on(
    servers: LoopThread, sockdir: Path
) -> None:
    target = sockdir / "app.sock"
    with bridge_process("tcp:127.0.0.1:0", str(target)) as (process, where):
        for _ in range(2):
            with client_for(where) as sock:
                assert read_to_eof(sock) == b""
        with echo_server(servers, str(target)):
            assert exchange(where, b"up again") == b"up again"
        code, err = process.stop()
    assert code == 0
    failures = [line for line in err.splitlines() if "cannot connect" in line]
    assert len(failures) == 2, err
    assert all(str(target) in line and "no such file" in line for line in failures)
    assert "Traceback" not in err


def test_target_of_another_type_is_named_without_an_option(sockdir: Path) -> None:
    # bridge has no --type: the message must not tell the user to pass one
    target = sockdir / "dgram.sock"
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server,
        bridge_process("tcp:127.0.0.1:0", str(target)) as (process, where),
    ):
        server.bind(str(target))
        with client_for(where) as sock:
            assert read_to_eof(sock) == b""
        code, err = process.stop()
    assert code == 0
    [failure] = [line for line in err.splitlines() if "cannot connect" in line]
    assert f"{target}: it is not a stream socket" in failure
    assert "--type" not in failure


def test_out_of_descriptors_is_one_plain_line(servers: LoopThread, sockdir: Path) -> None:
    # The relay's limit lowered to what it holds plus one: the client's connection takes the
    # last descriptor, and the socket to the target cannot be made.
    with (
        echo_server(servers, str(sockdir / "echo.sock")) as target,
        bridge_process("tcp:127.0.0.1:0", str(target.address)) as (process, where),
    ):
        held = len(os.listdir(f"/proc/{process.pid}/fd"))
        resource.prlimit(process.pid, resource.RLIMIT_NOFILE, (held + 1, held + 1))
        with client_for(where) as sock:
            assert read_to_eof(sock) == b""
        code, err = process.stop()
    assert code == 0
    [failure] = [line for line in err.splitlines() if "cannot connect" in line]
    assert failure.endswith(f"cannot connect to {target.address}: too many open files"), err
    assert "Errno" not in err


def test_allow_uid_refuses_others(servers: LoopThread, sockdir: Path) -> None:
    front = sockdir / "front.sock"
    other = str(os.geteuid() + 1)
    with (
        echo_server(servers, str(sockdir / "echo.sock")) as target,
        bridge_process("--allow-uid", other, str(front), str(target.address)) as (process, where),
    ):
        with client_for(where) as sock:
            try:
                answer = read_to_eof(sock)
            except ConnectionResetError:
                answer = b""
        assert answer == b""
        code, err = process.stop()
    assert code == 0
    assert f"refused peer pid={os.getpid()}" in err


def test_allow_uid_admits_the_named_user(servers: LoopThread, sockdir: Path) -> None:
    with (
        echo_server(servers, str(sockdir / "echo.sock")) as target,
        bridge_process(
            "--allow-uid", str(os.geteuid()), str(sockdir / "front.sock"), str(target.address)
        ) as (_, where),
    ):
        assert exchange(where, b"me") == b"me"


def test_live_socket_is_not_taken(sockdir: Path) -> None:
    busy = sockdir / "busy.sock"
    with socket.socket(socket.AF_UNIX) as owner:
        owner.bind(str(busy))
        owner.listen()
        result = run_udskit("bridge", str(busy), "tcp:127.0.0.1:1")
    err = result.stderr.decode()
    assert result.returncode == 1
    assert err.count("\n") == 1, err
    assert "a live server owns it" in err
    assert f"pid {os.getpid()}" in err
    assert busy.is_socket()


@pytest.mark.parametrize(
    "spelling", ["{dir}/front.sock", "./front.sock", "unix:{dir}/front.sock", "@{dir}/front"]
)
def test_bridge_to_itself_is_refused(sockdir: Path, spelling: str) -> None:
    # Relaying LISTEN to itself accepts its own connections until the descriptors run out.
    listen = spelling.format(dir=sockdir)
    target = f"@{sockdir}/front" if listen.startswith("@") else str(sockdir / "front.sock")
    result = subprocess.run(
        udskit_command("bridge", listen, target),
        cwd=sockdir,
        capture_output=True,
        timeout=READY_TIMEOUT * 2,
        check=False,
    )
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert err.count("\n") == 1, err
    assert "to itself" in err
    assert "Traceback" not in err
    assert list(sockdir.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--allow-uid", "0", "tcp:127.0.0.1:0", "/x.sock"], 2, "TCP clients carry no credentials"),
        (
            ["--owner", "0", "@udskit-no-file", "/x.sock"],
            2,
            "--owner sets the owner of a socket file",
        ),
        (["--allow-uid", "no-such-user-here", "/tmp/a.sock", "/x.sock"], 2, "unknown user"),
        (["--mode", "999", "/tmp/a.sock", "/x.sock"], 2, "not an octal permission number"),
        (["tcp:127.0.0.1:0", "fd:3"], 2, "not a descriptor"),
        (["tcp:127.0.0.1", "/x.sock"], 2, "argument LISTEN: malformed tcp address"),
        (["/tmp/a.sock", "gopher:x"], 2, "argument TARGET: unknown address scheme"),
        (["--max-connections", "0", "tcp:127.0.0.1:0", "/x.sock"], 2, "must be at least 1"),
    ],
)
def test_bad_arguments_are_one_line(args: list[str], code: int, message: str) -> None:
    result = run_udskit("bridge", *args)
    err = result.stderr.decode()
    assert result.returncode == code, err
    assert message in err
    assert "Traceback" not in err
