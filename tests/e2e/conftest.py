"""Fixtures for the end-to-end tests: a searchable temporary directory, and factories for
gunicorn and nginx that stop every server they started, by pid, whatever the test did."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .servers import Gunicorn, Nginx

pytestmark = pytest.mark.e2e


@pytest.fixture
def site() -> Iterator[Path]:
    """A temporary directory others may search (0755): nginx's workers run as another user
    and must reach the socket files in it, as they would in /run or /tmp."""
    path = Path(tempfile.mkdtemp(prefix="uds-e2e-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def gunicorn() -> Iterator[Callable[..., Gunicorn]]:
    started: list[Gunicorn] = []

    def start(sock: Path, **options: object) -> Gunicorn:
        server = Gunicorn(sock, **options)  # type: ignore[arg-type]
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()


@pytest.fixture
def nginx() -> Iterator[Callable[..., Nginx]]:
    started: list[Nginx] = []

    def start(prefix: Path, upstream: str, **options: object) -> Nginx:
        server = Nginx(prefix, upstream, **options)  # type: ignore[arg-type]
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()


@pytest.fixture
def as_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: nginx's workers must run as another user, and chgrp")
