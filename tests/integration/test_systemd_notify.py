"""udskit.systemd against a notification socket read as systemd reads it (SO_PASSCRED,
the sender's pid from SCM_CREDENTIALS, descriptors by SCM_RIGHTS with FDSTORE=1)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import open_fds
from tests.systemd_manager import NotifySocket, notify_socket
from udskit import systemd

ME = (os.getpid(), os.getuid(), os.getgid())


@pytest.fixture
def manager(sockdir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    path = sockdir / "notify"
    monkeypatch.setenv("NOTIFY_SOCKET", os.fspath(path))
    with notify_socket(path) as receiver:
        yield receiver


@pytest.fixture
def no_leak() -> Iterator[None]:
    before = open_fds()
    yield
    leaked = {fd for fd in open_fds() - before if os.path.exists(f"/proc/self/fd/{fd}")}
    assert not leaked, f"descriptors leaked: {sorted(leaked)}"


def test_the_service_states(manager: NotifySocket, no_leak: None) -> None:
    with systemd.Notifier() as notifier:
        assert notifier.enabled
        assert notifier.ready(status="serving /run/app.sock")
        assert notifier.status("3 clients\nnow")
        assert notifier.mainpid(os.getpid())
        assert notifier.watchdog()
        assert notifier.stopping()
    received = [manager.receive(pid=os.getpid()) for _ in range(5)]
    assert [got.fields for got in received] == [
        {"READY": "1", "STATUS": "serving /run/app.sock"},
        {"STATUS": "3 clients\\x0anow"},
        {"MAINPID": str(os.getpid())},
        {"WATCHDOG": "1"},
        {"STOPPING": "1"},
    ]
    assert all((got.pid, got.uid, got.gid) == ME for got in received)
    assert not manager.pending()


def test_reloading_carries_the_monotonic_clock(manager: NotifySocket) -> None:
    """Type=notify-reload (systemd 253+) wants MONOTONIC_USEC= with RELOADING=1."""
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    with systemd.Notifier() as notifier:
        assert notifier.reloading(status="reloading")
        assert notifier.ready()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    got = manager.receive(pid=os.getpid())
    assert got.fields.keys() == {"RELOADING", "MONOTONIC_USEC", "STATUS"}
    assert before <= int(got.fields["MONOTONIC_USEC"]) <= after
    assert manager.receive(pid=os.getpid()).fields == {"READY": "1"}


def test_notify_in_one_call(manager: NotifySocket, no_leak: None) -> None:
    assert systemd.notify({"READY": 1, "STATUS": "up"})
    assert manager.receive(pid=os.getpid()).fields == {"READY": "1", "STATUS": "up"}


def test_an_abstract_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"@udskit-test-notify-{os.getpid()}"
    monkeypatch.setenv("NOTIFY_SOCKET", name)
    with notify_socket(name) as receiver, systemd.Notifier() as notifier:
        assert notifier.ready()
        assert receiver.receive(pid=os.getpid()).fields == {"READY": "1"}


def test_a_notify_socket_path_longer_than_sun_path(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch, no_leak: None
) -> None:
    deep = sockdir / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = deep / "notify"
    assert len(os.fsencode(path)) > 108
    monkeypatch.setenv("NOTIFY_SOCKET", os.fspath(path))
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dir_fd = os.open(deep, os.O_PATH | os.O_DIRECTORY)
    try:
        receiver.bind(f"/proc/self/fd/{dir_fd}/notify")
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        with systemd.Notifier() as notifier:
            assert notifier.ready()
        assert receiver.recv(4096) == b"READY=1"
    finally:
        os.close(dir_fd)
        receiver.close()


def test_the_descriptor_store(manager: NotifySocket, sockdir: Path, no_leak: None) -> None:
    """FDSTORE=1 passes the listener itself (SCM_RIGHTS); ours stays open."""
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(os.fspath(sockdir / "app.sock"))
        listener.listen()
        with systemd.Notifier() as notifier:
            assert notifier.store_fd(listener.fileno(), "/tmp/app.sock")
            assert notifier.remove_fd("/tmp/app.sock")
        got = manager.receive(pid=os.getpid())
        assert got.fields == {"FDSTORE": "1", "FDNAME": "/tmp/app.sock"}
        [stored] = got.fds
        mine, theirs = os.fstat(listener.fileno()), os.fstat(stored)
        assert (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)
        got.close()
        os.fstat(listener.fileno())  # still open here
        removed = manager.receive(pid=os.getpid())
        assert removed.fields == {"FDSTOREREMOVE": "1", "FDNAME": "/tmp/app.sock"}
        assert removed.fds == []


# -- systemd not there -------------------------------------------------------------------
def test_notify_socket_pointing_at_nothing(
    sockdir: Path, caplog: pytest.LogCaptureFixture, no_leak: None
) -> None:
    """One warning naming the variable and the path; every later failure only at debug."""
    path = sockdir / "gone"
    with caplog.at_level(logging.DEBUG, "udskit"), systemd.Notifier(os.fspath(path)) as notifier:
        assert not notifier.ready()
        assert not notifier.watchdog()
        assert not notifier.stopping()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    expected = (
        f"NOTIFY_SOCKET={path}: cannot notify systemd (READY=1 not sent: no socket at that "
        "path); the service goes on without notifications"
    )
    assert [r.getMessage() for r in warnings] == [expected]
    assert sum(r.levelno == logging.DEBUG for r in caplog.records) == 2


def test_notify_socket_nobody_listens_on(sockdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = sockdir / "stale"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as gone:
        gone.bind(os.fspath(path))  # closed at once: the file stays, stale
    with caplog.at_level(logging.WARNING, "udskit"), systemd.Notifier(os.fspath(path)) as notifier:
        assert not notifier.ready()
    assert "READY=1 not sent: nothing is listening on it" in caplog.text


def test_notify_socket_of_the_wrong_type(sockdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = sockdir / "stream"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stream:
        stream.bind(os.fspath(path))
        stream.listen()
        with caplog.at_level(logging.WARNING, "udskit"), systemd.Notifier(os.fspath(path)) as n:
            assert not n.ready()
    assert "READY=1 not sent: it is not a datagram socket" in caplog.text


def test_notify_socket_we_may_not_write(sockdir: Path) -> None:
    """EACCES: a socket of another user, mode 0600 (as nobody, in a child, when run as root)."""
    path = sockdir / "private"
    sockdir.chmod(0o755)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as private:
        private.bind(os.fspath(path))
        path.chmod(0o600 if os.geteuid() == 0 else 0o000)
        read_end, write_end = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover - the child reports through the pipe
            code = 1
            try:
                os.close(read_end)
                if os.geteuid() == 0:
                    os.setgroups([])
                    os.setgid(65534)
                    os.setuid(65534)
                records: list[str] = []
                handler = logging.Handler()
                handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
                logging.getLogger("udskit").addHandler(handler)
                with systemd.Notifier(os.fspath(path)) as notifier:
                    sent = [notifier.ready(), notifier.ready()]
                os.write(write_end, repr((sent, records)).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as report:
            text = report.read().decode()
        _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    expected = (
        f"NOTIFY_SOCKET={path}: cannot notify systemd (READY=1 not sent: permission "
        "denied); the service goes on without notifications"
    )
    assert text == repr(([False, False], [expected]))


def test_a_stuck_service_manager_does_not_hang_the_server(
    manager: NotifySocket, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A notification socket that nobody reads fills up: a send gives up after
    NOTIFY_SEND_TIMEOUT with a warning, instead of blocking the server for ever."""
    monkeypatch.setattr(systemd, "NOTIFY_SEND_TIMEOUT", 0.05)
    with caplog.at_level(logging.WARNING, "udskit"), systemd.Notifier() as notifier:
        sent = 0
        while notifier.watchdog():
            sent += 1
            assert sent < 100_000, "the queue never filled"
    assert "WATCHDOG=1 not sent: systemd did not take it within 0.05s" in caplog.text


