"""``udskit serve --handover``, ``udskit upgrade`` and SIGHUP: a server restarted in place,
with the socket file (inode, mode) kept and the old process finishing and exiting alone."""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import time
from pathlib import Path

import pytest

from .conftest import COMMAND_TIMEOUT, UDSKIT, Background, one_line_error, udskit, wait_listening

SERVE = ("serve", "--echo", "--handover")


def serve(background: list[Background], path: Path, *extra: str) -> Background:
    server = Background([*UDSKIT, *SERVE, *extra, path])
    background.append(server)
    wait_listening(path, server.process)
    wait_offering(path)
    return server


def wait_offering(path: Path) -> None:
    """Until the handover socket next to ``path`` answers (bounded)."""
    control = path.parent / f".{path.name}.udskit-handover"
    deadline = time.monotonic() + COMMAND_TIMEOUT
    delay = 0.001
    while True:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
            if control.exists() and probe.connect_ex(os.fspath(control)) == 0:
                return
        assert time.monotonic() < deadline, f"no handover socket at {control}"
        time.sleep(delay)  # back-off between readiness checks, not synchronisation
        delay = min(delay * 2, 0.05)


def echo(path: Path, text: str) -> str:
    result = udskit("send", "--reply", path, text)
    assert result.code == 0, result.err
    return result.text


def served_by(path: Path) -> int:
    """The pid that serves ``path``, as ``udskit doctor`` tells it."""
    result = udskit("doctor", path)
    match = re.search(r"a stream server, pid (\d+)", result.text)
    assert match, result.text
    return int(match.group(1))


