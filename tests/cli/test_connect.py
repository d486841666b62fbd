"""``udskit connect``: stdin to the socket, the socket to stdout, in pipelines."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import udskit as udskit_package
from tests.cli.conftest import (
    COMMAND_TIMEOUT,
    UDSKIT,
    Background,
    one_line_error,
    serve,
    udskit,
    wait_listening,
)
from tests.e2e.servers import require_peer


@pytest.fixture
def plain_server(sockdir: Path) -> Iterator[Callable[..., list[bytes]]]:
    """A one-connection server written with the socket module: records what it received,
    answers with a script, and closes. Returns the record once the client is done."""
    threads: list[threading.Thread] = []
    listeners: list[socket.socket] = []

    def start(
        kind: int = socket.SOCK_STREAM, answers: tuple[bytes, ...] = (), name: str = "p.sock"
    ) -> list[bytes]:
        received: list[bytes] = []
        listener = socket.socket(socket.AF_UNIX, kind)
        listener.bind(os.fspath(sockdir / name))
        listener.settimeout(20)
        listeners.append(listener)
        if kind == socket.SOCK_DGRAM:

            def run() -> None:
                for answer in answers:
                    data, sender = listener.recvfrom(65536)
                    received.append(data)
                    listener.sendto(answer, sender)

        else:
            listener.listen()

            def run() -> None:
                conn, _ = listener.accept()
                with conn:
                    received.append(conn.getpeername().encode() if conn.getpeername() else b"")
                    for answer in answers:
                        conn.sendall(answer)
                    while data := conn.recv(65536):
                        received.append(data)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        threads.append(thread)
        return received

    yield start
    for listener in listeners:
        listener.close()
    for thread in threads:
        thread.join(20)


def test_pipeline_half_closes_and_prints_replies(
    sockdir: Path, background: list[Background]
) -> None:
    path = sockdir / "u.sock"
    serve(background, path, "--upper")
    result = udskit("connect", path, stdin=b"hello\nworld\n")
    assert result.code == 0, result.err
    assert result.out == b"HELLO\nWORLD\n"
    assert result.err == ""


def test_ends_when_the_server_closes_first(
    sockdir: Path, plain_server: Callable[..., list[bytes]]
) -> None:
    plain_server(answers=(b"bye\n",))
    client = Background([*UDSKIT, "connect", sockdir / "p.sock"])
    try:
        client.read_until(b"bye\n")
        client.process.stdin.close()  # type: ignore[union-attr]
        client.process.stdin = None
        assert client.process.wait(20) == 0
    finally:
        client.kill()


#: A response larger than the socket buffers hold: it goes out while the client reads.
_LONG_ANSWER = 4 * 1024 * 1024


def _answer_until_the_client_ends(listener: socket.socket, sent: list[int]) -> None:
    """As nginx does: read a request, then answer in pieces, and stop answering once the
    client's end of stream shows (a half-close taken for a client that left)."""
    conn, _ = listener.accept()
    with conn:
        conn.recv(65536)
        piece = b"x" * 65536
        while sent[0] < _LONG_ANSWER:
            try:
                if conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                    return
            except BlockingIOError:
                pass
            conn.sendall(piece)
            sent[0] += len(piece)


def test_no_shutdown_keeps_our_side_open_for_a_server_that_stops_at_a_half_close(
    sockdir: Path,
) -> None:
    path = sockdir / "nginx-like.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(os.fspath(path))
        listener.listen()
        listener.settimeout(COMMAND_TIMEOUT)
        sent = [0]
        server = threading.Thread(target=_answer_until_the_client_ends, args=(listener, sent))
        server.start()
        try:
            result = udskit("connect", "--no-shutdown", path, stdin=b"GET / HTTP/1.0\r\n\r\n")
        finally:
            server.join(COMMAND_TIMEOUT)
    assert result.code == 0, result.err
    assert len(result.out) == _LONG_ANSWER == sent[0]


def test_binary_data_passes_untouched(sockdir: Path, background: list[Background]) -> None:
    path = sockdir / "b.sock"
    serve(background, path, "--echo")
    data = bytes(range(256)) * 64
    result = udskit("connect", path, stdin=data)
    assert result.out == data


def test_bind_gives_the_client_a_name(
    sockdir: Path, plain_server: Callable[..., list[bytes]]
) -> None:
    received = plain_server()
    me = sockdir / "me.sock"
    result = udskit("connect", "--bind", me, sockdir / "p.sock", stdin=b"hi")
    assert result.code == 0, result.err
    assert received[0] == os.fsencode(me)  # the server's getpeername()
    assert received[1:] == [b"hi"]
    assert not me.exists()  # removed on close


