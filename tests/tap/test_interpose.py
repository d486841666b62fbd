"""Putting the relay in front of a live server and the server's socket back: the file's
inode, mode and owner, no gap for clients, and every path the tap refuses to take."""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import udskit
import udskit.sockfile
from udskit import tap
from udskit.address import Address
from udskit.tap.interpose import interpose

from ..conftest import READY_TIMEOUT
from ..integration.children import NOBODY, needs_root, run_in_child
from .conftest import Recorder
from .servers import DatagramEcho, recv_exactly, server

pytestmark = pytest.mark.usefixtures("no_fd_leak")

Tapping = Callable[..., tuple[tap.Tap, Recorder]]


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_the_relay_takes_the_path_with_the_servers_mode_and_the_server_gets_it_back(
    sockdir: Path, tapping: Tapping
) -> None:
    path = sockdir / "app.sock"
    with server(path, mode=0o640) as srv:
        if os.geteuid() == 0:
            os.chown(path, 0, NOBODY)
        before = os.lstat(path)
        running, events = tapping(path)
        during = os.lstat(path)
        assert during.st_ino != before.st_ino  # the relay's socket is at PATH
        assert (stat.S_IMODE(during.st_mode), during.st_uid, during.st_gid) == (
            0o640,
            before.st_uid,
            before.st_gid,
        )
        assert os.lstat(running.aside).st_ino == srv.inode
        assert running.type == "stream"
        assert running.server is not None
        assert running.server.pid == os.getpid()
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))
            client.sendall(b"through the tap\n")
            assert recv_exactly(client, 16) == b"through the tap\n"
        message = running.stop(grace=5.0)
        assert "back in place" in message
        assert os.lstat(path).st_ino == srv.inode
        assert _leftovers(sockdir) == []
        data = b"".join(e.data for e in events.of(tap.Data) if e.direction == "up")
        assert data == b"through the tap\n"


@pytest.mark.long
def test_no_connect_fails_while_taps_start_and_stop(sockdir: Path) -> None:
    """A client connects in a loop while the tap is started and stopped 20 times: every
    connect reaches the relay or the server (never ENOENT or ECONNREFUSED), and every
    echo comes back whole."""
    path = sockdir / "app.sock"
    stop = threading.Event()
    failures: list[str] = []
    rounds = [0]

    def client() -> None:
        n = 0
        while not stop.is_set() and n < 1_000_000:
            n += 1
            message = b"%d\n" % n
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(READY_TIMEOUT)
                    s.connect(str(path))
                    s.sendall(message)
                    if recv_exactly(s, len(message)) != message:
                        failures.append(f"echo {n} changed")
            except Exception as exc:  # whatever it is, the test must see it
                failures.append(f"connection {n}: {exc!r}")
            rounds[0] = n

    with server(path) as srv:
        thread = threading.Thread(target=client, daemon=True)
        thread.start()
        try:
            for _ in range(20):
                running = tap.start(path, lambda event: None)
                running.stop(grace=5.0)
                assert os.lstat(path).st_ino == srv.inode
        finally:
            stop.set()
            thread.join(READY_TIMEOUT)
    assert failures == []
    assert rounds[0] > 20
    assert _leftovers(sockdir) == []


def test_a_missing_path_is_refused(sockdir: Path) -> None:
    with pytest.raises(udskit.ConnectError, match="no such file; start its server first"):
        tap.start(sockdir / "none.sock", lambda event: None)


def test_a_stale_socket_is_refused_and_left_alone(sockdir: Path) -> None:
    path = sockdir / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
    inode = os.lstat(path).st_ino
    with pytest.raises(udskit.ConnectError, match="nothing is listening there"):
        tap.start(path, lambda event: None)
    assert os.lstat(path).st_ino == inode
    assert _leftovers(sockdir) == []


def test_what_is_not_a_socket_is_refused(sockdir: Path) -> None:
    path = sockdir / "file"
    path.write_bytes(b"data")
    with pytest.raises(udskit.SocketFileError, match="it is a regular file, not a socket"):
        tap.start(path, lambda event: None)
    assert path.read_bytes() == b"data"


