"""``udskit send``: one-shot messages, and --reply."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

import pytest

from tests.cli.conftest import Background, one_line_error, serve, udskit


def test_raw_reply_reads_until_the_server_closes(
    sockdir: Path, background: list[Background]
) -> None:
    path = sockdir / "e.sock"
    serve(background, path, "--echo")
    result = udskit("send", "--reply", path, "Hello, world!", "My name is Tom!")
    assert result.code == 0, result.err
    assert result.out == b"Hello, world!\nMy name is Tom!\n"


@pytest.mark.parametrize(
    ("options", "server"),
    [
        (["--framing", "lines"], ["--framing", "lines"]),
        (["--framing", "length"], ["--framing", "length"]),
        (["--type", "seqpacket"], ["--type", "seqpacket"]),
        (["--type", "dgram"], ["--type", "dgram"]),
    ],
)
def test_one_reply_per_message(
    sockdir: Path, background: list[Background], options: list[str], server: list[str]
) -> None:
    path = sockdir / "u.sock"
    serve(background, path, "--upper", *server)
    result = udskit("send", "--reply", *options, path, "one", "two")
    assert result.code == 0, result.err
    assert result.out == b"ONE\nTWO\n"


def test_without_reply_just_sends(sockdir: Path, background: list[Background]) -> None:
    path = sockdir / "p.sock"
    server = serve(background, path, "--type", "dgram", "--print")
    result = udskit("send", "--type", "dgram", path, "hello", "DONE")
    assert (result.code, result.out) == (0, b"")
    server.read_until(b"hello\nDONE\n")


def test_reply_timeout_is_one_line(sockdir: Path, background: list[Background]) -> None:
    path = sockdir / "silent.sock"
    serve(background, path, "--print", "--framing", "lines")  # never answers
    line = one_line_error(
        udskit("send", "--reply", "--framing", "lines", "--timeout", "0.2", path, "hi"), 1
    )
    assert "timed out" in line


def test_a_full_backlog_is_named(sockdir: Path) -> None:
    path = sockdir / "busy.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(os.fspath(path))
        listener.listen(0)  # never accepts
        queued = []
        try:
            for _ in range(16):
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
                queued.append(client)
                if client.connect_ex(os.fspath(path)) == errno.EAGAIN:
                    break
            else:
                pytest.fail("the backlog never filled")
            result = udskit("send", "--timeout", "0.2", path, "hi")
        finally:
            for client in queued:
                client.close()
    line = one_line_error(result, 1)
    assert "backlog is full" in line  # EAGAIN: a connect with a timeout does not queue
    assert "busy.sock" in line


def test_nothing_listening(sockdir: Path) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(os.fspath(sockdir / "stale.sock"))
    stale.close()
    line = one_line_error(udskit("send", sockdir / "stale.sock", "hi"), 1)
    assert "nothing is listening" in line
