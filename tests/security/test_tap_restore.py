"""nobody against root's ``udskit tap --restore``: the server's socket that a killed tap
left at its tapped name goes back to the path as that very file, never as whatever nobody
put at the tapped name after root looked at it."""

from __future__ import annotations

import os
import select
import socket

import pytest

import udskit
from udskit import SocketFileError, UdsError
from udskit.address import Address
from udskit.inspect.tapped import tapped_finding, tapped_note
from udskit.sockfile import Probe, probe
from udskit.tap import interpose as interpose_module
from udskit.tap.interpose import interpose, restore_displaced

from ..integration.children import NOBODY, needs_root
from .conftest import MAX_MOVES, Arena, Attacker, as_nobody, take_inode

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


def test_restore_removes_the_dead_relays_socket_not_a_file_that_took_its_inode(
    open_arena: Arena, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After root looked at the dead relay's stale socket at the path, nobody removes it
    and makes files until one gets its freed inode number, at the path: the restore moves
    that file to the tapped name and must not remove it as the relay's."""
    path = open_arena.path
    aside = path.with_name(".app.sock.udskit-tapped")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead_relay:
        dead_relay.bind(os.fspath(path))
    number = os.lstat(path).st_ino
    reports: list[str] = []
    real_swap_back = interpose_module._swap_back

    def swap_back(*args: object) -> None:
        def take() -> str:
            os.unlink(path)
            return take_inode(path, number)()

        reports.append(as_nobody(take))
        real_swap_back(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(interpose_module, "_swap_back", swap_back)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(os.fspath(aside))  # where the killed tap left the server's socket
        server.listen(1)
        inode = os.lstat(aside).st_ino
        assert restore_displaced(path) == f"restored {path}: its server answers there again"
    assert os.lstat(path).st_ino == inode
    assert reports in (["taken"], ["missed"])
    if reports == ["taken"]:
        assert aside.read_bytes() == b"nobody's data"


def test_restore_says_so_when_the_servers_socket_is_moved_away_meanwhile(
    open_arena: Arena, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = open_arena.path
    aside = path.with_name(".app.sock.udskit-tapped")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead_relay:
        dead_relay.bind(os.fspath(path))
    number = os.lstat(path).st_ino
    real_swap_back = interpose_module._swap_back

    def swap_back(*args: object) -> None:
        def take() -> str:
            os.rename(aside, path.with_name("taken.sock"))
            return "taken"

        assert as_nobody(take) == "taken"
        real_swap_back(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(interpose_module, "_swap_back", swap_back)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(os.fspath(aside))
        server.listen(1)
        inode = os.lstat(aside).st_ino
        with pytest.raises(SocketFileError) as refused:
            restore_displaced(path)
    assert str(refused.value) == (
        f"cannot restore {path}: its server's socket was moved away from {aside} while we "
        f"restored it; nothing was moved: find it or restart its server (another user can "
        f"write to {open_arena.directory})"
    )
    assert os.lstat(path).st_ino == number
    assert os.lstat(path.with_name("taken.sock")).st_ino == inode


def test_a_socket_moved_away_while_the_tap_puts_its_relay_in_place(
    open_arena: Arena, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nobody moves root's server's socket away right before the tap's exchange: the tap
    says so in one line and leaves nothing behind (no relay, no tapped name)."""
    path = open_arena.path
    real_exchange = interpose_module._exchange
    moves = [lambda: as_nobody(lambda: (os.rename(path, path.with_name("taken.sock")), "")[1])]

    def exchange(*args: object) -> None:
        while moves:
            moves.pop()()
        real_exchange(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(interpose_module, "_exchange", exchange)
    with udskit.listen(path):
        inode = os.lstat(path).st_ino
        with pytest.raises(SocketFileError) as refused:
            interpose(Address.parse(path), None)
        assert str(refused.value) == (
            f"cannot tap {path}: it was replaced while we tapped it; nothing was changed, try again"
        )
        assert sorted(os.listdir(open_arena.directory)) == ["taken.sock"]
        assert os.lstat(path.with_name("taken.sock")).st_ino == inode


#: Rounds of the real race against a tap: each is one tap and restore by root.
TAP_RACE_ROUNDS = 100


def test_tap_race(open_arena: Arena) -> None:
    """For real: nobody keeps moving the path and the tapped name away, planting a symlink
    to root's secret at each and putting the file back, while root taps and restores over
    and over. Each round either works or fails with a udskit error, and the secret is
    never touched."""
    path = open_arena.path
    aside = path.with_name(".app.sock.udskit-tapped")

    def attack(stop: int) -> int:
        taken = open_arena.directory / "taken"
        for _ in range(MAX_MOVES):
            if select.select([stop], [], [], 0)[0]:
                break
            for victim in (path, aside):
                try:
                    os.rename(victim, taken)
                    os.symlink(open_arena.secret, victim)
                    os.unlink(victim)
                    os.rename(taken, victim)  # put it back for the next round
                except OSError:
                    pass
        return 0

    with udskit.listen(path), Attacker(attack):
        for _ in range(TAP_RACE_ROUNDS):
            try:
                tapped = interpose(Address.parse(path), None)
            except UdsError:
                continue
            try:
                tapped.restore()
            finally:
                tapped.relay.close()
                tapped.close()
            open_arena.secret_untouched()
            assert os.stat(open_arena.secret).st_nlink == 1
    open_arena.secret_untouched()