def test_datagram_lines(sockdir: Path, plain_server: Callable[..., list[bytes]]) -> None:
    received = plain_server(socket.SOCK_DGRAM, answers=(b"A", b"B"))
    result = udskit("connect", "--type", "dgram", sockdir / "p.sock", stdin=b"a\n\nb\n")
    assert result.code == 0, result.err
    assert received == [b"a", b"b"]  # one datagram per line; empty lines skipped
    assert result.out == b"A\nB\n"


def test_seqpacket_lines(sockdir: Path, background: list[Background]) -> None:
    path = sockdir / "q.sock"
    serve(background, path, "--type", "seqpacket", "--upper")
    result = udskit("connect", "--type", "seqpacket", path, stdin=b"one\ntwo\n")
    assert result.out == b"ONE\nTWO\n"


@pytest.mark.parametrize("framing", ["lines", "length"])
def test_framings(sockdir: Path, background: list[Background], framing: str) -> None:
    path = sockdir / "f.sock"
    serve(background, path, "--reply", "R", "--framing", framing)
    result = udskit("connect", "--framing", framing, path, stdin=b"a\nb\n")
    assert result.out == b"R\nR\n"


def test_length_framing_on_the_wire(
    sockdir: Path, plain_server: Callable[..., list[bytes]]
) -> None:
    received = plain_server(answers=(struct.pack(">I", 3) + b"abc",))
    result = udskit("connect", "--framing", "length", sockdir / "p.sock", stdin=b"xy\n")
    assert result.out == b"abc\n"
    assert b"".join(received[1:]) == struct.pack(">I", 2) + b"xy"


def test_hexdump(sockdir: Path, background: list[Background]) -> None:
    path = sockdir / "x.sock"
    serve(background, path, "--echo")
    result = udskit("connect", "-x", path, stdin=b"hi\n")
    assert result.out == b"hi\n"
    assert result.err.splitlines() == [
        "> 3 bytes",
        "  00000000  68 69 0a                                          |hi.|",
        "< 3 bytes",
        "  00000000  68 69 0a                                          |hi.|",
    ]


def test_no_such_socket(sockdir: Path) -> None:
    line = one_line_error(udskit("connect", sockdir / "nope.sock"), 1)
    assert "no such file" in line
    assert str(sockdir / "nope.sock") in line


def test_datagram_server_gone(sockdir: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stale.bind(os.fspath(sockdir / "gone.sock"))
    stale.close()
    line = one_line_error(udskit("connect", "--type", "dgram", sockdir / "gone.sock"), 1)
    assert "gone.sock" in line


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_terminated_client_leaves_nothing_behind(
    sockdir: Path, background: list[Background], sig: int
) -> None:
    path = sockdir / "d.sock"
    serve(background, path, "--type", "dgram", "--echo")
    tmp = sockdir / "tmp"  # where the client makes its private reply directory
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"} | {"TMPDIR": str(tmp)}
    client = Background([*UDSKIT, "connect", "--type", "dgram", path], env=env)
    background.append(client)
    client.write(b"hi\n")
    client.read_until(b"hi\n")
    [reply_dir] = tmp.iterdir()  # where the reply socket lives
    assert reply_dir.name.startswith("udskit-")
    assert client.stop(sig) == 128 + sig
    assert list(tmp.iterdir()) == []


def test_a_listening_socket_as_stdin_says_so_and_how_to_fix_it(
    sockdir: Path, background: list[Background]
) -> None:
    """systemd-socket-activate --inetd without --accept (Accept=no) passes the listening
    socket as stdin, where read() fails with EINVAL: the error says it is stdin, and why.
    It said 'udskit connect: invalid argument'."""
    activator = shutil.which("systemd-socket-activate")
    require_peer("systemd-socket-activate", activator is not None)
    assert activator is not None
    target = sockdir / "echo.sock"
    serve(background, target, "--echo")
    front = sockdir / "inetd.sock"
    with subprocess.Popen(
        [
            activator,
            *("--inetd", "-l", os.fspath(front)),
            f"--setenv=PYTHONPATH={Path(udskit_package.__file__).parent.parent}",
            *(*UDSKIT, "connect", os.fspath(target)),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    ) as activated:
        try:
            wait_listening(front, activated)
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(os.fspath(front))  # starts udskit connect
                _, err = activated.communicate(timeout=COMMAND_TIMEOUT)
        finally:
            if activated.poll() is None:
                activated.kill()
    assert activated.returncode == 1
    [line] = [x for x in err.decode().splitlines() if x.startswith("udskit")]
    assert line == (
        "udskit connect: cannot read stdin: invalid argument; it is a listening socket: "
        "inetd-style activation must pass an accepted connection (Accept=yes in the .socket "
        "unit, systemd-socket-activate --inetd --accept)"
    )
