"""``udskit serve`` as a systemd service: Type=notify (READY=1, STATUS=, STOPPING=1, the
watchdog), the descriptor store across restarts, and a NOTIFY_SOCKET that is not there.

The service manager is played by the test: it binds NOTIFY_SOCKET and reads it as systemd
does (tests/systemd_manager.py), keeps the descriptors sent with FDSTORE=1, and passes them
back to the next start in LISTEN_FDS/LISTEN_FDNAMES, as systemd does on a restart.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import udskit
from tests.cli.conftest import COMMAND_TIMEOUT, wait_listening
from tests.systemd_manager import NotifySocket, notify_socket, start_service
from udskit import systemd
from udskit.cli import _systemd

SERVE = ["-m", "udskit", "serve", "--echo", "--framing", "lines"]


@pytest.fixture
def manager(sockdir: Path) -> Iterator[NotifySocket]:
    with notify_socket(sockdir / "notify") as receiver:
        yield receiver


def _env(manager: NotifySocket, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "WATCHDOG_"))}
    env.pop("FDSTORE", None)
    return {**env, "NOTIFY_SOCKET": manager.path, **extra}


def _echo(path: Path, text: bytes = b"hello\n") -> bytes:
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(COMMAND_TIMEOUT)
        client.connect(os.fspath(path))
        client.sendall(text)
        return _line(client)


def _line(client: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = client.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def _stop(server: subprocess.Popen[bytes]) -> str:
    """SIGTERM, as systemctl stop and restart send; the server's stderr."""
    return _stop_with_output(server)[1]