def test_a_type_the_tap_was_not_told_is_refused(sockdir: Path) -> None:
    path = sockdir / "app.sock"
    with server(path):
        with pytest.raises(udskit.ConnectError, match=r"stream socket, not a seqpacket one"):
            tap.start(path, lambda event: None, type="seqpacket")
        with pytest.raises(ValueError, match="type must be one of"):
            tap.start(path, lambda event: None, type="tcp")
        assert os.lstat(path).st_ino == os.lstat(path).st_ino
        assert _leftovers(sockdir) == []


def test_addresses_without_a_file_are_refused() -> None:
    with pytest.raises(ValueError, match="only a socket file can be tapped"):
        tap.start("@abstract-name", lambda event: None)
    with pytest.raises(ValueError, match="only a socket file can be tapped"):
        tap.start("tcp:127.0.0.1:80", lambda event: None)


def test_a_second_tap_on_one_path_refuses(sockdir: Path, tapping: Tapping) -> None:
    path = sockdir / "app.sock"
    with server(path):
        tapping(path)
        with pytest.raises(udskit.AddressInUse, match=r"already tapped \(pid \d+\)"):
            tap.start(path, lambda event: None)


def test_the_server_exiting_while_tapped_is_said_and_its_file_put_back(
    sockdir: Path, tapping: Tapping
) -> None:
    path = sockdir / "app.sock"
    srv = server(path)
    running_server = srv.__enter__()
    inode = running_server.inode
    running, events = tapping(path)
    srv.__exit__(None, None, None)  # the server exits, without removing its file
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(path))  # the relay accepts; the server does not
        assert client.recv(10) == b""
    events.wait_for(lambda evs: any(isinstance(e, tap.Refused) for e in evs))
    assert running.server_gone
    message = running.stop(grace=5.0)
    assert "the server exited while tapped" in message
    assert os.lstat(path).st_ino == inode  # the server's own (stale) file, nothing else
    assert _leftovers(sockdir) == []


def test_a_server_restarted_while_tapped_keeps_its_new_socket_and_no_stale_one_is_left(
    sockdir: Path, tapping: Tapping
) -> None:
    """As redis does at shutdown: the server unlinks PATH by name (the relay's file), and
    its next start binds PATH afresh. The tap leaves the new socket, and removes the old
    server's stale one it had moved aside: left there, ls, doctor and --restore took it
    for a tap still running."""
    path = sockdir / "redis.sock"
    old = socket.socket(socket.AF_UNIX)
    old.bind(str(path))
    old.listen()
    running, _ = tapping(path)
    old.close()
    _until_gone(sockdir / ".redis.sock.udskit-tapped")
    os.unlink(path)
    with socket.socket(socket.AF_UNIX) as new:
        new.bind(str(path))
        new.listen()
        inode = os.lstat(path).st_ino
        message = running.stop(grace=5.0)
        assert "the server exited while tapped" in message
        assert f"stale socket at {sockdir}/.redis.sock.udskit-tapped is removed" in message
        assert os.lstat(path).st_ino == inode
        assert _leftovers(sockdir) == []
        with pytest.raises(udskit.SocketFileError, match="nothing to restore"):
            udskit.tap.restore_displaced(path)


def _until_gone(aside: Path) -> None:
    """Wait (bounded) until the closed server socket at ``aside`` refuses connections. The
    tap's connector, forked as the tap started, holds a copy of each descriptor of this
    process until it has closed them; a server in a process of its own has no such copy."""
    deadline = time.monotonic() + READY_TIMEOUT
    while udskit.sockfile.probe(os.fsencode(aside)).live:
        assert time.monotonic() < deadline, "the closed server socket still accepts"
        time.sleep(0.01)  # polling the kernel's state, bounded


def test_a_datagram_server_is_tapped_and_restored(sockdir: Path, tapping: Tapping) -> None:
    path = sockdir / "dgram.sock"
    srv = DatagramEcho(path)
    try:
        inode = os.lstat(path).st_ino
        running, _ = tapping(path)
        assert running.type == "dgram"
        assert running.server is None
        running.stop(grace=5.0)
        assert os.lstat(path).st_ino == inode
    finally:
        srv.close()


def test_a_datagram_relay_passes_credentials_from_the_moment_it_holds_the_path(
    sockdir: Path,
) -> None:
    # The option was set once the relay had started: a datagram that came between the
    # relay taking PATH and its start arrived without its sender's credentials, and the
    # relay refused it ("a sender without credentials"), a lost datagram under load.
    path = sockdir / "dgram.sock"
    srv = DatagramEcho(path)
    try:
        interposed = interpose(Address.parse(str(path)), None)
        try:
            relay = interposed.relay
            assert relay.getsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED) == 1
        finally:
            interposed.restore()
            interposed.relay.close()
            interposed.close()
    finally:
        srv.close()


