"""nobody against root's claim of a socket path: symlinks planted and sockets renamed away
right after bind(), stale sockets swapped for files, lock files and private directories
prepared in advance or swapped in."""

from __future__ import annotations

import os
import select
import socket
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

import udskit
from udskit import SocketFileError, UdsError
from udskit import sockfile as sockfile_module

from ..integration import injected
from ..integration.children import NOBODY, needs_root
from ..integration.injected import Moves, after_probe
from .conftest import MAX_MOVES, RACE_ROUNDS, Arena, Attacker, as_nobody

pytestmark = [pytest.mark.root, needs_root, pytest.mark.usefixtures("no_fd_leak")]


def _plant_symlink(path: Path, target: Path) -> Callable[[], str]:
    """nobody's move: take the fresh socket away and point its name at ``target``."""

    def move() -> str:
        os.rename(path, path.with_name("taken.sock"))
        os.symlink(target, path)
        return "planted"

    return move


# -- item: the datagram listener's mode and owner ----------------------------------------------


@pytest.mark.parametrize("identity", ["sock_diag", "stat"])
@pytest.mark.parametrize("kind", ["dgram", "stream"])
def test_symlink_planted_right_after_bind_is_never_followed(
    arena: Arena,
    after_bind: Moves,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
    identity: str,
) -> None:
    """The datagram socket binds at its final name, so nobody gets a moment between bind()
    and chmod/chown; a stream socket binds in a private directory nobody can enter. Both
    ways udskit tells its file: the kernel's sock_diag, and stat where that is missing."""
    if identity == "stat":
        monkeypatch.setattr(sockfile_module, "bound_file", lambda sock: None)
    path = arena.path
    reports: list[str] = []
    if kind == "dgram":
        after_bind.append(lambda: reports.append(as_nobody(_plant_symlink(path, arena.secret))))
    else:
        after_bind.append(lambda: reports.append(as_nobody(_take_private_dir(arena, path))))
    if kind == "dgram" and not arena.sticky:
        with pytest.raises(SocketFileError, match="was moved or replaced while we created it") as e:
            udskit.listen(path, type=kind, mode=0o660, group=NOBODY)
        assert str(arena.directory) in str(e.value)
        assert reports == ["planted"]
    else:  # nobody could not move root's socket (sticky), or never saw it (stream)
        with udskit.listen(path, type=kind, mode=0o660, group=NOBODY):
            info = os.lstat(path)
            assert stat.S_ISSOCK(info.st_mode)
            assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o660, NOBODY)
    arena.secret_untouched()


def _take_private_dir(arena: Arena, path: Path) -> Callable[[], str]:
    """nobody's move on the stream path: rename root's private directory away and put one
    of its own there, holding a symlink at the socket's name."""

    def move() -> str:
        private = [n for n in os.listdir(arena.directory) if n.startswith(".udskit-")]
        for name in private:
            os.rename(arena.directory / name, arena.directory / f"{name}.gone")
            os.mkdir(arena.directory / name, 0o777)
            os.symlink(arena.secret, arena.directory / name / path.name)
        return "taken" if private else "nothing to take"

    return move


def test_symlink_race_on_the_datagram_path(open_arena: Arena) -> None:
    """The same attack, for real: nobody keeps renaming the socket away and planting a
    symlink while root claims and releases the path over and over."""
    path = open_arena.path

    def attack(stop: int) -> int:
        taken = open_arena.directory / "taken.sock"
        for _ in range(MAX_MOVES):
            if select.select([stop], [], [], 0)[0]:
                break
            try:
                os.rename(path, taken)
                os.symlink(open_arena.secret, path)
                os.unlink(path)  # give root the next round
            except OSError:
                pass
        return 0

    with Attacker(attack):
        for _ in range(RACE_ROUNDS):
            try:
                udskit.listen(path, type="dgram", mode=0o666, group=NOBODY).close()
            except UdsError:
                pass
    open_arena.secret_untouched()


# -- item: the stale socket ---------------------------------------------------------------------


def _swap_in_a_file(path: Path) -> Callable[[], str]:
    def move() -> str:
        os.unlink(path)
        path.write_bytes(b"nobody's data")
        return "swapped"

    return move


@pytest.mark.parametrize("kind", ["stream", "dgram"])
def test_stale_socket_swapped_for_a_file_is_never_deleted(
    open_arena: Arena,
    monkeypatch: pytest.MonkeyPatch,
    swap_after_check: Moves,
    kind: str,
) -> None:
    path = open_arena.path
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as crashed:
        crashed.bind(os.fspath(path))  # root's stale socket
    reports: list[str] = []

    def swap() -> None:
        reports.append(as_nobody(_swap_in_a_file(path)))

    # Armed once the probe is done: the next look is the last before removal.
    after_probe(monkeypatch).append(lambda: swap_after_check.append(swap))
    with pytest.raises(SocketFileError, match=r"replaced by a regular file \(uid 65534\)"):
        udskit.listen(path, type=kind)
    assert reports == ["swapped"]
    assert path.read_bytes() == b"nobody's data"
    assert os.lstat(path).st_uid == NOBODY


