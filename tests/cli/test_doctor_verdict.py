"""The doctor never tells a user it can connect when it has just found that it cannot."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import udskit
from udskit import inspect

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 and not os.environ.get("CI"),
    reason="judging for another user needs root (CI runs as root)",
)


def test_a_refused_user_is_not_told_it_can_connect(sockdir: Path) -> None:
    path = sockdir / "private.sock"
    os.chmod(sockdir, 0o755)  # the directory is open; only the socket's 0600 stops nobody
    with udskit.listen(path, mode=0o600):
        diagnosis = inspect.diagnose(str(path), user="nobody")
    assert not diagnosis.ok
    server = next(f for f in diagnosis.findings if f.check == "server")
    assert server.summary.startswith(f"the server answers at {path}")
    assert not any("nobody can connect" in f.summary for f in diagnosis.findings)


def test_an_allowed_user_is_told_it_can_connect(sockdir: Path) -> None:
    path = sockdir / "open.sock"
    os.chmod(sockdir, 0o755)
    with udskit.listen(path, mode=0o666):
        diagnosis = inspect.diagnose(str(path), user="nobody")
    assert diagnosis.ok
    server = next(f for f in diagnosis.findings if f.check == "server")
    assert server.summary.startswith(f"nobody can connect to {path}")
