"""Socket activation gone wrong: LISTEN_PID of another process, LISTEN_FDS naming what is not
a listening socket of the requested type. Each is a one-line error naming the descriptor and
the unit setting to fix; the descriptor is left open (it is not ours), and nothing leaks.

The blocking and asyncio ``listen()`` share one adoption (udskit.adopting): both are run.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import udskit
import udskit.aio
from tests.cli.conftest import COMMAND_TIMEOUT, one_line_error
from tests.cli.conftest import udskit as run_udskit
from tests.conftest import open_fds
from tests.systemd_manager import start_service

Listen = Callable[..., object]


def _blocking(address: str, **options: object) -> object:
    listener = udskit.listen(address, **options)  # type: ignore[call-overload]
    listener.close()
    return listener


def _aio(address: str, **options: object) -> object:
    async def main() -> object:
        listener = await udskit.aio.listen(address, **options)  # type: ignore[call-overload]
        await listener.aclose() if hasattr(listener, "aclose") else listener.close()
        return listener

    return asyncio.run(main())


LISTENS = pytest.mark.parametrize("listen", [_blocking, _aio], ids=["blocking", "aio"])


@pytest.fixture
def activated(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    """Make ``fd`` this process's socket-activated descriptor named 'app': LISTEN_FDS runs
    from 3 up to it (the others named 'other'), LISTEN_PID is this process."""

    def activate(fd: int) -> None:
        assert fd >= 3
        names = ["other"] * (fd - 3) + ["app"]
        monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
        monkeypatch.setenv("LISTEN_FDS", str(len(names)))
        monkeypatch.setenv("LISTEN_FDNAMES", ":".join(names))

    return activate


@pytest.fixture
def no_leak() -> Iterator[None]:
    before = open_fds()
    yield
    leaked = {fd for fd in open_fds() - before if os.path.exists(f"/proc/self/fd/{fd}")}
    assert not leaked, f"descriptors leaked: {sorted(leaked)}"


def _refused(listen: Listen, fd: int, pattern: str, **options: object) -> str:
    """listen('fd:listen:app') refuses descriptor ``fd``, and leaves it open."""
    with pytest.raises(udskit.SocketFileError, match=pattern) as caught:
        listen("fd:listen:app", **options)
    os.fstat(fd)  # still open: the refused descriptor is its passer's
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"fd:{fd}: descriptor {fd} (socket-activated, named 'app'")
    return message


@LISTENS
def test_a_regular_file(
    listen: Listen, activated: Callable[[int], None], tmp_path: Path, no_leak: None
) -> None:
    fd = os.open(tmp_path / "not-a-socket", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        activated(fd)
        message = _refused(listen, fd, r"is a regular file, not a socket")
        assert "ListenStream=, ListenSequentialPacket=, ListenDatagram=" in message
        assert "not with ListenFIFO=, ListenSpecial= or ListenMessageQueue=" in message
    finally:
        os.close(fd)


@LISTENS
def test_a_fifo(listen: Listen, activated: Callable[[int], None], no_leak: None) -> None:
    read_end, write_end = os.pipe()
    try:
        activated(max(read_end, write_end))
        _refused(listen, max(read_end, write_end), r"is a FIFO, not a socket; the .socket unit")
    finally:
        os.close(read_end)
        os.close(write_end)


@LISTENS
@pytest.mark.parametrize(
    ("have", "want", "have_setting", "want_setting"),
    [
        ("dgram", "stream", "ListenDatagram=", "ListenStream="),
        ("stream", "seqpacket", "ListenStream=", "ListenSequentialPacket="),
        ("seqpacket", "dgram", "ListenSequentialPacket=", "ListenDatagram="),
    ],
)
def test_a_socket_of_another_type(
    listen: Listen,
    activated: Callable[[int], None],
    sockdir: Path,
    no_leak: None,
    have: str,
    want: str,
    have_setting: str,
    want_setting: str,
) -> None:
    kinds = {"stream": socket.SOCK_STREAM, "seqpacket": socket.SOCK_SEQPACKET}
    with socket.socket(socket.AF_UNIX, kinds.get(have, socket.SOCK_DGRAM)) as sock:
        sock.bind(os.fspath(sockdir / "s.sock"))
        if have != "dgram":
            sock.listen()
        activated(sock.fileno())
        message = _refused(listen, sock.fileno(), f"is a {have} socket", type=want)
        assert message.endswith(
            f"is a {have} socket, not the {want} socket type='{want}' asks for: pass "
            f"type='{have}', or change the .socket unit's {have_setting} to {want_setting}"
        )


@LISTENS
def test_a_socket_of_another_family(
    listen: Listen, activated: Callable[[int], None], no_leak: None
) -> None:
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, socket.NETLINK_ROUTE) as sock:
        activated(sock.fileno())
        message = _refused(listen, sock.fileno(), r"is a netlink dgram socket; udskit serves")
        assert "(ListenStream=PORT)" in message
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        activated(udp.fileno())
        _refused(listen, udp.fileno(), r"is an IPv4 dgram socket; udskit serves Unix", type="dgram")


@LISTENS
def test_a_socket_that_does_not_listen(
    listen: Listen, activated: Callable[[int], None], sockdir: Path, no_leak: None
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(os.fspath(sockdir / "s.sock"))
        activated(sock.fileno())
        _refused(listen, sock.fileno(), r"is a stream socket that is not listening \(bound, but")


@LISTENS
def test_a_connection_accepted_by_systemd(
    listen: Listen, activated: Callable[[int], None], no_leak: None
) -> None:
    """Accept=yes passes each service instance a connection, not the listener."""
    one, other = socket.socketpair()
    with one, other:
        activated(one.fileno())
        message = _refused(listen, one.fileno(), r"is a connected stream socket")
        assert message.endswith(
            "not a listening one: set Accept=no in the .socket unit (Accept=yes passes one "
            "accepted connection to each service instance)"
        )


@LISTENS
def test_a_closed_descriptor(
    listen: Listen, activated: Callable[[int], None], no_leak: None
) -> None:
    fd = 1000  # above what the test and its event loop open
    with pytest.raises(OSError):
        os.fstat(fd)
    activated(fd)
    with pytest.raises(udskit.SocketFileError, match=r"is not open \(bad file descriptor\); "):
        listen("fd:listen:app")


def test_an_inherited_descriptor_is_not_blamed_on_systemd(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """fd:N that systemd did not pass: the error names no unit setting."""
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        monkeypatch.delenv(name, raising=False)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        with pytest.raises(udskit.SocketFileError) as caught:
            udskit.listen(f"fd:{sock.fileno()}")
        assert str(caught.value) == (
            f"fd:{sock.fileno()}: descriptor {sock.fileno()} is a dgram socket, not the stream "
            "socket type='stream' asks for: pass type='dgram'"
        )


@LISTENS
def test_the_adopted_descriptor_is_not_inherited(
    listen: Listen, activated: Callable[[int], None], sockdir: Path
) -> None:
    """As sd_listen_fds(3) does: what systemd passed becomes close-on-exec once taken."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(os.fspath(sockdir / "s.sock"))
    sock.listen()
    fd = sock.detach()
    os.set_inheritable(fd, True)
    activated(fd)
    if listen is _blocking:
        listener = udskit.listen("fd:listen:app")
        assert listener.fileno() == fd
        assert not os.get_inheritable(fd)
        listener.close()
    else:

        async def main() -> None:
            async with await udskit.aio.listen("fd:listen:app") as listener:
                assert listener.fileno() == fd
                assert not os.get_inheritable(fd)

        asyncio.run(main())
    with pytest.raises(OSError):
        os.fstat(fd)  # the listener closed it