def test_stale_socket_race(open_arena: Arena) -> None:
    """For real: nobody removes every socket it sees at the path and puts a numbered file
    there; root keeps leaving stale sockets and claiming the path. Every file nobody made
    must still be found."""
    path = open_arena.path
    made_r, made_w = os.pipe()

    def attack(stop: int) -> int:
        made = 0
        draft = open_arena.directory / "draft"
        for _ in range(MAX_MOVES):
            if select.select([stop], [], [], 0)[0]:
                break
            draft.write_bytes(b"%d" % (made + 1))  # whole before it appears at the path
            try:
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)
                os.link(draft, path)  # never replaces
            except OSError:
                continue
            os.unlink(draft)  # the next draft is a new file, not this one rewritten
            made += 1
        os.write(made_w, b"%d" % made)
        return 0

    found: set[bytes] = set()

    def collect() -> None:
        """Take away nobody's files (the harness, not udskit): at the path, or kept beside
        it where udskit could not put one back because nobody had filled the name again."""
        for name in os.listdir(open_arena.directory):
            if name == path.name or name.startswith(f"{path.name}.kept-"):
                candidate = open_arena.directory / name
                if stat.S_ISREG(os.lstat(candidate).st_mode):
                    found.add(candidate.read_bytes())
                    candidate.unlink()

    with Attacker(attack):
        for _ in range(RACE_ROUNDS):
            collect()
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as crashed:
                    crashed.bind(os.fspath(path))
            except OSError:
                pass  # nobody's file got there first
            try:
                udskit.listen(path).close()
            except UdsError:
                pass
    os.close(made_w)
    made = int(os.read(made_r, 64) or b"0")
    os.close(made_r)
    collect()
    assert found == {b"%d" % n for n in range(1, made + 1)}, "udskit deleted nobody's file"


# -- item: the lock file ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["stream", "dgram"])
def test_a_lock_file_nobody_created_is_never_deleted(arena: Arena, kind: str) -> None:
    lock = arena.path.with_name("app.sock.lock")

    def prepare() -> str:
        lock.write_bytes(b"")
        return "ready"

    assert as_nobody(prepare) == "ready"
    inode = os.lstat(lock).st_ino
    with udskit.listen(arena.path, type=kind):
        pass
    info = os.lstat(lock)
    assert (info.st_ino, info.st_uid) == (inode, NOBODY)


@pytest.mark.parametrize("kind", ["socket", "FIFO", "directory"])
def test_something_else_nobody_puts_at_the_lock_path_is_named(arena: Arena, kind: str) -> None:
    lock = arena.path.with_name("app.sock.lock")

    def prepare() -> str:
        if kind == "socket":
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.bind(os.fspath(lock))
        elif kind == "FIFO":
            os.mkfifo(lock)
        else:
            lock.mkdir()
        return "ready"

    assert as_nobody(prepare) == "ready"
    inode = os.lstat(lock).st_ino
    with pytest.raises(SocketFileError) as refused:
        udskit.listen(arena.path)
    assert str(refused.value) == (
        f"cannot lock {lock}: a {kind} is there, not a lock file; remove it (udskit never "
        "deletes what it did not create)"
    )
    info = os.lstat(lock)
    assert (info.st_ino, info.st_uid) == (inode, NOBODY)


def test_a_symlink_nobody_plants_at_the_lock_path_is_never_followed(arena: Arena) -> None:
    lock = arena.path.with_name("app.sock.lock")
    assert as_nobody(lambda: (os.symlink(arena.secret, lock), "ready")[1]) == "ready"
    with pytest.raises(SocketFileError, match="a symlink is there"):
        udskit.listen(arena.path)
    assert lock.is_symlink()
    arena.secret_untouched()


# -- item: the private directory ----------------------------------------------------------------


