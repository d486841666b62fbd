"""A command started with stdin, stdout or stderr closed (``<&-``, a daemon's child): the
first socket it opens must not take the closed descriptor's number and be read or written
as if it were the terminal."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.cli.conftest import COMMAND_TIMEOUT, UDSKIT, Background, serve


def _run_closed(fd: int, *args: str | os.PathLike[str]) -> subprocess.CompletedProcess[bytes]:
    """Run ``udskit ARGS`` with descriptor ``fd`` closed, as ``udskit ARGS <&-`` does."""
    script = f'exec "$@" {fd}<&-'
    return subprocess.run(
        ["sh", "-c", script, "sh", *UDSKIT, *map(os.fspath, args)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )


def test_connect_with_stdin_closed_reads_end_of_input(
    sockdir: Path, background: list[Background]
) -> None:
    # It read its own socket as stdin and waited for ever.
    path = sockdir / "e.sock"
    serve(background, path, "--echo")
    done = _run_closed(0, "connect", path)
    assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")


def test_send_with_stdout_closed_fails_instead_of_writing_to_the_socket(
    sockdir: Path, background: list[Background]
) -> None:
    # It wrote the reply into the socket, printed nothing, and exited 0.
    path = sockdir / "e.sock"
    serve(background, path, "--echo")
    done = _run_closed(1, "send", "--reply", path, "hello")
    err = done.stderr.decode()
    assert done.returncode == 1, err
    assert err == "udskit send: cannot write to stdout: bad file descriptor\n"


def test_pair_child_inherits_an_empty_stdin(sockdir: Path) -> None:
    done = _run_closed(0, "pair", "--", "sh", "-c", "cat; echo eof")
    assert (done.returncode, done.stdout, done.stderr) == (0, b"eof\n", b"")


def test_a_full_stdout_is_named(sockdir: Path, background: list[Background]) -> None:
    path = sockdir / "e.sock"
    serve(background, path, "--echo")
    with open("/dev/full", "wb") as full:
        done = subprocess.run(
            [*UDSKIT, "send", "--reply", os.fspath(path), "hello"],
            stdout=full,
            stderr=subprocess.PIPE,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
    assert (done.returncode, done.stderr) == (
        1,
        b"udskit send: cannot write to stdout: no space left on device\n",
    )
