"""A successor that fails before "ready" leaves the old process serving; an old process
that dies mid-handover leaves the successor serving; one handover at a time."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
from array import array
from collections.abc import Callable
from pathlib import Path

import pytest

import udskit

from ..integration.children import Talker
from .harness import (
    PATIENCE,
    Child,
    ask,
    control_path,
    load,
    start_serving,
    start_upgrader,
)

CRASHING_SUCCESSOR = """
import sys, udskit
upgrader = udskit.Upgrader(sys.argv[1])
print("taken", upgrader.previous_pid, flush=True)
raise RuntimeError("the new version is broken")
"""


def owned_then_removed(a: Child, path: Path, stop: Callable[[], int]) -> None:
    """``a`` still serves ``path`` and owns it: stopping it removes the file."""
    assert ask(path, "stream", b"still") == f"{a.pid}:still".encode()
    assert stop() == 0
    assert a.leaked() == "leaked []"
    assert not os.path.lexists(path)
    assert not os.path.lexists(control_path(path))


def test_a_crashing_successor_leaves_the_old_one_serving(sockdir: Path) -> None:
    path = sockdir / "app.sock"
    with start_serving("server", path, "stream") as a:
        crash = subprocess.run(
            [sys.executable, "-c", CRASHING_SUCCESSOR, str(path)],
            capture_output=True,
            timeout=PATIENCE * 2,
            check=False,
        )
        assert crash.returncode == 1
        assert crash.stdout.decode() == f"taken {a.pid}\n"
        a.expect("the handover to pid")
        assert os.path.exists(path)
        # Handed over again later, all goes well, and the new one owns the file.
        with Child("server", path, "stream") as b:
            b.expect(f"took over from pid {a.pid}")
            assert a.finish() == 0
            assert a.leaked() == "leaked []"
            assert ask(path, "stream", b"x") == f"{b.pid}:x".encode()
            assert b.terminate() == 0
            assert not os.path.lexists(path)


def test_a_successor_killed_before_ready_leaves_the_old_one_serving(sockdir: Path) -> None:
    path = sockdir / "app.sock"
    with start_serving("messageserver", path, "stream") as a:
        with load(path, "stream") as clients:
            clients.wait_served_by(a.pid)
            with Child("upgrader", path, "stream") as b:
                b.expect(f"listening {a.pid}")  # it holds the listener, has not said ready
                b.kill()
            line = a.expect("the handover to pid")
            assert f"pid {b.pid} failed" in line
            assert "still serving" in line
            clients.wait_served_by(a.pid)
        assert clients.failures == []
        assert set(clients.served_by) == {a.pid}
        # Handed over again later, to a successor that does not die.
        with Child("aiomessageserver", path, "stream") as c:
            c.expect(f"took over from pid {a.pid}")
            assert a.finish() == 0
            assert a.leaked() == "leaked []"
            assert ask(path, "stream", b"x") == f"{c.pid}:x".encode()
            assert c.terminate() == 0
        assert not os.path.lexists(path)


def test_the_old_one_owns_the_file_after_a_failed_handover(sockdir: Path) -> None:
    path = sockdir / "app.sock"
    with start_serving("aioserver", path, "stream") as a:
        with Child("upgrader", path, "stream") as b:
            b.expect(f"listening {a.pid}")
            b.kill()
        a.expect("the handover to pid")
        owned_then_removed(a, path, a.terminate)


def test_a_hung_successor_is_dropped_after_ready_timeout(sockdir: Path) -> None:
    path = sockdir / "app.sock"
    with start_upgrader(path, "stream", "--ready-timeout", "0.3") as a:
        with Child("upgrader", path, "stream") as b:
            b.expect(f"listening {a.pid}")
            a.expect(f"pid {b.pid} did not say it was ready within 0.3 s; still serving")
            b.tell("ready")  # too late
            line = b.expect("error")
            assert line == (
                f"error HandoverError: cannot take over {path}: not ready within 0.3 s; the "
                "server goes on serving"
            )
            assert b.finish() == 0
            assert b.leaked() == "leaked []"
        assert os.path.exists(path)
        # The next successor, a prompt one, takes over.
        with Child("upgrader", path, "stream") as c:
            c.expect(f"listening {a.pid}")
            c.tell("ready")
            c.expect("ready")
            a.expect(f"handed over to {c.pid}")
            assert a.finish() == 0
            assert a.leaked() == "leaked []"
            assert ask(path, "stream", b"x") == f"{c.pid}:x".encode()
            c.tell("close")
            assert c.finish() == 0
            assert not os.path.lexists(path)


def test_the_old_one_killed_after_passing_the_listener(sockdir: Path) -> None:
    path = sockdir / "app.sock"
    with start_serving("server", path, "stream") as a, Child("upgrader", path, "stream") as b:
        b.expect(f"listening {a.pid}")
        inode = os.stat(path).st_ino
        a.kill()
        b.tell("ready")
        b.expect("ready")
        assert b.said(f"pid {a.pid} exited during the handover; serving on")
        assert ask(path, "stream", b"x") == f"{b.pid}:x".encode()
        assert os.stat(path).st_ino == inode
        # It offers handover in turn, at the control socket the dead one left behind.
        with Child("server", path, "stream") as c:
            c.expect(f"took over from pid {b.pid}")
            assert b.finish() == 0
            assert b.leaked() == "leaked []"
            assert c.terminate() == 0
        assert not os.path.lexists(path)


@pytest.mark.parametrize("attempt", range(3))
def test_the_old_one_killed_before_passing_the_listener(sockdir: Path, attempt: int) -> None:
    path = sockdir / "app.sock"

    def old(say: Callable[[str], None]) -> None:
        # A serving process as far as the conversation goes: a listener at the path, and a
        # control socket whose first request it reads, and then dies without answering.
        with udskit.listen(path), socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as ctl:
            ctl.bind(str(control_path(path)))
            ctl.listen()
            say("serving")
            conv, _ = ctl.accept()
            say(conv.recv(100).decode())
            select.select([], [], [])  # until killed

    with Talker(old) as a:
        assert a.line() == "serving"
        with Child("upgrader", path, "stream") as b:
            assert a.line() == '{"op":"take","version":1,"type":"stream"}'
            os.kill(a.pid, signal.SIGKILL)
            b.expect("listening None")  # started fresh: the stale files were replaced
            b.tell("ready")
            b.expect("ready")
            assert ask(path, "stream", b"x") == f"{b.pid}:x".encode()
            b.tell("close")
            assert b.finish() == 0
            assert b.leaked() == "leaked []"
        assert a.finish() == -signal.SIGKILL
    assert not os.path.lexists(path)


@pytest.mark.parametrize("attempt", range(3))
def test_the_old_one_dying_as_it_is_told_ready(sockdir: Path, attempt: int) -> None:
    path = sockdir / "app.sock"

    def old(say: Callable[[str], None]) -> None:
        # Passes its listener as a serving process does, and dies when told "ready".
        listener = udskit.listen(path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as ctl:
            ctl.bind(str(control_path(path)))
            ctl.listen()
            say("serving")
            conv, _ = ctl.accept()
            conv.recv(100)
            answer = b'{"op":"listener","type":"stream","pid":%d}' % os.getpid()
            conv.sendmsg(
                [answer],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", [listener.fileno()]))],
            )
            say(conv.recv(100).decode())
            os.kill(os.getpid(), signal.SIGKILL)

    with Talker(old) as a:
        assert a.line() == "serving"
        with Child("upgrader", path, "stream") as b:
            b.expect(f"listening {a.pid}")
            b.tell("ready")
            assert a.line() == '{"op":"ready"}'
            b.expect("ready")
            assert b.said(f"pid {a.pid} exited during the handover; serving on")
            assert ask(path, "stream", b"x") == f"{b.pid}:x".encode()
            b.tell("close")
            assert b.finish() == 0
            assert b.leaked() == "leaked []"
        assert a.finish() == -signal.SIGKILL
    assert not os.path.lexists(path)


def test_after_a_crash_the_next_one_starts_fresh(sockdir: Path) -> None:
    path = sockdir / "app.sock"
    with start_serving("aioserver", path, "stream") as a:
        a.kill()  # no handover under way: its socket file and control socket are stale
    assert os.path.exists(control_path(path))
    with Child("aiomessageserver", path, "stream") as b:
        b.expect("listening")
        assert ask(path, "stream", b"x") == f"{b.pid}:x".encode()
        assert not b.said("took over")
        # It offers handover in place of the stale control socket.
        with Child("server", path, "stream") as c:
            c.expect(f"took over from pid {b.pid}")
            assert b.finish() == 0
            assert b.leaked() == "leaked []"
            assert c.terminate() == 0
    assert not os.path.lexists(path)
    assert not os.path.lexists(control_path(path))
