"""Real peers nobody here wrote: nc -U (netcat-openbsd) and socat, as clients of
``udskit serve`` and as servers for ``udskit connect`` and ``udskit send``, for stream and
datagram sockets. A missing peer fails the test where UDSKIT_REQUIRE_PEERS is set (CI)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.cli.conftest import (
    COMMAND_TIMEOUT,
    UDSKIT,
    Background,
    require,
    serve,
    udskit,
    wait_listening,
)


@pytest.fixture
def nc() -> str:
    return require("nc")


@pytest.fixture
def socat() -> str:
    return require("socat")


def peer(background: list[Background], *argv: str | Path) -> Background:
    process = Background(list(argv))
    background.append(process)
    return process


# -- udskit serve, peers as clients -------------------------------------------------------
def test_nc_stream_client(sockdir: Path, background: list[Background], nc: str) -> None:
    path = sockdir / "upper.sock"
    serve(background, path, "--upper")
    client = peer(background, nc, "-U", "-N", path)  # -N: shut down writing at end of input
    client.write(b"hello from nc\n")
    client.read_until(b"HELLO FROM NC\n")
    assert client.wait() == 0


def nc_directory(pid: int) -> str:
    """The directory in which ``nc -U -u`` (pid) bound its reply socket: /tmp/nc-XXXXXX.
    nc never removes it; the test does, once it has found it."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        link = os.readlink(f"/proc/{pid}/fd/{fd}")
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    with open("/proc/net/unix") as table:
        for line in table.read().splitlines()[1:]:
            fields = line.split(None, 7)
            if len(fields) == 8 and fields[6] in inodes:
                return os.path.dirname(fields[7])
    raise AssertionError(f"nc (pid {pid}) has no bound socket")


@pytest.fixture
def nc_datagram_client(
    background: list[Background], nc: str
) -> Iterator[Callable[[Path], Background]]:
    directories: list[str] = []

    def start(server: Path) -> Background:
        client = peer(background, nc, "-U", "-u", server)
        client.write(b"\n")  # an empty line, so that nc binds its reply socket now
        deadline = time.monotonic() + COMMAND_TIMEOUT
        while True:
            try:
                directories.append(nc_directory(client.pid))
                return client
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.01)  # back-off while nc starts, not synchronisation

    yield start
    for directory in directories:
        if os.path.basename(directory).startswith("nc-"):
            shutil.rmtree(directory, ignore_errors=True)


def test_nc_datagram_client(
    sockdir: Path, background: list[Background], nc_datagram_client: Callable[[Path], Background]
) -> None:
    path = sockdir / "upper-dgram.sock"
    serve(background, path, "--type", "dgram", "--upper")
    client = nc_datagram_client(path)
    client.read_until(b"\n")  # the empty line, answered
    client.write(b"one\n")
    client.read_until(b"ONE\n")
    client.write(b"two\n")
    client.read_until(b"TWO\n")


def test_nc_stops_a_datagram_server_with_done(
    sockdir: Path, background: list[Background], nc_datagram_client: Callable[[Path], Background]
) -> None:
    path = sockdir / "s1.sock"
    server = serve(background, path, "--type", "dgram", "--print", "--until", "DONE")
    client = nc_datagram_client(path)
    client.write(b"hello\n")
    assert server.read_until(b"hello\n") == b"\nhello\n"
    client.write(b"DONE\n")
    assert server.wait() == 0
    assert server.out == b"DONE\n"  # printed as it came: nc sends the typed newline
    assert not path.exists()


def test_socat_stream_client(sockdir: Path, background: list[Background], socat: str) -> None:
    path = sockdir / "echo.sock"
    serve(background, path, "--echo")
    client = peer(background, socat, "-t", "20", "-", f"UNIX-CONNECT:{path}")
    client.write(b"hello from socat\n")
    client.read_until(b"hello from socat\n")
    assert client.wait() == 0  # end of input: socat half-closes, the server closes


def test_socat_datagram_client_gets_replies(
    sockdir: Path, background: list[Background], socat: str
) -> None:
    # socat drops a reply unless it comes from the very address it sent to.
    path = sockdir / "reply.sock"
    serve(background, path, "--type", "dgram", "--reply", "got it")
    me = sockdir / "socat.sock"
    client = peer(background, socat, "-", f"UNIX-SENDTO:{path},bind={me}")
    client.write(b"anyone there?\n")
    client.read_until(b"got it")


# -- peers as servers, udskit as the client -----------------------------------------------
def test_nc_stream_server(sockdir: Path, background: list[Background], nc: str) -> None:
    path = sockdir / "nc.sock"
    server = peer(background, nc, "-l", "-U", "-N", path)
    wait_listening(path, server.process)
    client = peer(background, *UDSKIT, "connect", path)
    client.write(b"from udskit\n")
    server.read_until(b"from udskit\n")
    server.write(b"from nc\n")
    client.read_until(b"from nc\n")
    client.close_stdin()  # udskit half-closes...
    server.close_stdin()  # ...and so does nc: both directions are done
    assert client.wait() == 0
    assert server.wait() == 0


def test_nc_datagram_server(sockdir: Path, background: list[Background], nc: str) -> None:
    path = sockdir / "nc-dgram.sock"
    server = peer(background, nc, "-l", "-U", "-u", path)
    wait_listening(path, server.process, dgram=True)
    client = peer(background, *UDSKIT, "connect", "--type", "dgram", path)
    client.write(b"ping\n")
    server.read_until(b"ping")  # one datagram per line, the newline not included
    server.write(b"pong\n")  # nc answers the address our datagram came from
    client.read_until(b"pong\n")
    assert client.wait() == 0


def test_socat_stream_server(sockdir: Path, background: list[Background], socat: str) -> None:
    path = sockdir / "socat.sock"
    server = peer(background, socat, f"UNIX-LISTEN:{path},fork", "EXEC:tr a-z A-Z")
    wait_listening(path, server.process)
    result = udskit("connect", path, stdin=b"piped through socat\n")
    assert (result.code, result.out) == (0, b"PIPED THROUGH SOCAT\n")
    result = udskit("send", "--reply", path, "one-shot")
    assert (result.code, result.out) == (0, b"ONE-SHOT\n")


def test_socat_datagram_server(sockdir: Path, background: list[Background], socat: str) -> None:
    path = sockdir / "socat-dgram.sock"
    server = peer(background, socat, f"UNIX-RECVFROM:{path},fork", "EXEC:cat")
    wait_listening(path, server.process, dgram=True)
    result = udskit("send", "--type", "dgram", "--reply", path, "echo me")
    assert (result.code, result.out) == (0, b"echo me\n")
    client = peer(background, *UDSKIT, "connect", "--type", "dgram", path)
    client.write(b"interactive\n")
    client.read_until(b"interactive\n")
    assert client.wait() == 0