def stop_pid(pid: int) -> None:
    """End a server this test started (through its predecessor), by pid."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + COMMAND_TIMEOUT
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.01)  # it is not our child: poll for its exit, bounded


def assert_sockets_held_once_and_not_inherited(pid: int) -> None:
    """Each socket once, close-on-exec: a received listener without it would be inherited
    by the next successor (and any --exec command), one more copy each generation."""
    held: dict[str, list[int]] = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        target = os.readlink(f"/proc/{pid}/fd/{name}")
        if target.startswith("socket:"):
            held.setdefault(target, []).append(int(name))
    assert len(held) >= 2, held  # the listener and the handover socket at least
    for target, fds in held.items():
        assert len(fds) == 1, (target, fds)
        with open(f"/proc/{pid}/fdinfo/{fds[0]}", encoding="ascii") as f:
            match = re.search(r"flags:\s+([0-7]+)", f.read())
        assert match, (target, fds)
        assert int(match.group(1), 8) & os.O_CLOEXEC, (target, fds)


def test_second_server_takes_over(sockdir: Path, background: list[Background]) -> None:
    path = sockdir / "app.sock"
    first = serve(background, path, "--mode", "660")
    before = os.stat(path)
    assert echo(path, "one") == "one\n"
    second = Background([*UDSKIT, *SERVE, "-v", path])
    background.append(second)
    second.read_until(f"took {path} over from pid {first.pid}".encode(), stream="stderr")
    assert first.wait() == 0  # it finished its (no) clients and left on its own
    after = os.stat(path)
    assert (after.st_ino, after.st_mode, after.st_uid) == (
        before.st_ino,
        before.st_mode,
        before.st_uid,
    )
    assert stat.S_IMODE(after.st_mode) == 0o660
    assert echo(path, "two") == "two\n"
    assert served_by(path) == second.pid
    assert second.stop() == 0
    assert not path.exists()
    assert not (sockdir / ".app.sock.udskit-handover").exists()


def test_upgrade_subcommand(sockdir: Path, background: list[Background]) -> None:
    path = sockdir / "app.sock"
    first = serve(background, path)
    inode = os.stat(path).st_ino
    result = udskit("upgrade", path)
    assert result.code == 0, result.err
    match = re.fullmatch(
        rf"{re.escape(str(path))}: pid {first.pid} handed over to pid (\d+)\n", result.text
    )
    assert match, result.text
    new = int(match.group(1))
    try:
        assert served_by(path) == new
        assert echo(path, "after") == "after\n"
        assert os.stat(path).st_ino == inode
        assert first.process.wait(COMMAND_TIMEOUT) == 0
        # Again, now that the process that created both sockets is gone for good: the
        # new one is found by what it says, not by SO_PEERCRED (which names the first).
        again = udskit("upgrade", path)
        assert again.code == 0, again.err
        assert again.text.startswith(f"{path}: pid {new} handed over to pid "), again.text
        newest = int(again.text.split()[-1])
        stop_pid(new)
        new = newest
        assert_sockets_held_once_and_not_inherited(new)
        assert echo(path, "third") == "third\n"
        assert os.stat(path).st_ino == inode
    finally:
        stop_pid(new)
    assert not path.exists()


def test_sighup_upgrades(sockdir: Path, background: list[Background]) -> None:
    path = sockdir / "app.sock"
    first = serve(background, path)
    first.process.send_signal(signal.SIGHUP)
    assert first.process.wait(COMMAND_TIMEOUT) == 0
    new = served_by(path)
    try:
        assert new != first.pid
        assert echo(path, "hup") == "hup\n"
    finally:
        stop_pid(new)


def test_ls_and_doctor_show_the_handover_socket(
    sockdir: Path, background: list[Background]
) -> None:
    path = sockdir / "app.sock"
    server = serve(background, path)
    rows = udskit("ls", sockdir).text.splitlines()
    assert any(re.match(rf"stream +listening +\d+ +{server.pid} .*{path}$", r) for r in rows), rows
    assert any(re.match(rf"seqpacket +handover +{server.pid} .*{path}$", r) for r in rows), rows
    text = udskit("doctor", path).text
    assert f"pid {server.pid} offers handover: 'udskit upgrade {path}'" in text


def test_upgrade_without_handover_is_one_line(sockdir: Path, background: list[Background]) -> None:
    path = sockdir / "plain.sock"
    plain = Background([*UDSKIT, "serve", "--echo", path])
    background.append(plain)
    wait_listening(path, plain.process)
    line = one_line_error(udskit("upgrade", path), 1)
    assert line == (
        f"udskit upgrade: cannot upgrade {path}: no udskit server offers handover there "
        "(start it with handover, or restart it by hand)"
    )
    assert echo(path, "still") == "still\n"


def test_handover_refuses_another_type(sockdir: Path, background: list[Background]) -> None:
    path = sockdir / "app.sock"
    serve(background, path)
    result = udskit(*SERVE, "--type", "seqpacket", path)
    line = one_line_error(result, 1)
    assert line.endswith(f"cannot take over {path}: {path} serves type=stream, not type=seqpacket")
    assert echo(path, "kept") == "kept\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--drain-timeout", "0"), "'0' must be more than 0 seconds"),
        (("--drain-timeout", "-1"), "'-1' must be a finite number of seconds, more than 0"),
        (("--drain-timeout", "soon"), "'soon' is not a number of seconds"),
    ],
)
def test_bad_drain_timeout(sockdir: Path, args: tuple[str, ...], message: str) -> None:
    line = one_line_error(udskit(*SERVE, *args, sockdir / "x.sock"), 2)
    assert message in line
    assert not (sockdir / "x.sock").exists()


def test_handover_needs_a_path() -> None:
    line = one_line_error(udskit(*SERVE, "@udskit-test-handover"), 1)
    assert "handover needs a socket path, not @udskit-test-handover" in line


def test_upgrade_bad_inputs(sockdir: Path) -> None:
    line = one_line_error(udskit("upgrade", sockdir / "missing.sock"), 1)
    assert "no udskit server offers handover there" in line
    line = one_line_error(udskit("upgrade", "--timeout", "0", sockdir / "x.sock"), 2)
    assert "'0' must be more than 0 seconds" in line
    line = one_line_error(udskit("upgrade", "tcp:127.0.0.1:1"), 1)
    assert "handover needs a socket path" in line


TAKER = """
import sys
import udskit
upgrader = udskit.Upgrader(sys.argv[1])
print(upgrader.previous_pid, flush=True)
sys.stdin.read()  # hold the listener, not ready, until told
upgrader.close()
"""


def test_doctor_during_a_handover(sockdir: Path, background: list[Background]) -> None:
    """A successor that holds the listener but is not ready yet: doctor names both, and
    the old one still serves (and still owns the file) once the successor gives up."""
    path = sockdir / "app.sock"
    first = serve(background, path)
    taker = Background([UDSKIT[0], "-c", TAKER, path])
    background.append(taker)
    assert taker.read_until(b"\n").strip() == str(first.pid).encode()
    text = udskit("doctor", path).text
    pids = ", ".join(str(p) for p in sorted((first.pid, taker.pid)))
    assert f"processes {pids} hold the listening socket: a handover is under way" in text
    assert f"a stream server, pid {first.pid}" in text
    assert taker.wait() == 0  # closes without saying ready
    assert echo(path, "still") == "still\n"
    assert served_by(path) == first.pid
    assert first.stop() == 0
    assert not path.exists()
