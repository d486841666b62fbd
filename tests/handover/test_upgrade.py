"""``Upgrader(command=...)``: the serving process starts its own successor, asked by
``upgrade()`` or by an ``upgrade`` request on its control socket, and says how it went."""

from __future__ import annotations

import json
import os
import select
import signal
import sys
from pathlib import Path

from ..conftest import READY_TIMEOUT
from .harness import SCRIPT, ask, raw_control, start_upgrader


def stop_stranger(pid: int) -> None:
    """Stop a successor the serving process started (not our child: wait on its pidfd)."""
    pidfd = os.pidfd_open(pid)
    try:
        os.kill(pid, signal.SIGTERM)
        ready, _, _ = select.select([pidfd], [], [], READY_TIMEOUT)
        assert ready, f"pid {pid} did not stop"
    finally:
        os.close(pidfd)


def successor_argv(path: Path) -> str:
    return json.dumps([sys.executable, str(SCRIPT), "server", str(path), "stream"])


def test_an_upgrade_asked_on_the_control_socket(sockdir: Path) -> None:
    path = sockdir / "app.sock"
    with start_upgrader(path, "stream", "--command", successor_argv(path)) as a:
        with raw_control(path) as conv:
            conv.send(b'{"op":"upgrade"}')
            answer = json.loads(conv.recv(8192))
        assert answer["op"] == "upgraded", answer
        new = answer["pid"]
        try:
            a.expect(f"handed over to {new}")
            assert a.finish() == 0  # it may accept a last client as it stops: it serves it
            assert ask(path, "stream", b"x") == f"{new}:x".encode()
            assert a.leaked() == "leaked []"
            assert os.path.exists(path)
        finally:
            stop_stranger(new)
    assert not os.path.lexists(path)


def test_upgrade_called_in_the_serving_process(sockdir: Path) -> None:
    path = sockdir / "app.sock"
    with start_upgrader(path, "stream", "--command", successor_argv(path)) as a:
        a.tell("upgrade")
        line = a.expect("handed over to ")
        new = int(line.rsplit(" ", 1)[1])
        try:
            assert a.finish() == 0
            assert ask(path, "stream", b"x") == f"{new}:x".encode()
            assert a.said(f"upgrading: started pid {new}")
        finally:
            stop_stranger(new)
    assert not os.path.lexists(path)


def test_a_successor_that_exits_at_once(sockdir: Path) -> None:
    path = sockdir / "app.sock"
    argv = json.dumps([sys.executable, "-c", "raise SystemExit(3)"])
    with start_upgrader(path, "stream", "--command", argv) as a:
        with raw_control(path) as conv:
            conv.send(b'{"op":"upgrade"}')
            answer = json.loads(conv.recv(8192))
        assert answer["op"] == "error"
        assert answer["reason"].startswith("the new process (pid ")
        assert answer["reason"].endswith("exited with status 3 before taking over; see its output")
        assert ask(path, "stream", b"x") == f"{a.pid}:x".encode()
        a.tell("close")
        assert a.finish() == 0
        assert a.leaked() == "leaked []"
    assert not os.path.lexists(path)


def test_a_successor_that_cannot_start(sockdir: Path) -> None:
    path = sockdir / "app.sock"
    argv = json.dumps([str(sockdir / "no-such-program")])
    with start_upgrader(path, "stream", "--command", argv) as a:
        with raw_control(path) as conv:
            conv.send(b'{"op":"upgrade"}')
            answer = json.loads(conv.recv(8192))
        assert answer == {
            "op": "error",
            "reason": f"cannot start {sockdir / 'no-such-program'}: no such file or directory",
        }
        assert ask(path, "stream", b"x") == f"{a.pid}:x".encode()
        a.tell("close")
        assert a.finish() == 0
        assert a.leaked() == "leaked []"
    assert not os.path.lexists(path)
