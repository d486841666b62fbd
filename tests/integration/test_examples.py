"""Every example in ``examples/`` runs, as its own process, and does what it says.

Each demo runs with its temporary files sent to a private directory, which must be empty
afterwards. The halves of the client/server seeds also run in separate processes, the way
a user runs them in two terminals, and leave no socket or lock file behind.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import udskit
from tests.conftest import READY_TIMEOUT, wait_connectable

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

#: Bound on one example run: they take well under a second; this is for stalled machines.
RUN_TIMEOUT = 60.0

#: example file -> lines its demo must print (regular expressions, matched per line).
DEMOS: dict[str, list[str]] = {
    "s1_datagram_print_until_done.py": [
        r"server: 'hello' from pid \d+ \(uid \d+\)",
        r"server: 'DONE' from pid \d+",
        r"server: stopped; socket file removed: True",
    ],
    "s2_datagram_client.py": [
        r"client: sent 'one line, one datagram'",
        r"client: sent 'DONE'",
        r"server: received 'hello'",
        r"server: received 'DONE'",
    ],
    "s3_stream_client_small_chunks.py": [
        r"client: sent 44 bytes",
        r"client: received b'This is the",
        r"client: the echo is complete and equal: True",
    ],
    "s4_socketpair_fork.py": [
        r"child \d+: message from parent: 'Hello from parent!'",
        r"parent \d+: response from child \d+: 'Hello from child!'",
    ],
    "s5_thank_you_server.py": [
        r"client 1: the server replied 'thank you!'",
        r"client 3: the server replied 'thank you!'",
        r"server: 'message from client 2' from pid=\d+ uid=\d+ gid=\d+",
        r"server: stopped; socket file removed: True",
    ],
    "s6_seqpacket_boundaries.py": [
        r"server: one message of 5000 bytes",
        r"server: one message of 1 bytes",
        r"client: sent 4 messages, got 4 back",
        r"client: boundaries kept: True",
    ],
    "s7_uppercase_peercred.py": [
        rf"server: client pid=\d+ uid={os.getuid()} gid=\d+ .*bound at .*/client\.sock",
        r"client: sent 'hello', got back 'HELLO'",
        r"client: .*/client\.sock removed on close: True",
    ],
    "s8_echo_refuses_live_socket.py": [
        r"second server refused: .*a live server owns it: pid \d+ .*uid \d+",
        r"client: sent 'My name is Tom!', echo 'My name is Tom!'",
        r"server stopped; socket file removed: True",
        r"stale socket file reclaimed",
        r"non-socket refused: .*never deletes what is not a socket",
        r"the regular file is untouched: True",
    ],
}


def environment(tmp: Path) -> dict[str, str]:
    """The environment for an example: temporary files (including a datagram client's
    private reply directory) go to ``tmp``."""
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    env["TMPDIR"] = os.fspath(tmp)
    return env


def run(example: str, *args: str, tmp: Path, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, os.fspath(EXAMPLES / example), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=environment(tmp),
        cwd=tmp,
        timeout=RUN_TIMEOUT,
        check=False,
    )


def assert_lines(output: str, patterns: list[str]) -> None:
    lines = output.splitlines()
    for pattern in patterns:
        assert any(re.search(pattern, line) for line in lines), f"no line {pattern!r} in:\n{output}"


def assert_gone(*paths: Path) -> None:
    for path in paths:
        for leftover in (path, Path(f"{path}.lock")):
            assert not os.path.lexists(leftover), f"{leftover} was left behind"


@contextmanager
def started(example: str, *args: str, tmp: Path) -> Iterator[subprocess.Popen[str]]:
    """An example running in the background; killed (by pid) if the test fails early."""
    process = subprocess.Popen(
        [sys.executable, os.fspath(EXAMPLES / example), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment(tmp),
        cwd=tmp,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=RUN_TIMEOUT)


def stop(process: subprocess.Popen[str]) -> tuple[str, str]:
    """SIGTERM a server example (it must have answered a client first, so its handlers are
    installed) and return its output once it has exited cleanly."""
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=RUN_TIMEOUT)
    assert process.returncode == 0, f"exit {process.returncode}\n{out}\n{err}"
    assert err == "", err
    return out, err


# -- every demo ------------------------------------------------------------------------------
def test_every_example_has_a_test() -> None:
    scripts = {p.name for p in EXAMPLES.glob("s[0-9]*.py")}
    assert scripts == set(DEMOS)


@pytest.mark.parametrize("example", sorted(DEMOS))
def test_demo(example: str, sockdir: Path) -> None:
    result = run(example, tmp=sockdir)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert result.stderr == ""
    assert_lines(result.stdout, DEMOS[example])
    assert os.listdir(sockdir) == [], "the demo left files in its temporary directory"


def test_datagram_client_skips_empty_lines(sockdir: Path) -> None:
    result = run("s2_datagram_client.py", tmp=sockdir)
    assert "received ''" not in result.stdout


# -- the halves, in two processes ---------------------------------------------------------------
def test_s1_server_and_s2_client(sockdir: Path) -> None:
    path = sockdir / "print.sock"
    with started("s1_datagram_print_until_done.py", os.fspath(path), tmp=sockdir) as server:
        wait_connectable(path, socket.SOCK_DGRAM)
        client = run(
            "s2_datagram_client.py", os.fspath(path), tmp=sockdir, stdin="hello\n\nworld\nDONE\n"
        )
        assert client.returncode == 0, client.stderr
        assert_lines(client.stdout, ["client: sent 'hello'", "client: sent 'DONE'"])
        out, err = server.communicate(timeout=RUN_TIMEOUT)  # DONE stops it
        assert server.returncode == 0, err
    assert_lines(
        out,
        [
            rf"server: listening on {re.escape(os.fspath(path))}",
            r"server: 'world' from pid \d+",
            r"server: stopped; socket file removed: True",
        ],
    )
    assert_gone(path)
    assert os.listdir(sockdir) == []  # nor the client's private reply directory


def test_s2_client_without_a_server(sockdir: Path) -> None:
    result = run("s2_datagram_client.py", os.fspath(sockdir / "none.sock"), tmp=sockdir)
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot connect to ")
    assert "Traceback" not in result.stderr


def test_s3_client_against_a_raw_echo_server(sockdir: Path) -> None:
    path = sockdir / "echo.sock"

    def echo(channel: udskit.Channel) -> None:
        for data in channel:
            channel.send(data)

    with udskit.Server(path, echo, framing="raw") as server:
        thread = threading.Thread(target=server.serve_forever)
        thread.start()
        try:
            result = run(
                "s3_stream_client_small_chunks.py", os.fspath(path), "ping pong", tmp=sockdir
            )
        finally:
            server.stop()
            thread.join(READY_TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert_lines(result.stdout, [r"client: sent 9 bytes", r"complete and equal: True"])


def test_s5_server_alone(sockdir: Path) -> None:
    path = sockdir / "thanks.sock"
    with started("s5_thank_you_server.py", os.fspath(path), tmp=sockdir) as server:
        wait_connectable(path)
        for text in (b"first", b"second"):
            with udskit.connect(path, timeout=READY_TIMEOUT) as client:
                client.send(text)
                assert client.recv() == b"thank you!"
        out, _ = stop(server)
    assert_lines(out, [r"server: 'second' from pid=", r"socket file removed: True"])
    assert_gone(path)


def test_s7_server_and_client(sockdir: Path) -> None:
    path, client_path = sockdir / "upper.sock", sockdir / "client.sock"
    with started("s7_uppercase_peercred.py", "serve", os.fspath(path), tmp=sockdir) as server:
        wait_connectable(path)
        result = run(
            "s7_uppercase_peercred.py", "connect", os.fspath(path), os.fspath(client_path),
            "abc", "x y", tmp=sockdir,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert_lines(
            result.stdout,
            [r"got back 'ABC'", r"got back 'X Y'", r"client\.sock removed on close: True"],
        )
        out, _ = stop(server)
    assert_lines(out, [rf"server: client pid=\d+ uid={os.getuid()} .*bound at .*client\.sock"])
    assert_gone(path, client_path)


def test_s7_usage(sockdir: Path) -> None:
    result = run("s7_uppercase_peercred.py", "bogus", tmp=sockdir)
    assert result.returncode == 1
    assert "python s7_uppercase_peercred.py serve PATH" in result.stderr


def test_s8_refuses_live_reclaims_stale_spares_non_socket(sockdir: Path) -> None:
    path = sockdir / "echo.sock"
    example = "s8_echo_refuses_live_socket.py"
    with started(example, "serve", os.fspath(path), tmp=sockdir) as first:
        wait_connectable(path)
        second = run(example, "serve", os.fspath(path), tmp=sockdir)
        assert second.returncode == 1
        assert re.match(rf"error: .*a live server owns it: pid {first.pid}\b", second.stderr)
        client = run(example, "connect", os.fspath(path), "Hello, world!", "again", tmp=sockdir)
        assert client.returncode == 0, client.stderr
        assert_lines(client.stdout, [r"echo 'Hello, world!'", r"sent 'again', echo 'again'"])
        stop(first)
    assert_gone(path)

    with socket.socket(socket.AF_UNIX) as crashed:  # a stale socket file
        crashed.bind(os.fspath(path))
    with started(example, "serve", os.fspath(path), tmp=sockdir) as reclaimed:
        wait_connectable(path)
        client = run(example, "connect", os.fspath(path), "still here", tmp=sockdir)
        assert client.returncode == 0, client.stderr
        stop(reclaimed)
    assert_gone(path)

    path.write_text("precious")
    refused = run(example, "serve", os.fspath(path), tmp=sockdir)
    assert refused.returncode == 1
    assert "never deletes what is not a socket" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert path.read_text() == "precious"
