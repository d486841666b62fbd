"""nobody against root's release of its socket file: whatever nobody put at the path by
the time root closes the listener stays there. (The stale-socket race in test_claim.py
also races every release.)"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest

import udskit

from ..integration.children import NOBODY, needs_root
from ..integration.injected import Moves
from .conftest import Arena, as_nobody, take_inode

pytestmark = [pytest.mark.root, needs_root, pytest.mark.usefixtures("no_fd_leak")]


def _replace(path: Path) -> Callable[[], str]:
    """nobody's move: take root's socket away and put a file of its own at the name."""

    def move() -> str:
        os.rename(path, path.with_name("taken.sock"))
        path.write_bytes(b"nobody's data")
        return "replaced"

    return move


def _assert_nobodys(path: Path) -> None:
    assert path.read_bytes() == b"nobody's data"
    assert os.lstat(path).st_uid == NOBODY


@pytest.mark.parametrize("kind", ["stream", "dgram"])
def test_release_leaves_a_file_nobody_put_in_place(
    open_arena: Arena, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    listener = udskit.listen(open_arena.path, type=kind)
    assert as_nobody(_replace(open_arena.path)) == "replaced"
    with caplog.at_level(logging.INFO, logger="udskit"):
        listener.close()
    _assert_nobodys(open_arena.path)
    assert "was replaced by another file; leaving it in place" in caplog.text


@pytest.mark.parametrize("kind", ["stream", "dgram"])
def test_release_leaves_a_file_nobody_swaps_in_after_the_check(
    open_arena: Arena, kind: str, swap_after_check: Moves
) -> None:
    """nobody's move lands between udskit's last look at the name and its removal."""
    listener = udskit.listen(open_arena.path, type=kind)
    reports: list[str] = []
    swap_after_check.append(lambda: reports.append(as_nobody(_replace(open_arena.path))))
    listener.close()
    assert reports == ["replaced"]
    _assert_nobodys(open_arena.path)


@pytest.mark.parametrize("kind", ["stream", "dgram"])
def test_in_a_sticky_directory_nobody_cannot_touch_roots_socket(
    sticky_arena: Arena, kind: str
) -> None:
    listener = udskit.listen(sticky_arena.path, type=kind)
    report = as_nobody(_replace(sticky_arena.path))
    assert report.startswith("PermissionError"), report
    listener.close()
    assert not sticky_arena.path.exists()


def test_a_client_releasing_its_path_as_it_closes_leaves_a_file_nobody_made(
    open_arena: Arena, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A datagram client removes the path it bound (bind=) as it closes. nobody removed
    that file before, and makes files until one gets its inode number (on ext4 that takes a
    few tries once the inode is freed), at the path: only a claim released while the socket,
    which keeps that inode, is still open can tell such a file from its own."""
    path = open_arena.path
    with udskit.listen(tmp_path / "server.sock", type="dgram") as server:
        channel = udskit.connect(server.address, type="dgram", bind=path)
        number = os.lstat(path).st_ino
        assert as_nobody(lambda: (os.unlink(path), "removed")[1]) == "removed"
        real_release = udskit.sockfile.Claim.release
        reports: list[str] = []

        def release(claim: udskit.sockfile.Claim) -> None:
            if claim.address.raw == bytes(path):  # the client's
                reports.append(as_nobody(take_inode(path, number)))
            real_release(claim)

        monkeypatch.setattr(udskit.sockfile.Claim, "release", release)
        channel.close()
    assert reports in (["taken"], ["missed"])
    if reports == ["taken"] or path.exists():
        _assert_nobodys(path)
