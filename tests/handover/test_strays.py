"""Handover sockets that are not this path's server's: a symlink or a link planted at the
name (anyone may, in a directory others can write) never makes another server hand over,
and a socket file swapped mid-handover never leaves the path without a server."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import udskit
from udskit.errors import ProtocolError
from udskit.proto.handover import PID_MAX, decode

from .harness import control_path

OLD = """
import sys, udskit
u = udskit.Upgrader(sys.argv[1])
u.ready()
print("ready", flush=True)
print("handed over" if u.wait(float(sys.argv[2])) else "still serving", flush=True)
u.close()
"""


def old_server(path: Path, wait: float) -> subprocess.Popen[str]:
    """An Upgrader serving ``path`` in a process of its own; says whether it handed over."""
    process = subprocess.Popen(
        [sys.executable, "-c", OLD, os.fspath(path), str(wait)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert process.stdout.readline() == "ready\n"
    return process


def outcome(process: subprocess.Popen[str]) -> str:
    out, _ = process.communicate(timeout=30)
    return out.strip()


def test_a_symlink_to_another_servers_handover_socket_is_not_followed(
    sockdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    other = sockdir / "private" / "b.sock"
    other.parent.mkdir()
    b = old_server(other, 1.0)
    ours = sockdir / "a.sock"
    control_path(ours).symlink_to(control_path(other))
    with caplog.at_level(logging.WARNING, logger="udskit"):
        fresh = udskit.Upgrader(ours)  # a fresh start: the symlink is nobody's offer
    with fresh:
        assert fresh.previous_pid is None
        assert "is not a handover socket of this user (a symlink); ignoring it" in caplog.text
    assert outcome(b) == "still serving"


def test_a_link_to_another_servers_handover_socket_is_refused_before_ready(
    sockdir: Path,
) -> None:
    """Our own user's socket, but another path's: the listener it passes is not the socket
    at our path, so nothing is said ready, and that server goes on serving."""
    other = sockdir / "b.sock"
    b = old_server(other, 1.0)
    ours = sockdir / "a.sock"
    os.link(control_path(other), control_path(ours))
    with pytest.raises(udskit.HandoverError) as caught:
        udskit.Upgrader(ours)
    assert str(caught.value) == (
        f"cannot take over {ours}: the serving process passed a socket that is not the socket "
        "at that path (a stray handover socket next to it?)"
    )
    assert outcome(b) == "still serving"


def test_a_file_swapped_after_the_listener_passed_still_leaves_a_server(
    sockdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Once the old process has stopped, the successor serves whatever happens; a socket
    file that is no longer its socket's is not its to remove, and is left alone."""
    path = sockdir / "app.sock"
    old = old_server(path, 20.0)
    new = udskit.Upgrader(path)  # holds the listener now
    os.rename(path, sockdir / "moved.sock")
    path.write_text("someone else's")
    with caplog.at_level(logging.WARNING, logger="udskit"), new:
        new.ready()
        assert "serving on without owning the socket file" in caplog.text
        assert outcome(old) == "handed over"
    assert path.read_text() == "someone else's"  # never removed, though not a socket
    assert (sockdir / "moved.sock").exists()


@pytest.mark.parametrize("pid", [0, -1, PID_MAX + 1, 2**70])
def test_a_pid_that_is_no_process_is_a_protocol_error(pid: int) -> None:
    packet = b'{"op":"listener","type":"stream","pid":%d}' % pid
    with pytest.raises(ProtocolError, match="has a pid that is no process"):
        decode(packet, 1, ("listener",))


def test_during_an_upgrade_only_the_process_it_started_takes_over(
    sockdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = sockdir / "app.sock"
    slow = [sys.executable, "-c", "import time; time.sleep(1)"]  # starts, never takes over
    with caplog.at_level(logging.INFO, logger="udskit"):
        old = udskit.Upgrader(path, command=slow)
        with old:
            old.ready()
            old.upgrade()
            deadline = time.monotonic() + 20
            while "upgrading: started pid" not in caplog.text:
                assert time.monotonic() < deadline, caplog.text
                time.sleep(0.01)  # bounded: the control thread logs it at once
            started = int(caplog.text.split("upgrading: started pid ")[1].split()[0])
            with pytest.raises(udskit.HandoverError) as caught:
                udskit.Upgrader(path)
            assert str(caught.value) == (
                f"cannot take over {path}: an upgrade of {path} (pid {started}) is under "
                "way; try again when it is done"
            )
            assert not old.handed_over
    # Closed mid-upgrade: the process it started is stopped and reaped with it.
    assert not os.path.exists(f"/proc/{started}")