# -- the watchdog ------------------------------------------------------------------------
def _watchdogs() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "udskit-watchdog"]


def test_watchdog_pings_until_stopped(manager: NotifySocket, no_leak: None) -> None:
    env = {"WATCHDOG_USEC": "40000", "WATCHDOG_PID": str(os.getpid())}
    with systemd.Notifier() as notifier:
        with notifier.watchdog_thread(environ=env) as dog:
            assert dog is not None
            assert dog.interval == pytest.approx(0.02)
            for _ in range(3):
                assert manager.receive(pid=os.getpid()).fields == {"WATCHDOG": "1"}
            assert dog.running
        assert not dog.running  # stopped and joined when the block ended
        assert _watchdogs() == []
    while manager.pending():  # the pings sent before the stop
        assert manager.receive(pid=os.getpid()).fields == {"WATCHDOG": "1"}


def test_watchdog_of_another_process_is_not_ours(manager: NotifySocket) -> None:
    env = {"WATCHDOG_USEC": "40000", "WATCHDOG_PID": "1"}
    with systemd.Notifier() as notifier, notifier.watchdog_thread(environ=env) as dog:
        assert dog is None
    assert not manager.pending()


def test_watchdog_pings_through_the_server_loop(manager: NotifySocket) -> None:
    """With via=, a ping is sent only when the loop runs it: a stuck loop stops the pings."""
    queued: list[object] = []
    env = {"WATCHDOG_USEC": "20000"}
    with systemd.Notifier() as notifier:
        dog = systemd.Watchdog.start(notifier, via=queued.append, environ=env)
        assert dog is not None
        deadline = time.monotonic() + 20
        while len(queued) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)  # polls the list the watchdog fills, bounded
        dog.stop()
        assert not manager.pending()  # nothing ran the pings: nothing was sent
        queued[0]()  # type: ignore[operator]
        assert manager.receive(pid=os.getpid()).fields == {"WATCHDOG": "1"}


def test_nothing_is_sent_after_close(manager: NotifySocket, no_leak: None) -> None:
    """A watchdog ping that comes late, after close(), makes no new socket."""
    notifier = systemd.Notifier()
    assert notifier.ready()
    notifier.close()
    assert not notifier.watchdog()
    notifier.close()  # idempotent
    assert manager.receive(pid=os.getpid()).fields == {"READY": "1"}
    assert not manager.pending()
