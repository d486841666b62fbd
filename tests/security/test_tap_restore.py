"""nobody against root's ``udskit tap --restore``: the server's socket that a killed tap
left at its tapped name goes back to the path as that very file, never as whatever nobody
put at the tapped name after root looked at it."""

from __future__ import annotations

import os
import socket

import pytest

import udskit
from udskit import SocketFileError
from udskit.address import Address
from udskit.inspect.tapped import tapped_finding, tapped_note
from udskit.sockfile import Probe, probe
from udskit.tap import interpose as interpose_module
from udskit.tap.interpose import interpose, restore_displaced

from ..integration.children import NOBODY, needs_root
from .conftest import Arena, as_nobody

pytestmark = [pytest.mark.root, needs_root, pytest.mark.usefixtures("no_fd_leak")]


def _plant_after_the_check(arena: Arena, monkeypatch: pytest.MonkeyPatch) -> None:
    """Right after udskit probes a name, nobody moves the tapped name's socket away and
    plants a symlink to root's secret there."""
    aside = arena.path.with_name(".app.sock.udskit-tapped")

    def plant() -> str:
        os.rename(aside, arena.path.with_name("taken.sock"))
        os.symlink(arena.secret, aside)
        return "planted"

    def probe_then_plant(target: str | bytes) -> Probe:
        found = probe(target)
        assert as_nobody(plant) == "planted"
        return found

    monkeypatch.setattr(interpose_module, "probe", probe_then_plant)


def test_restore_links_the_socket_it_checked_not_a_symlink_planted_after(
    open_arena: Arena, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = open_arena.path
    aside = path.with_name(".app.sock.udskit-tapped")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(os.fspath(aside))  # where a killed tap left the server's socket
        server.listen(1)
        inode = os.lstat(aside).st_ino
        _plant_after_the_check(open_arena, monkeypatch)
        report = restore_displaced(path)
        assert os.lstat(path).st_ino == inode, "the path is not the server's socket"
        assert report == f"restored {path}: its server answers there again"
        assert os.readlink(aside) == os.fspath(open_arena.secret)  # nobody's, left alone
        assert os.stat(open_arena.secret).st_nlink == 1
        open_arena.secret_untouched()


def test_a_running_tap_restores_the_socket_it_holds_not_a_symlink_planted_after(
    open_arena: Arena, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = open_arena.path
    aside = path.with_name(".app.sock.udskit-tapped")
    with udskit.listen(path):
        inode = os.lstat(path).st_ino
        tapped = interpose(Address.parse(path), None)
        try:

            def remove() -> str:
                os.unlink(path)  # the relay's file
                return "removed"

            assert as_nobody(remove) == "removed"
            _plant_after_the_check(open_arena, monkeypatch)
            assert tapped.restore() == f"restored {path} (it had been removed while tapped)"
            assert os.lstat(path).st_ino == inode, "the path is not the server's socket"
            assert os.readlink(aside) == os.fspath(open_arena.secret)  # nobody's, left alone
            open_arena.secret_untouched()
            assert os.stat(open_arena.secret).st_nlink == 1
        finally:
            tapped.relay.close()
            tapped.close()


def test_another_users_socket_at_the_tapped_name_is_not_restored_over_roots(
    sticky_arena: Arena,
) -> None:
    """Like /tmp: nobody may plant a socket at the tapped name of root's path. Once root's
    server has stopped, its stale socket at the path is no killed tap's relay (which has the
    server's owner): doctor does not say so, and a restore does not put nobody's socket there."""
    path = sticky_arena.path
    aside = path.with_name(".app.sock.udskit-tapped")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(os.fspath(path))  # root's server, stopped
    inode = os.lstat(path).st_ino

    def plant() -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(os.fspath(aside))
        return "planted"

    assert as_nobody(plant) == "planted"
    assert tapped_finding(os.fsencode(path)) is None
    assert tapped_note(os.fspath(path)) == ""
    with pytest.raises(SocketFileError) as refused:
        restore_displaced(path)
    assert str(refused.value) == (
        f"cannot restore {path}: {aside.name} belongs to uid {NOBODY} and {path} to uid 0, "
        "so no tap moved it aside; remove it as its owner, or as root (udskit never deletes "
        "what it did not create)"
    )
    assert os.lstat(path).st_ino == inode
    assert os.lstat(aside).st_uid == NOBODY
