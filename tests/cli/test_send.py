"""``udskit send``: one-shot messages, and --reply."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from tests.cli.conftest import (
    COMMAND_TIMEOUT,
    UDSKIT,
    Background,
    one_line_error,
    require,
    serve,
    udskit,
    wait_listening,
)
from tests.conftest import READY_TIMEOUT


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
    assert "did not answer within 0.2 s" in line
    assert "try --framing raw or --framing length" in line


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
    # It waited --timeout for room in the backlog, then said why it gave up.
    assert "backlog stayed full for 0.2 s" in line
    assert "busy.sock" in line


def test_nothing_listening(sockdir: Path) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(os.fspath(sockdir / "stale.sock"))
    stale.close()
    line = one_line_error(udskit("send", sockdir / "stale.sock", "hi"), 1)
    assert "nothing is listening" in line


#: Options of `udskit send` and of the server it talks to, matching.
SAME_KIND = [
    ([], []),
    (["--framing", "lines"], ["--framing", "lines"]),
    (["--framing", "length"], ["--framing", "length"]),
    (["--type", "seqpacket"], ["--type", "seqpacket"]),
]


@pytest.mark.parametrize(("options", "server"), SAME_KIND)
def test_reply_refused_by_the_access_policy_fails_and_says_so(
    sockdir: Path, background: list[Background], options: list[str], server: list[str]
) -> None:
    """A server whose policy refuses us closes the connection without reading: that is an
    error, not an empty answer."""
    path = sockdir / "policy.sock"
    someone_else = str(os.getuid() + 1)
    serve(background, path, "--echo", "--allow-uid", someone_else, *server)
    for _ in range(3):  # however the close races with our send and our read
        line = one_line_error(udskit("send", "--reply", *options, path, "hi"), 1)
        assert f"{path} closed the connection without reading all of the message" in line
        assert "access policy" in line


def test_reply_from_a_server_that_reads_one_byte_and_closes_names_both_causes(
    sockdir: Path,
) -> None:
    """As dbus-daemon does with a first byte that is not its credentials NUL: it reads one
    byte and closes. That looks like a refusal, which may be the protocol, not a policy."""
    path = sockdir / "bus.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen()

        def one_byte() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(1)

        reader = threading.Thread(target=one_byte)
        reader.start()
        try:
            line = one_line_error(udskit("send", "--reply", path, "hello"), 1)
        finally:
            reader.join(READY_TIMEOUT)
    assert f"{path} closed the connection without reading all of the message" in line
    assert "by its access policy or because the message is not in its protocol" in line


def test_datagram_reply_refused_by_the_access_policy_times_out_and_says_why(
    sockdir: Path, background: list[Background]
) -> None:
    path = sockdir / "dpolicy.sock"
    serve(background, path, "--type", "dgram", "--echo", "--allow-uid", str(os.getuid() + 1))
    result = udskit("send", "--type", "dgram", "--reply", "--timeout", "0.3", path, "hi")
    line = one_line_error(result, 1)
    assert "did not answer within 0.3 s" in line
    assert "access policy" in line


def test_raw_reply_from_a_length_framed_server_suggests_the_framing(
    sockdir: Path, background: list[Background]
) -> None:
    """`send --reply` speaks raw by default; a server in udskit's length framing reads a
    broken frame and closes without a word."""
    path = sockdir / "length.sock"
    serve(background, path, "--echo", "--framing", "length")
    line = one_line_error(udskit("send", "--reply", path, "hello"), 1)
    assert line == (
        f"udskit send: {path} closed the connection without answering; if the server "
        "expects length-prefixed messages (the udskit library's default), try --framing length"
    )


def test_length_reply_from_a_raw_socat_server_suggests_the_framing(
    sockdir: Path, background: list[Background]
) -> None:
    socat = require("socat")
    path = sockdir / "raw.sock"
    # It reads the request (a 4-byte length, then "hi") before it answers in plain text:
    # an answer that does not wait could find the client's bytes still unread.
    server = Background([socat, f"UNIX-LISTEN:{path}", "SYSTEM:head -c 6 >/dev/null; echo garbage"])
    background.append(server)
    wait_listening(path, server.process)
    line = one_line_error(udskit("send", "--reply", "--framing", "length", path, "hi"), 1)
    assert line == (
        f"udskit send: the reply from {path} is not in the length framing: "
        "try --framing raw or --framing lines"
    )


def test_length_reply_cut_short_by_a_raw_nc_server(
    sockdir: Path, background: list[Background]
) -> None:
    nc = require("nc")
    path = sockdir / "nc.sock"
    # nc -N: once its input ("ab", two bytes: less than a length header) is sent, it
    # shuts the connection down.
    server = Background([nc, "-l", "-U", "-N", path])
    background.append(server)
    server.write(b"ab")
    server.close_stdin()
    wait_listening(path, server.process)
    line = one_line_error(udskit("send", "--reply", "--framing", "length", path, "hi"), 1)
    assert line == (
        f"udskit send: the reply from {path} broke off in the middle of a message: it is "
        "not in the length framing; try --framing raw or --framing lines"
    )
    server.wait()  # nc serves one connection


def test_raw_reply_from_a_server_that_closes_without_answering(
    sockdir: Path, background: list[Background]
) -> None:
    """A raw server that reads the message and closes in silence (socat into /dev/null)."""
    socat = require("socat")
    path = sockdir / "sink.sock"
    server = Background([socat, "-u", f"UNIX-LISTEN:{path}", "OPEN:/dev/null"])
    background.append(server)
    wait_listening(path, server.process)
    line = one_line_error(udskit("send", "--reply", path, "hi"), 1)
    assert f"{path} closed the connection without answering" in line


@pytest.mark.parametrize(
    ("command", "kind", "listening", "state"),
    [
        (["send", "FD", "x"], socket.SOCK_DGRAM, False, "a socket that is not connected"),
        (["connect", "FD"], socket.SOCK_DGRAM, False, "a socket that is not connected"),
        (["send", "FD", "x"], socket.SOCK_SEQPACKET, True, "a listening socket"),
    ],
)
def test_an_inherited_descriptor_that_is_not_connected(
    command: list[str], kind: int, listening: bool, state: str
) -> None:
    # A send on it fails with ENOTCONN, which read as "closed without answering" (or, for
    # connect with nothing to send, as success).
    with socket.socket(socket.AF_UNIX, kind) as sock:
        sock.bind("")  # an autobound abstract name: nothing in the filesystem
        if listening:
            sock.listen()
        fd = sock.fileno()
        done = subprocess.run(
            [*UDSKIT, *(f"fd:{fd}" if a == "FD" else a for a in command)],
            pass_fds=[fd],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
    err = done.stderr.decode()
    assert done.returncode == 1, err
    assert err == (
        f"udskit {command[0]}: fd:{fd}: descriptor {fd} is {state}; pass a connected socket "
        "(one end of a socket pair, or a connection to the server)\n"
    )