def test_a_private_directory_swapped_in_after_mkdir_is_never_used(
    arena: Arena, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nobody renames root's fresh private directory away and puts its own (0777) there."""
    real_mkdir = os.mkdir
    reports: list[str] = []

    def mkdir(name: bytes, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        real_mkdir(name, mode, dir_fd=dir_fd)
        if isinstance(name, bytes) and name.startswith(sockfile_module.PRIVATE_PREFIX):
            reports.append(as_nobody(_own_dir(arena.directory, os.fsdecode(name))))

    monkeypatch.setattr(sockfile_module.os, "mkdir", mkdir)
    if arena.sticky:  # nobody may not rename root's directory
        udskit.listen(arena.path).close()
        assert reports[0].startswith("PermissionError")
    else:
        with pytest.raises(SocketFileError, match="was replaced at once"):
            udskit.listen(arena.path)
        assert reports[0] == "swapped"
    for name in os.listdir(arena.directory):
        if name.endswith(".nobody"):
            continue
        info = os.lstat(arena.directory / name)
        if info.st_uid == NOBODY:  # nobody's directory: root put nothing in it
            assert os.listdir(arena.directory / name) == []
    arena.secret_untouched()


def test_a_private_directory_renamed_before_bind_never_redirects_it(
    arena: Arena, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nobody renames root's private directory away just before bind() and plants a symlink
    at its name, pointing into a directory of root's: root binds nothing there."""
    target = arena.secret.parent / "root-only"
    target.mkdir(mode=0o755)
    moves = injected.before_bind(monkeypatch)
    reports: list[str] = []

    def plant() -> None:
        private = next(
            name
            for name in os.listdir(arena.directory)
            if name.startswith(os.fsdecode(sockfile_module.PRIVATE_PREFIX))
        )
        reports.append(as_nobody(_symlink_dir(arena.directory, private, target)))

    moves.append(plant)
    try:
        udskit.listen(arena.path).close()
    except SocketFileError:
        pass  # refusing is fine; creating a file through nobody's symlink is not
    if arena.sticky:  # nobody may not rename root's directory
        assert reports[0].startswith("PermissionError")
    else:
        assert reports == ["planted"]
    assert os.listdir(target) == []
    arena.secret_untouched()


def _symlink_dir(directory: Path, name: str, target: Path) -> Callable[[], str]:
    def move() -> str:
        os.rename(directory / name, directory / f"{name}.nobody")
        os.symlink(target, directory / name)
        return "planted"

    return move


def _own_dir(directory: Path, name: str) -> Callable[[], str]:
    def move() -> str:
        os.rename(directory / name, directory / f"{name}.nobody")
        os.mkdir(directory / name, 0o777)
        os.chmod(directory / name, 0o777)
        return "swapped"

    return move


def test_a_private_directory_name_taken_in_advance_is_never_used(
    arena: Arena, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Names are random; if nobody guesses (here: is told) every one, the claim gives up
    cleanly rather than enter nobody's directory."""
    monkeypatch.setattr(sockfile_module, "_random_suffix", lambda: b"deadbeef")
    taken = arena.directory / ".udskit-deadbeef"

    def prepare() -> str:
        taken.mkdir()
        taken.chmod(0o777)
        return "ready"

    assert as_nobody(prepare) == "ready"
    with pytest.raises(SocketFileError, match="every name we tried was taken"):
        udskit.listen(arena.path)
    assert os.listdir(taken) == []
    assert not arena.path.exists()


def test_a_lock_file_root_cannot_read_is_named_with_its_owner(arena: Arena) -> None:
    """nobody meets root's claim lock file (0600): told whose it is, not a bare EACCES."""
    lock = arena.path.with_name("app.sock.lock")
    lock.write_bytes(b"")
    lock.chmod(0o600)

    def listen() -> str:
        udskit.listen(arena.path).close()
        return "listening"

    report = as_nobody(listen)
    assert report == (
        f"SocketFileError: cannot open the lock file {lock} (it belongs to uid 0): permission "
        "denied; remove it as its owner, or choose another path"
    )
    assert os.listdir(arena.directory) == ["app.sock.lock"]


# -- item: a directory on the way ---------------------------------------------------------------


def test_a_directory_on_the_way_swapped_for_a_symlink_leaves_no_file_where_it_led(
    open_arena: Arena, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A datagram server binds at its path by name (peers answer that name). Right before
    the bind, nobody renames root's directory in the shared one away and puts a symlink to
    another of root's directories there: the bind creates root's socket in that directory;
    the claim fails, and removes that file (sock_diag names it exactly)."""
    sub = open_arena.directory / "sub"
    sub.mkdir()
    elsewhere = open_arena.directory.parent / "elsewhere"
    elsewhere.mkdir()

    def swap() -> str:
        sub.rename(open_arena.directory / "old")
        sub.symlink_to(elsewhere)
        return "swapped"

    reports: list[str] = []
    injected.before_bind(monkeypatch).append(lambda: reports.append(as_nobody(swap)))
    with pytest.raises(SocketFileError, match="or a directory on the way to it"):
        udskit.listen(sub / "app.sock", type="dgram")
    assert reports == ["swapped"]
    assert os.listdir(elsewhere) == []
    assert os.listdir(open_arena.directory / "old") == []
