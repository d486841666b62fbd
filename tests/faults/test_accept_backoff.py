"""accept() failures in the Server: EMFILE and friends back off (growing waits, no spinning)
and recover; transient errors are retried; anything else stops the server cleanly.

The faults come from a scripted listener socket: the real listening socket, whose accept()
raises the scripted errors first (trio's FakeSocket idea, over a real descriptor).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import udskit
from udskit import Channel, Server, accepting

from .scripted import ServingInThread

#: How long a test waits for the server thread or a reply before failing.
PATIENCE = 20.0

#: A scripted accept() that really accepts.
REAL = 0


class ScriptedAccept(socket.socket):
    """The listener's own descriptor; ``accept()`` raises the next scripted errno, or
    really accepts for REAL (and once the script is used up). ``calls`` counts the scripted
    errors and the clients accepted, not the accept() that ends a batch on an empty queue."""

    def __init__(self, sock: socket.socket, script: list[int]) -> None:
        super().__init__(sock.family, sock.type, sock.proto, fileno=sock.detach())
        self.script = list(script)
        self.calls = 0
        self.called = threading.Event()

    def accept(self) -> tuple[socket.socket, object]:
        code = self.script.pop(0) if self.script else REAL
        if code != REAL:
            self.calls += 1
            self.called.set()
            raise OSError(code, os.strerror(code))
        accepted = super().accept()  # BlockingIOError on an empty queue: not counted
        self.calls += 1
        self.called.set()
        return accepted


def echo(channel: Channel) -> None:
    for message in channel:
        channel.send(message)


class Running(ServingInThread):
    """A Server over a scripted listener, serving in a thread."""

    def __init__(self, path: Path, script: list[int]) -> None:
        server = Server(path, echo)
        listener = server.listener
        self.scripted = ScriptedAccept(listener.socket, script)
        listener._sock = self.scripted  # the fault injection
        super().__init__(server)


@pytest.fixture
def path(sockdir: Path) -> Iterator[Path]:
    yield sockdir / "app.sock"
    assert not (sockdir / "app.sock").exists(), "the server removes its socket file"


def _round_trip(path: Path, message: bytes) -> None:
    with udskit.connect(path, timeout=PATIENCE) as client:
        client.send(message)
        assert client.recv() == message


def _waits(caplog: pytest.LogCaptureFixture) -> list[float]:
    """The back-off waits the server announced, in order (the first as a warning, the
    others at debug level)."""
    found = [
        re.search(r"(?:retrying|first) in ([0-9.]+) s", r.getMessage()) for r in caplog.records
    ]
    return [float(m.group(1)) for m in found if m]


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM])
def test_out_of_resources_backs_off_and_recovers(
    path: Path, code: int, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(accepting, "ACCEPT_BACKOFF_MAX", 0.04)
    with caplog.at_level(logging.DEBUG, logger="udskit"), Running(path, [code] * 5) as running:
        _round_trip(path, b"served after the storm")
    assert running.error is None
    # Waits double up to the cap: the server never spins on a readable listener.
    assert _waits(caplog) == [0.01, 0.02, 0.04, 0.04, 0.04]
    assert running.scripted.calls == 6  # five failures, one real accept
    failed = [r for r in caplog.records if "accept failed" in r.getMessage()]
    assert all(os.strerror(code) in r.getMessage() for r in failed)
    # The run of failures is a warning as it begins and as it ends; the tries in between
    # are for debugging.
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 2, warned
    assert "accept failed" in warned[0]
    assert "accepting again, after 5 failed tries" in warned[1]


def test_back_off_starts_over_after_a_success(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    script = [errno.EMFILE, errno.EMFILE, errno.EMFILE, REAL, errno.EMFILE, errno.EMFILE]
    with caplog.at_level(logging.DEBUG, logger="udskit"), Running(path, script) as running:
        _round_trip(path, b"first")
        _round_trip(path, b"second")
    assert running.error is None
    assert _waits(caplog) == [0.01, 0.02, 0.04, 0.01, 0.02]


@pytest.mark.parametrize("code", [errno.ECONNABORTED, errno.EAGAIN, errno.EPROTO])
def test_transient_errors_are_retried_at_once(
    path: Path, code: int, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="udskit"), Running(path, [code] * 3) as running:
        _round_trip(path, b"hello")
    assert running.error is None
    assert running.scripted.calls == 4
    assert _waits(caplog) == []


def test_stop_interrupts_a_back_off(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accepting, "ACCEPT_BACKOFF", 3600.0)  # an hour, unless woken
    # The client makes the listener readable: the scripted EMFILE comes at once.
    with Running(path, [errno.EMFILE]) as running, udskit.connect(path):
        assert running.scripted.called.wait(PATIENCE)
        assert running.scripted.calls == 1
    # __exit__ stopped it and joined it: stop() cut the hour short.
    assert running.error is None


def test_unexpected_accept_error_stops_the_server_cleanly(path: Path) -> None:
    with Running(path, [errno.EINVAL]) as running:
        with udskit.connect(path):
            running.thread.join(PATIENCE)
        assert not running.thread.is_alive()
    assert isinstance(running.error, OSError)
    assert running.error.errno == errno.EINVAL
