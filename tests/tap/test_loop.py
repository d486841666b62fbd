"""One loop relays every connection: many at once stay whole and apart, a connection whose
peer does not read holds up no other, and the handler runs in that loop (what it may call,
what happens when it fails)."""

from __future__ import annotations

import logging
import random
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from udskit import tap

from ..conftest import READY_TIMEOUT
from .conftest import Recorder
from .servers import echo, recv_exactly, server

pytestmark = pytest.mark.usefixtures("no_fd_leak")

Tapping = Callable[..., tuple[tap.Tap, Recorder]]

CLIENTS = 64


def test_many_connections_at_once_each_get_their_own_bytes_back(
    sockdir: Path, tapping: Tapping
) -> None:
    path = sockdir / "app.sock"
    errors: list[str] = []
    with server(path):
        running, events = tapping(path)

        def client(n: int) -> None:
            payload = random.Random(n).randbytes(1000 + n * 4099)
            try:
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.settimeout(READY_TIMEOUT)
                    sock.connect(str(path))
                    sender = threading.Thread(target=sock.sendall, args=(payload,))
                    sender.start()
                    echoed = recv_exactly(sock, len(payload))
                    sender.join(READY_TIMEOUT)
                if echoed != payload:
                    errors.append(f"client {n}: other bytes came back")
            except OSError as exc:
                errors.append(f"client {n}: {exc}")

        threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(READY_TIMEOUT)
        running.stop(grace=5.0)
    assert not errors
    opened = {e.conn for e in events.of(tap.Opened)}
    assert len(opened) == CLIENTS
    for conn in opened:
        up = b"".join(e.data for e in events.of(tap.Data) if e.conn == conn and e.direction == "up")
        down = b"".join(
            e.data for e in events.of(tap.Data) if e.conn == conn and e.direction == "down"
        )
        assert up == down


def test_a_connection_whose_server_does_not_read_holds_up_no_other(
    sockdir: Path, tapping: Tapping
) -> None:
    path = sockdir / "app.sock"
    release = threading.Event()

    def handle(conn: socket.socket) -> None:
        first = conn.recv(5, socket.MSG_WAITALL)  # b"" from the tap's own probes
        if first == b"stall":
            release.wait(READY_TIMEOUT)  # reads nothing more until the test is done
            return
        conn.sendall(first)
        echo(conn)

    with server(path, handle):
        running, _ = tapping(path)
        with socket.socket(socket.AF_UNIX) as stalled, socket.socket(socket.AF_UNIX) as other:
            stalled.connect(str(path))
            stalled.sendall(b"stall")
            stalled.setblocking(False)
            taken = 0
            chunk = b"x" * 65536
            while True:  # until the server's side, the relay's and ours are full
                try:
                    taken += stalled.send(chunk)
                except BlockingIOError:
                    break
                assert taken < 1 << 30
            other.settimeout(READY_TIMEOUT)
            other.connect(str(path))
            for n in range(100):
                message = b"ping %d " % n * 100
                other.sendall(message)
                assert recv_exactly(other, len(message)) == message
            release.set()
        running.stop(grace=5.0)


def test_a_failing_handler_is_logged_and_the_bytes_still_pass(
    sockdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = sockdir / "app.sock"

    def handler(event: tap.Event) -> None:
        if isinstance(event, tap.Data) and event.data:
            raise RuntimeError("handler bug")

    with server(path), caplog.at_level(logging.ERROR, logger="udskit"):
        running = tap.start(path, handler)
        try:
            with socket.socket(socket.AF_UNIX) as client:
                client.settimeout(READY_TIMEOUT)
                client.connect(str(path))
                for n in range(3):
                    client.sendall(b"message %d" % n)
                    assert recv_exactly(client, 9) == b"message %d" % n
        finally:
            running.stop(grace=5.0)
    assert "the event handler failed" in caplog.text
    assert "handler bug" in caplog.text


def test_the_handler_may_restore_but_not_stop(sockdir: Path) -> None:
    """restore() from on_event puts the server back and the relayed connection goes on;
    stop() from on_event would wait for the very thread that runs it: RuntimeError."""
    path = sockdir / "app.sock"
    said: list[str] = []
    events = Recorder()
    running: tap.Tap | None = None

    def handler(event: tap.Event) -> None:
        events(event)
        if isinstance(event, tap.Data) and running is not None and not said:
            said.append(running.restore())
            try:
                running.stop()
            except RuntimeError as exc:
                said.append(str(exc))

    with server(path) as srv:
        running = tap.start(path, handler)
        try:
            with socket.socket(socket.AF_UNIX) as client:
                client.settimeout(READY_TIMEOUT)
                client.connect(str(path))
                client.sendall(b"first")
                assert recv_exactly(client, 5) == b"first"
                events.wait_for(lambda seen: len(said) == 2)
                assert path.stat().st_ino == srv.inode  # the server's socket is back
                client.sendall(b"still relayed")  # the relayed connection goes on
                assert recv_exactly(client, 13) == b"still relayed"
        finally:
            running.stop(grace=5.0)
    assert said[0].startswith("restored ")
    assert said[1].startswith("cannot stop a tap from its on_event handler")
    assert running.stopped