def _stop_with_output(server: subprocess.Popen[bytes]) -> tuple[bytes, str]:
    server.send_signal(signal.SIGTERM)
    try:
        out, err = server.communicate(timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        server.kill()
        server.communicate()
        raise
    assert server.returncode == 0, err
    return out, err.decode()


def _output_line(server: subprocess.Popen[bytes]) -> bytes:
    """The server's next line on stdout (bounded wait), read a byte at a time."""
    assert server.stdout is not None
    line = b""
    while not line.endswith(b"\n"):
        ready, _, _ = select.select([server.stdout], [], [], COMMAND_TIMEOUT)
        assert ready, f"the server printed nothing in time after {line!r}"
        byte = os.read(server.stdout.fileno(), 1)
        assert byte, f"the server's output ended after {line!r}"
        line += byte
    return line


def _sockets_of(pid: int) -> list[str]:
    """The socket inodes a process holds, one entry per descriptor."""
    found = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except FileNotFoundError:
            continue
        if target.startswith("socket:"):
            found.append(target)
    return found


def _inode(path: Path) -> tuple[int, int]:
    found = os.stat(path, follow_symlinks=False)
    return found.st_dev, found.st_ino


def _kill_on_failure(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is None:
        server.kill()
        server.communicate()


# -- Type=notify -------------------------------------------------------------------------
def test_ready_status_watchdog_stopping(manager: NotifySocket, sockdir: Path) -> None:
    path = sockdir / "app.sock"
    server = start_service([*SERVE, os.fspath(path)], _env(manager, WATCHDOG_USEC="100000"))
    try:
        ready = manager.receive(pid=server.pid)
        assert ready.fields == {"READY": "1", "STATUS": f"serving {path} (stream)"}
        assert _echo(path) == b"hello\n"  # READY=1 came once it listens
        for _ in range(2):
            assert manager.receive(pid=server.pid).fields == {"WATCHDOG": "1"}
        err = _stop(server)
    finally:
        _kill_on_failure(server)
    rest = manager.receive_until("STOPPING", pid=server.pid)
    assert rest[-1].fields == {"STOPPING": "1"}
    assert all(got.fields == {"WATCHDOG": "1"} for got in rest[:-1])
    assert not manager.pending()  # nothing after STOPPING=1: the watchdog ended with it
    assert err == ""
    assert not path.exists()  # no descriptor store: the file goes, as without systemd


def test_notify_socket_pointing_at_nothing(sockdir: Path) -> None:
    """A warning that names the variable and the path; the server serves all the same."""
    path = sockdir / "app.sock"
    gone = sockdir / "no-such-notify"
    env = {**os.environ, "NOTIFY_SOCKET": os.fspath(gone), "WATCHDOG_USEC": "20000"}
    server = start_service([*SERVE, os.fspath(path)], env)
    try:
        wait_listening(path, server)
        for _ in range(3):
            assert _echo(path) == b"hello\n"
        err = _stop(server)
    finally:
        _kill_on_failure(server)
    warning = (
        f"udskit: NOTIFY_SOCKET={gone}: cannot notify systemd (READY=1 not sent: no socket at "
        "that path); the service goes on without notifications"
    )
    assert err.splitlines() == [warning]
    assert not path.exists()


# -- the descriptor store ----------------------------------------------------------------
def test_restart_keeps_the_socket(manager: NotifySocket, sockdir: Path) -> None:
    """systemctl restart with FileDescriptorStoreMax=: the listener goes to the store, the
    file stays at its inode, a client that connects during the restart is served by the
    next start, which takes the listener back instead of claiming the path."""
    path = sockdir / "app.sock"
    env = _env(manager, FDSTORE="1")
    first = start_service([*SERVE, os.fspath(path)], env)
    try:
        stored = manager.receive(pid=first.pid)
        assert stored.fields == {"FDSTORE": "1", "FDNAME": os.fspath(path)}
        assert manager.receive(pid=first.pid).fields["READY"] == "1"
        [listener] = stored.fds
        inode = _inode(path)
        assert _sockets_of(first.pid).count(os.readlink(f"/proc/self/fd/{listener}")) == 1
        assert _stop(first) == ""
    finally:
        _kill_on_failure(first)
    assert manager.receive(pid=first.pid).fields == {"STOPPING": "1"}
    assert _inode(path) == inode  # left for the next start

    with socket.socket(socket.AF_UNIX) as waiting:  # connects while no process serves
        waiting.settimeout(COMMAND_TIMEOUT)
        waiting.connect(os.fspath(path))
        waiting.sendall(b"during the restart\n")
        second = start_service([*SERVE, os.fspath(path)], env, [(listener, os.fspath(path))])
        try:
            ready = manager.receive(pid=second.pid)
            assert ready.fields == {
                "READY": "1",
                "STATUS": f"serving {path} (stream, kept by systemd across the restart)",
            }
            assert _line(waiting) == b"during the restart\n"
            assert _echo(path) == b"hello\n"
            assert _inode(path) == inode
            # One copy of the listener in the service: descriptor 3, and nothing stored twice.
            kept = os.readlink(f"/proc/self/fd/{listener}")
            assert _sockets_of(second.pid).count(kept) == 1
            assert os.readlink(f"/proc/{second.pid}/fd/3") == kept
            assert _stop(second) == ""
        finally:
            _kill_on_failure(second)
    assert manager.receive(pid=second.pid).fields == {"STOPPING": "1"}
    assert not manager.pending()  # no second FDSTORE=1: it is in the store already
    assert _inode(path) == inode

    # systemctl stop: systemd closes what it stored; the stale file is reclaimed at the
    # next start, which stores its new listener.
    os.close(listener)
    third = start_service([*SERVE, os.fspath(path)], env)
    try:
        again = manager.receive(pid=third.pid)
        assert again.fields == {"FDSTORE": "1", "FDNAME": os.fspath(path)}
        again.close()
        assert manager.receive(pid=third.pid).fields["READY"] == "1"
        assert _echo(path) == b"hello\n"  # the stale file was replaced: it would refuse
        assert _stop(third) == ""
    finally:
        _kill_on_failure(third)


@pytest.mark.parametrize("kind", ["dgram", "abstract"])
def test_restart_keeps_datagram_and_abstract_sockets(
    manager: NotifySocket, sockdir: Path, kind: str
) -> None:
    """A datagram sent while no process serves waits in the kept socket; an abstract name
    stays bound across the restart (it has no file: nothing to adopt)."""
    if kind == "dgram":
        where = os.fspath(sockdir / "app.sock")
        args = ["-m", "udskit", "serve", "--type", "dgram", "--print", where]
        sockaddr: str | bytes = where
        kind_of = socket.SOCK_DGRAM
    else:
        where = f"@udskit-test-store-{os.getpid()}"
        args = [*SERVE, where]
        sockaddr = b"\0" + where[1:].encode()
        kind_of = socket.SOCK_STREAM
    env = _env(manager, FDSTORE="1")
    first = start_service(args, env)
    try:
        stored = manager.receive(pid=first.pid)
        assert stored.fields == {"FDSTORE": "1", "FDNAME": where}
        assert manager.receive(pid=first.pid).fields["READY"] == "1"
        first_err = _stop(first)
    finally:
        _kill_on_failure(first)
    assert manager.receive(pid=first.pid).fields == {"STOPPING": "1"}
    if kind == "abstract":  # udskit's own warning at the first bind, as without systemd
        assert "abstract names have no file permissions" in first_err
    else:
        assert first_err == ""
    [listener] = stored.fds
    with socket.socket(socket.AF_UNIX, kind_of) as client:
        client.settimeout(COMMAND_TIMEOUT)
        client.connect(sockaddr)  # no process serves: the kept socket takes it
        client.send(b"in the gap\n")
        second = start_service(args, env, [(listener, where)])
        try:
            ready = manager.receive_until("READY", pid=second.pid)[-1]
            assert ready.fields["STATUS"].endswith("kept by systemd across the restart)")
            if kind == "abstract":
                assert _line(client) == b"in the gap\n"
            else:
                assert _output_line(second) == b"in the gap\n"  # --print: sent meanwhile
            out, err = _stop_with_output(second)
        finally:
            _kill_on_failure(second)
            os.close(listener)
    assert err == ""
    assert out == b""
    if kind == "dgram":
        assert os.path.exists(where)  # kept for the next start


def test_a_server_that_ends_on_its_own_leaves_the_store(
    manager: NotifySocket, sockdir: Path
) -> None:
    """--once (or --until): the service is done: FDSTOREREMOVE=1, and the file goes."""
    path = sockdir / "app.sock"
    env = _env(manager, FDSTORE="1")
    server = start_service([*SERVE, "--once", os.fspath(path)], env)
    try:
        stored = manager.receive(pid=server.pid)
        assert stored.fields["FDSTORE"] == "1"
        assert manager.receive(pid=server.pid).fields["READY"] == "1"
        assert _echo(path) == b"hello\n"
        _, err = server.communicate(timeout=COMMAND_TIMEOUT)
    finally:
        _kill_on_failure(server)
        stored.close()
    assert server.returncode == 0, err
    assert [got.fields for got in manager.receive_until("FDSTOREREMOVE", server.pid)] == [
        {"STOPPING": "1"},
        {"FDSTOREREMOVE": "1", "FDNAME": os.fspath(path)},
    ]
    assert not path.exists()


def test_a_stored_socket_taken_back_is_removed_when_done(
    manager: NotifySocket, sockdir: Path
) -> None:
    """The file of a listener taken from the store is this server's to remove (adopted)."""
    path = sockdir / "app.sock"
    with socket.socket(socket.AF_UNIX) as old:
        old.bind(os.fspath(path))
        old.listen()
        server = start_service(
            [*SERVE, "--once", os.fspath(path)],
            _env(manager, FDSTORE="1"),
            [(old.fileno(), os.fspath(path))],
        )
    try:
        assert manager.receive(pid=server.pid).fields["READY"] == "1"
        assert _echo(path) == b"hello\n"
        _, err = server.communicate(timeout=COMMAND_TIMEOUT)
    finally:
        _kill_on_failure(server)
    assert server.returncode == 0, err
    assert manager.receive_until("FDSTOREREMOVE", server.pid)[-1].fields == {
        "FDSTOREREMOVE": "1",
        "FDNAME": os.fspath(path),
    }
    assert not path.exists()


@pytest.mark.parametrize("fault", ["type", "file", "not a socket"])
def test_a_stored_socket_that_no_longer_fits(
    manager: NotifySocket, sockdir: Path, fault: str
) -> None:
    """A stored listener of another --type, or whose file was removed meanwhile: one line,
    the listener dropped from the store (so that the next start begins afresh), exit 1."""
    path = sockdir / "app.sock"
    with socket.socket(socket.AF_UNIX) as old, open(sockdir / "file", "w") as not_a_socket:
        old.bind(os.fspath(path))
        old.listen()
        if fault == "file":
            path.unlink()
        extra = ["--type", "dgram"] if fault == "type" else ["--framing", "lines"]
        kept = not_a_socket.fileno() if fault == "not a socket" else old.fileno()
        server = start_service(
            ["-m", "udskit", "serve", "--echo", *extra, os.fspath(path)],
            _env(manager, FDSTORE="1"),
            [(kept, os.fspath(path))],
        )
        try:
            _, err = server.communicate(timeout=COMMAND_TIMEOUT)
        finally:
            _kill_on_failure(server)
    assert server.returncode == 1
    [line] = err.decode().splitlines()
    if fault == "type":
        assert line == (
            f"udskit serve: cannot serve {path} as --type dgram: the socket systemd kept for it "
            f"(FDNAME={path}) is a stream socket; it is now dropped from the store: start the "
            "service again"
        )
    elif fault == "not a socket":
        assert line == (
            f"udskit serve: cannot serve {path} as --type stream: the socket systemd kept for "
            f"it (FDNAME={path}) is not a socket udskit serves; it is now dropped from the "
            "store: start the service again"
        )
    else:
        assert line == (
            f"udskit serve: cannot serve {path}: the file at the path is not the socket systemd "
            f"kept for it (FDNAME={path}); it was removed or replaced since: the kept socket is "
            "now dropped from the store: start the service again"
        )
    got = manager.receive(pid=server.pid)
    assert got.fields == {"FDSTOREREMOVE": "1", "FDNAME": os.fspath(path)}


def test_a_stored_socket_keeps_its_first_mode(manager: NotifySocket, sockdir: Path) -> None:
    """--mode changed between restarts: the kept socket's file keeps its mode; one warning."""
    path = sockdir / "app.sock"
    with socket.socket(socket.AF_UNIX) as old:
        old.bind(os.fspath(path))
        old.listen()
        path.chmod(0o660)
        server = start_service(
            [*SERVE, "--once", "--mode", "600", os.fspath(path)],
            _env(manager, FDSTORE="1"),
            [(old.fileno(), os.fspath(path))],
        )
    try:
        assert manager.receive(pid=server.pid).fields["READY"] == "1"
        assert _echo(path) == b"hello\n"
        _, err = server.communicate(timeout=COMMAND_TIMEOUT)
    finally:
        _kill_on_failure(server)
    assert server.returncode == 0
    warning = (
        f"udskit: {path} keeps mode 0660 from its first start, not --mode 0600: the socket "
        "comes from systemd's descriptor store; stop the service (not restart) to apply it"
    )
    assert err.decode().splitlines() == [warning]


def test_exec_commands_inherit_no_service_variables(manager: NotifySocket, sockdir: Path) -> None:
    """An --exec command is not the service: no NOTIFY_SOCKET, WATCHDOG_*, FDSTORE, LISTEN_*."""
    path = sockdir / "app.sock"
    command = "sh -c 'env | grep -E \"^(NOTIFY_|WATCHDOG_|FDSTORE|LISTEN_)\" || echo clean'"
    env = _env(manager, FDSTORE="1", WATCHDOG_USEC="60000000", WATCHDOG_PID="1")
    server = start_service(
        ["-m", "udskit", "serve", "--once", "--exec", command, os.fspath(path)], env
    )
    try:
        manager.receive_until("READY", pid=server.pid)[0].close()
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(COMMAND_TIMEOUT)
            client.connect(os.fspath(path))
            client.shutdown(socket.SHUT_WR)
            assert _line(client) == b"clean\n"
        _, err = server.communicate(timeout=COMMAND_TIMEOUT)
    finally:
        _kill_on_failure(server)
    assert server.returncode == 0, err


# -- the watchdog ends with the server ---------------------------------------------------
def test_the_watchdog_thread_stops_with_the_server(
    manager: NotifySocket, sockdir: Path, monkeypatch: pytest.MonkeyPatch, no_fd_leak: None
) -> None:
    """In-process: the pings stop, their thread ends and the notification socket is closed
    when the server stops (with the listener in the store, which keeps its own copy)."""
    monkeypatch.setenv("NOTIFY_SOCKET", manager.path)
    monkeypatch.setenv("WATCHDOG_USEC", "20000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.setenv("FDSTORE", "1")
    path = udskit.Address.parse(sockdir / "app.sock")
    unit = _systemd.Unit(path, "stream", 0o600)

    def watchdogs() -> list[str]:
        import threading

        return [t.name for t in threading.enumerate() if t.name == "udskit-watchdog"]

    with udskit.MessageServer(unit.listen_address, lambda conn, message: message) as server:
        with unit.serving(server):
            assert watchdogs() == ["udskit-watchdog"]
            server.call_soon(server.stop)
            # The pings go through the serving loop: they flow while it runs.
            stored = manager.receive(pid=os.getpid())
            assert stored.fields["FDSTORE"] == "1"
            stored.close()  # as systemctl stop: the store's copy is closed
            assert manager.receive(pid=os.getpid()).fields["READY"] == "1"
            server.serve_forever()
        assert watchdogs() == []
    fields = [got.fields for got in manager.receive_until("STOPPING", pid=os.getpid())]
    assert fields[-1] == {"STOPPING": "1"}
    assert not manager.pending()
    assert os.path.exists(path.path)  # stopped, not ended: left for systemd


# -- socket activation by systemd's own tool ---------------------------------------------
def test_socket_activated_by_name(manager: NotifySocket, sockdir: Path) -> None:
    """systemd-socket-activate with two sockets named by --fdname (a .socket unit's
    FileDescriptorName=): fd:listen:NAME serves the one named, and READY=1 comes from it."""
    activator = shutil.which("systemd-socket-activate")
    if activator is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-socket-activate is missing (package systemd)")
        pytest.skip("systemd-socket-activate is not installed (package systemd)")
    admin, web = sockdir / "admin.sock", sockdir / "web.sock"
    with subprocess.Popen(
        [
            activator,
            *("-l", os.fspath(admin), "-l", os.fspath(web), "--fdname=admin:web"),
            f"--setenv=PYTHONPATH={Path(udskit.__file__).parent.parent}",
            f"--setenv=NOTIFY_SOCKET={manager.path}",
            *(sys.executable, *SERVE, "fd:listen:web"),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as service:
        try:
            wait_listening(web, service)
            assert _echo(web) == b"hello\n"  # the first client starts the service
            ready = manager.receive(pid=service.pid)  # the activator execs: same pid
            assert ready.fields == {"READY": "1", "STATUS": "serving fd:4 (stream)"}
            assert _echo(web, b"again\n") == b"again\n"
            err = _stop(service)
        finally:
            _kill_on_failure(service)
    assert "udskit:" not in err, err
    assert "udskit serve:" not in err, err
    assert manager.receive(pid=service.pid).fields == {"STOPPING": "1"}
    assert web.exists()  # the activator's socket: udskit never removes it


# -- handover under systemd --------------------------------------------------------------


def test_handover_makes_the_successor_the_main_process(
    manager: NotifySocket, sockdir: Path
) -> None:
    """`udskit upgrade` on a Type=notify service: the successor says MAINPID= and READY=1
    once it has taken over, the old one hands MAINPID= over too (NotifyAccess=main takes it
    from the main process alone) and never says STOPPING=1: the service goes on. The
    watchdog is the successor's to ping, whatever WATCHDOG_PID the manager set."""
    path = sockdir / "app.sock"
    first = start_service(
        [*SERVE, "--handover", os.fspath(path)], _env(manager, WATCHDOG_USEC="5000000")
    )
    successor: list[int] = []  # started by the first, for this test: ended by it, by pid
    try:
        ready = manager.receive(pid=first.pid)
        assert ready.fields == {"READY": "1", "STATUS": f"serving {path} (stream)"}
        old, new = udskit.handover.request_upgrade(path)
        successor.append(new)
        assert old == first.pid
        # Both say MAINPID=, in whichever order they get to it.
        got = manager.receive_until("MAINPID") + manager.receive_until("MAINPID")
        took = [n.fields for n in got if n.pid == new]
        assert took == [
            {
                "MAINPID": str(new),
                "READY": "1",
                "STATUS": f"serving {path} (stream), taken over from pid {first.pid}",
            }
        ]
        handed = [n.fields for n in got if n.pid == first.pid and "MAINPID" in n.fields]
        assert handed == [{"MAINPID": str(new), "STATUS": f"handed over to pid {new}"}]
        assert first.wait(COMMAND_TIMEOUT) == 0
        for pipe in (first.stdout, first.stderr):  # shared with the successor: not read
            assert pipe is not None
            pipe.close()
        assert _echo(path) == b"hello\n"
    except BaseException:
        for pid in successor:
            os.kill(pid, signal.SIGKILL)
        raise
    finally:
        _kill_on_failure(first)
    os.kill(new, signal.SIGTERM)
    rest = manager.receive_until("STOPPING")
    assert rest[-1].pid == new
    assert all("STOPPING" not in n.fields for n in rest[:-1])
    assert all(n.pid != first.pid or "STOPPING" not in n.fields for n in rest)


def test_a_finished_servers_file_is_removed_while_systemd_still_keeps_its_socket(
    manager: NotifySocket, sockdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim checks the file by its inode, which only an open socket keeps from being
    freed and given to a file another user makes at the path: at the release, the copy
    systemd stored (the last one open: the server closed its own) must still be there.
    systemd closes it on FDSTOREREMOVE, which is played here at once."""
    path = sockdir / "app.sock"
    monkeypatch.setenv("NOTIFY_SOCKET", manager.path)
    monkeypatch.setenv("FDSTORE", "1")
    unit = _systemd.Unit(udskit.Address.parse(os.fspath(path)), "stream", 0o600)
    stored: list[int] = []
    kept_at_release: list[bool] = []
    real_remove, real_release = systemd.Notifier.remove_fd, udskit.sockfile.Claim.release

    def remove_fd(notifier: systemd.Notifier, name: str) -> bool:
        for fd in stored:  # systemd closes its copy
            os.close(fd)
        stored.clear()
        return real_remove(notifier, name)

    def release(claim: udskit.sockfile.Claim) -> None:
        kept_at_release.append(bool(stored))
        real_release(claim)

    monkeypatch.setattr(systemd.Notifier, "remove_fd", remove_fd)
    monkeypatch.setattr(udskit.sockfile.Claim, "release", release)
    server = udskit.MessageServer(os.fspath(path), lambda conn, message: message)
    try:
        with unit.serving(server):
            got = manager.receive()
            assert got.fields["FDSTORE"] == "1"
            stored.extend(got.fds)
            unit.finished = True
            server.close()  # a stored listener's file stays: the unit decides
            assert path.exists()
    finally:
        server.close()
        for fd in stored:
            os.close(fd)
    assert kept_at_release == [True]
    assert not path.exists()