# -- from the command line, as systemd starts it ------------------------------------------
def _activator() -> str:
    found = shutil.which("systemd-socket-activate")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-socket-activate is missing (package systemd)")
        pytest.skip("systemd-socket-activate is not installed (package systemd)")
    return found


def test_listen_pid_of_another_process(sockdir: Path) -> None:
    """Variables inherited from a parent (LISTEN_PID is the parent's): not for us."""
    env = dict(os.environ, LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="app")
    result = run_udskit("serve", "--echo", "fd:listen:app", env=env)
    line = one_line_error(result, 2)
    assert (
        f"LISTEN_PID={os.getpid()}: the socket-activated descriptors were meant for process "
        in line
    )
    assert f"{os.getpid()}, not this one (" in line


def test_systemd_passes_a_datagram_socket_to_a_stream_server(sockdir: Path) -> None:
    """systemd-socket-activate --datagram (a .socket unit's ListenDatagram=) starts
    'udskit serve' (stream) at the first datagram: one line names both settings."""
    path = sockdir / "app.sock"
    with subprocess.Popen(
        [
            _activator(),
            "--datagram",
            "-l",
            os.fspath(path),
            "--fdname=app",
            f"--setenv=PYTHONPATH={Path(udskit.__file__).parent.parent}",
            sys.executable,
            "-m",
            "udskit",
            "serve",
            "--echo",
            "fd:listen:app",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as activator:
        try:
            _send_when_bound(path, activator)
            out, err = activator.communicate(timeout=COMMAND_TIMEOUT)
        finally:
            if activator.poll() is None:
                activator.kill()
                activator.wait()
    lines = err.decode().splitlines()
    expected = (
        "udskit serve: fd:3: descriptor 3 (socket-activated, named 'app' in LISTEN_FDNAMES) is a "
        "dgram socket, not the stream socket --type stream asks for: pass --type dgram, or "
        "change the .socket unit's ListenDatagram= to ListenStream="
    )
    assert [line for line in lines if line.startswith("udskit")] == [expected], err
    assert activator.returncode == 1
    assert out == b""


def _send_when_bound(path: Path, process: subprocess.Popen[bytes]) -> None:
    """The activator binds, then starts the server at the first datagram (bounded wait)."""
    deadline = time.monotonic() + COMMAND_TIMEOUT
    delay = 0.001
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
        while True:
            try:
                sender.sendto(b"hello", os.fspath(path))
                return
            except (FileNotFoundError, ConnectionRefusedError):
                assert process.poll() is None, process.communicate()
                assert time.monotonic() < deadline, "systemd-socket-activate did not bind"
                time.sleep(delay)  # back-off between polls, not synchronisation
                delay = min(delay * 2, 0.05)


def test_systemd_passes_a_regular_file(sockdir: Path) -> None:
    """LISTEN_FDS naming a file (a .socket unit's ListenSpecial=, say): one line, exit 1."""
    with open(sockdir / "not-a-socket", "w") as passed:
        server = start_service(
            ["-m", "udskit", "serve", "--echo", "fd:listen:app"],
            dict(os.environ),
            [(passed.fileno(), "app")],
        )
    try:
        out, err = server.communicate(timeout=COMMAND_TIMEOUT)
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    assert server.returncode == 1
    assert out == b""
    expected = (
        "udskit serve: fd:3: descriptor 3 (socket-activated, named 'app' in LISTEN_FDNAMES) is "
        "a regular file, not a socket; the .socket unit passes a socket with ListenStream=, "
        "ListenSequentialPacket=, ListenDatagram=, not with ListenFIFO=, ListenSpecial= or "
        "ListenMessageQueue="
    )
    assert err.decode().splitlines() == [expected]
