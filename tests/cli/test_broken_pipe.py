"""A stdout whose reader goes away (``udskit ... | head -1``): every command stops, says
nothing, and ends killed by SIGPIPE, as ``cat`` does there (a shell shows 141). Real pipes:
the test reads the first byte, as head does, and closes its end."""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

import h11

from tests.bridge.httpd import read_request_head, scripted_server
from tests.cli.conftest import COMMAND_TIMEOUT, UDSKIT, Background, serve, wait_listening

#: The smallest pipe (one page): a command whose output is over it cannot have written
#: everything before the reader goes away, whatever the machine's default pipe size.
PIPE_SIZE = 4096

#: Output far beyond PIPE_SIZE.
MUCH = 256 * 1024


def _first_byte_then_close(*args: str | os.PathLike[str], stdin: bytes = b"") -> tuple[int, str]:
    """Run ``udskit ARGS`` with its stdout a pipe; read one byte and close the pipe, as
    ``head -c 1`` does. The exit status (negative: the signal) and stderr."""
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    with tempfile.TemporaryFile() as source:
        source.write(stdin)
        source.seek(0)
        process = subprocess.Popen(
            [*UDSKIT, *map(os.fspath, args)],
            stdin=source,
            stdout=write_end,
            stderr=subprocess.PIPE,
        )
    os.close(write_end)
    try:
        assert os.read(read_end, 1)
    finally:
        os.close(read_end)
    try:
        _, err = process.communicate(timeout=COMMAND_TIMEOUT)
    finally:
        process.kill()  # a command that hung: the test fails (TimeoutExpired) and leaves none
        process.wait()
    return process.returncode, err.decode(errors="replace")


def test_http_ends_as_cat_does(sockdir: Path) -> None:
    # It exited 0 (its writes stopped quietly): `set -o pipefail` saw success.
    def big_answer(conn: socket.socket, stopping: threading.Event) -> None:
        http, _ = read_request_head(conn)
        headers = [("Content-Length", str(MUCH))]
        conn.sendall(http.send(h11.Response(status_code=200, headers=headers)) or b"")
        conn.sendall(http.send(h11.Data(data=b"y" * MUCH)) or b"")

    with scripted_server(os.fspath(sockdir / "http.sock"), big_answer) as address:
        assert _first_byte_then_close("http", str(address), "/") == (-signal.SIGPIPE, "")


def test_connect_ends_as_cat_does(sockdir: Path, background: list[Background]) -> None:
    path = sockdir / "echo.sock"
    serve(background, path, "--echo")
    lines = b"x" * 99 + b"\n"
    assert _first_byte_then_close("connect", path, stdin=lines * (MUCH // 100)) == (
        -signal.SIGPIPE,
        "",
    )


def test_send_stops_at_once_and_ends_as_cat_does(
    sockdir: Path, background: list[Background]
) -> None:
    # It sent every message and exited 0.
    path = sockdir / "lines.sock"
    server = serve(background, path, "--echo", "--framing", "lines", "-x")
    messages = ["m" * 1000] * (MUCH // 1000)
    done = _first_byte_then_close("send", "--reply", "--framing", "lines", path, *messages)
    assert done == (-signal.SIGPIPE, "")
    server.stop()
    received = [line for line in server.err.splitlines() if line.startswith("<")]
    assert 0 < len(received) <= PIPE_SIZE // 1000 + 2  # what the pipe held, and no more


def test_pair_ends_as_cat_does_and_so_does_its_command(sockdir: Path) -> None:
    # It waited for ever for the command, which waited for it to read.
    done = _first_byte_then_close("pair", "--", "sh", "-c", "exec yes 2>/dev/null >&$UDSKIT_FD")
    assert done == (-signal.SIGPIPE, "")


def test_print_to_a_closed_pipe_ends_as_cat_does(sockdir: Path) -> None:
    # print() (bench --list): it said "udskit bench: broken pipe" and exited 1.
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone before the first line
    try:
        done = subprocess.run(
            [*UDSKIT, "bench", "--list"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (-signal.SIGPIPE, b"")


def test_serve_print_cleans_up_then_ends_as_cat_does(sockdir: Path) -> None:
    # A server: it says why it stops, and removes its socket file before the signal.
    path = sockdir / "print.sock"
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        server = subprocess.Popen(
            [*UDSKIT, "serve", "--print", os.fspath(path)],
            stdout=write_end,
            stderr=subprocess.PIPE,
        )
    finally:
        os.close(write_end)
    try:
        wait_listening(path, server)
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(os.fspath(path))
            client.sendall(b"hello\n")
        _, err = server.communicate(timeout=COMMAND_TIMEOUT)
    finally:
        server.kill()
        server.wait()
    assert server.returncode == -signal.SIGPIPE
    assert err == b"udskit: stdout was closed (nobody reads it any more): stopping\n"
    assert not path.exists()


def test_demo_stops_cleans_up_and_ends_as_cat_does(tmp_path: Path) -> None:
    # It ran its eight scenarios for no one and exited 0.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [*UDSKIT, "demo"],
            env={**os.environ, "TMPDIR": os.fspath(tmp_path)},
            stdout=write_end,
            stderr=subprocess.PIPE,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (-signal.SIGPIPE, b"")
    assert list(tmp_path.iterdir()) == []  # its directory removed before the signal


#: A program that embeds the CLI: ``main`` twice in one process, the first time with a
#: stdout whose reader has gone. What it prints on stderr tells how far it got.
_EMBEDDED = """
import os, signal, sys
from udskit.cli import _output
from udskit.cli.main import main

def with_gone_stdout(call):
    saved = os.dup(1)
    read_end, write_end = os.pipe()
    os.close(read_end)
    os.dup2(write_end, 1)
    os.close(write_end)
    try:
        return call()
    finally:
        os.dup2(saved, 1)
        os.close(saved)

if sys.argv[1] == "blocked":
    # The first call ends with 141, not the signal, which every thread blocks.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGPIPE})
    try:
        with_gone_stdout(lambda: main(["bench", "--list"]))
    except SystemExit as exc:
        print("first", exc.code, file=sys.stderr)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGPIPE})
else:
    # A first use that ended otherwise (Ctrl-C, an exception) after its stdout's reader went.
    with_gone_stdout(lambda: _output.Output().write(b"lost"))
print("second", main(["ls", sys.argv[2]]), file=sys.stderr)
"""


def test_main_again_in_one_process_is_not_killed_by_an_earlier_broken_pipe(
    tmp_path: Path,
) -> None:
    # The second call killed the host process: the first's EPIPE was remembered, and a
    # pending SIGPIPE, its default action restored, killed it once unblocked.
    for how, first in (("blocked", "first 141\n"), ("earlier", "")):
        done = subprocess.run(
            [UDSKIT[0], "-c", _EMBEDDED, how, os.fspath(tmp_path)],
            capture_output=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
        assert (how, done.returncode, done.stderr.decode()) == (how, 0, f"{first}second 0\n")
