"""Shared fixtures: short temporary directories, readiness waits, descriptor counting."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

#: Upper bound for waiting on a server to come up: generous, since CI machines stall.
READY_TIMEOUT = 20.0


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A private temporary directory with a short path (sun_path is 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="uds-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def wait_connectable(path: str | os.PathLike[str], kind: int = socket.SOCK_STREAM) -> None:
    """Return once ``path`` accepts a connection; fail after READY_TIMEOUT (bounded loop)."""
    deadline = time.monotonic() + READY_TIMEOUT
    delay = 0.001
    while True:
        with socket.socket(socket.AF_UNIX, kind) as probe:
            try:
                probe.connect(os.fspath(path))
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
        time.sleep(delay)  # back-off between readiness probes, not synchronisation
        delay = min(delay * 2, 0.05)


def open_fds() -> set[int]:
    """This process's open descriptors."""
    return {int(name) for name in os.listdir("/proc/self/fd")}


@pytest.fixture
def no_fd_leak() -> Iterator[None]:
    """Fail the test if it leaves descriptors open that were not open before it."""
    before = open_fds()
    yield
    leaked = open_fds() - before
    # listdir itself holds one descriptor while it reads
    leaked = {fd for fd in leaked if os.path.exists(f"/proc/self/fd/{fd}")}
    assert not leaked, f"descriptors leaked: {sorted(leaked)}"
