"""A worker still running after the stop's grace period is left behind: when it ends, it
must not write into a descriptor the server has closed (its number may be reused)."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

import udskit
from udskit import messageserver


def test_a_worker_left_behind_writes_into_no_reused_descriptor(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(messageserver, "SHUTDOWN_GRACE", 0.01)
    path = sockdir / "late.sock"
    entered = threading.Event()
    release = threading.Event()

    def handler(conn: udskit.Connection, message: bytes) -> None:
        entered.set()
        release.wait()

    server = udskit.MessageServer(path, handler, framing="lines", workers=1)
    serving = threading.Thread(target=server.serve_forever)
    serving.start()
    files: list[int] = []
    try:
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(os.fspath(path))
            client.sendall(b"slow\n")
            assert entered.wait(5)
            server.stop()
            serving.join()  # the worker is left behind
            [worker] = [t for t in threading.enumerate() if t.name == "udskit-worker-0"]
            # New descriptors take the lowest free numbers: the server's, just closed.
            files = [
                os.open(sockdir / f"file{n}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
                for n in range(8)
            ]
            release.set()
            worker.join(5)
            assert not worker.is_alive()
        for n in range(8):
            assert (sockdir / f"file{n}").read_bytes() == b""  # nothing written into it
    finally:
        release.set()
        for fd in files:
            os.close(fd)