@pytest.mark.root
@needs_root
def test_a_directory_the_tap_may_not_write_is_refused(sockdir: Path) -> None:
    sockdir.chmod(0o755)  # nobody may search it, not write it
    path = sockdir / "app.sock"
    with server(path, mode=0o666):
        os.chown(path, NOBODY, NOBODY)  # nobody's own socket, in root's directory
        report = run_in_child(lambda: str(tap.start(path, lambda e: None)), as_user=NOBODY)
    assert report.startswith("SocketFileError: cannot create lock file ")
    assert "permission denied (need write permission on the directory)" in report


@pytest.mark.root
@needs_root
def test_another_users_socket_cannot_be_given_a_second_name(sockdir: Path) -> None:
    sockdir.chmod(0o1777)  # like /tmp: nobody may add names, but not link root's files
    path = sockdir / "app.sock"
    with server(path, mode=0o666):
        report = run_in_child(lambda: str(tap.start(path, lambda e: None)), as_user=NOBODY)
    assert report.startswith("SocketFileError: cannot tap ")
    assert "belongs to uid 0" in report
    assert "run the tap as that user or as root" in report


@pytest.mark.root
@needs_root
def test_another_users_socket_at_the_tapped_name_neither_blocks_nor_is_restored(
    sockdir: Path,
) -> None:
    """In a directory anyone may write, another user plants a live socket at the name a tap
    would give the server's socket: it keeps nobody from the path, and is never put there."""
    sockdir.chmod(0o1777)
    path = sockdir / "app.sock"
    planted = sockdir / ".app.sock.udskit-tapped"
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # the other user: a live socket at the tapped name, until told
        try:
            os.close(read_end)
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            with socket.socket(socket.AF_UNIX) as sock:
                sock.bind(os.fspath(planted))
                sock.listen()
                os.write(write_end, b"!")
                os.read(write_end, 1)  # never written: the parent kills us
        finally:
            os._exit(0)
    try:
        os.close(write_end)
        assert os.read(read_end, 1) == b"!"
        # Not root: the user whose path it is (root would be trusted to restore anything).
        report = run_in_child(lambda: str(tap.restore(path)), as_user=NOBODY + 1)
        assert report == (
            f"SocketFileError: cannot restore {path}: {planted.name} belongs to uid {NOBODY}, not "
            "this user; its owner (or root) may restore it"
        )
        assert not path.exists()
        with udskit.listen(path):  # as root, the path's owner: nothing keeps us out
            assert path.exists()
    finally:
        os.kill(child, 9)
        os.waitpid(child, 0)
        os.close(read_end)


@pytest.mark.root
@needs_root
@pytest.mark.parametrize("planted", ["file", "socket"])
def test_another_users_file_at_the_tapped_name_is_named_not_taken_for_a_tap(
    sockdir: Path, planted: str
) -> None:
    """Another user's file at the name a tap gives the server's socket (in a directory
    anyone may write) blocks the tap, which says so: it is not taken for a running tap or
    a killed one's leftover (whose advice, ``--restore``, would put that file at the path)."""
    sockdir.chmod(0o1777)
    path = sockdir / "app.sock"
    aside = sockdir / ".app.sock.udskit-tapped"

    def plant() -> str:
        if planted == "file":
            aside.write_bytes(b"nobody's")
        else:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.bind(os.fspath(aside))
        return "planted"

    with server(path):
        inode = os.lstat(path).st_ino
        assert run_in_child(plant, as_user=NOBODY) == "planted"
        kind = "regular file" if planted == "file" else "socket"
        with pytest.raises(udskit.SocketFileError) as refused:
            tap.start(path, lambda event: None)
        assert str(refused.value) == (
            f"cannot tap {path}: a {kind} of uid {NOBODY} is at {aside.name}, the name the tap "
            "needs for the server's socket; remove it as its owner, or as root (udskit never "
            "deletes what it did not create)"
        )
        assert os.lstat(path).st_ino == inode
        assert os.lstat(aside).st_uid == NOBODY
