"""nobody against a datagram client's private reply directory: it is never made in a
runtime directory nobody owns or may write to (after ``su``, $XDG_RUNTIME_DIR is still the
user's), where nobody could swap it for one of its own and read the server's replies."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

import udskit

from ..integration.children import NOBODY, needs_root
from .conftest import Arena

pytestmark = [pytest.mark.root, needs_root, pytest.mark.usefixtures("no_fd_leak")]


@pytest.mark.parametrize(("owner", "mode"), [(NOBODY, 0o700), (0, 0o777), (0, 0o770)])
def test_a_runtime_dir_another_user_may_write_is_not_used(
    sticky_arena: Arena,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    owner: int,
    mode: int,
) -> None:
    runtime = sticky_arena.directory / "runtime"
    runtime.mkdir()
    os.chown(runtime, owner, NOBODY)
    runtime.chmod(mode)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    with (
        udskit.listen(tmp_path / "server.sock", type="dgram"),
        udskit.connect(tmp_path / "server.sock", type="dgram") as client,
    ):
        name = client.socket.getsockname()
        assert os.path.dirname(os.path.dirname(name)) == tempfile.gettempdir()
    assert os.listdir(runtime) == []


def test_a_runtime_dir_of_our_own_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    with (
        udskit.listen(tmp_path / "server.sock", type="dgram"),
        udskit.connect(tmp_path / "server.sock", type="dgram") as client,
    ):
        name = client.socket.getsockname()
        assert os.path.dirname(os.path.dirname(name)) == str(runtime)
    assert os.listdir(runtime) == []
