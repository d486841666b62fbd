"""A second user (nobody) against udskit's claim and release of socket files.

Each test runs udskit as root in a directory nobody may write: sticky like /tmp (1777),
or without the sticky bit, world-writable (0777) or group-writable with nobody in the
group (0770, group nogroup). Nobody's moves run in forked children that drop to uid
65534; where a move must land between two of udskit's system calls, the test injects it
there (deterministic), and a bounded loop also races it for real.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ..integration import injected
from ..integration.children import NOBODY, fork, reap, run_in_child
from ..integration.injected import Moves, after_look_at

#: Rounds of the real (not injected) races: each is one claim and release by root while
#: nobody keeps attacking; the injected tests hit the window every time, these add the
#: timing a real attacker would get.
RACE_ROUNDS = 150

#: Upper bound on nobody's moves in one real race (it stops when told, long before).
MAX_MOVES = 2_000_000

#: The shared directories nobody attacks in, by name: their mode, owner and group. In its
#: own directory (even a sticky one) nobody may rename or remove anything.
ARENAS = {
    "sticky": (0o1777, 0, 0),
    "world-writable": (0o777, 0, 0),
    "group-writable": (0o770, 0, NOBODY),
    "nobody's": (0o1755, NOBODY, NOBODY),
}

#: The arenas where nobody may rename or remove root's files.
OPEN_ARENAS = ["world-writable", "group-writable", "nobody's"]


@dataclass(frozen=True)
class Arena:
    """The shared directory, and a root-owned 0600 file outside it that nobody covets."""

    directory: Path
    secret: Path
    sticky: bool

    @property
    def path(self) -> Path:
        return self.directory / "app.sock"

    def secret_untouched(self) -> None:
        info = os.lstat(self.secret)
        assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o600, 0, 0), (
            f"the secret file became {stat.S_IMODE(info.st_mode):o} {info.st_uid}:{info.st_gid}"
        )
        assert self.secret.read_bytes() == b"root only"


def make_arena(kind: str) -> Iterator[Arena]:
    # pytest's tmp_path sits under a 0700 directory nobody cannot pass: make our own.
    base = Path(tempfile.mkdtemp(prefix="uds-sec-", dir="/tmp"))
    try:
        base.chmod(0o755)
        secret = base / "secret"
        secret.write_bytes(b"root only")
        secret.chmod(0o600)
        mode, uid, gid = ARENAS[kind]
        directory = base / "shared"
        directory.mkdir()
        os.chown(directory, uid, gid)
        directory.chmod(mode)
        yield Arena(directory, secret, sticky=bool(mode & stat.S_ISVTX) and uid == 0)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=list(ARENAS))
def arena(request: pytest.FixtureRequest) -> Iterator[Arena]:
    """Each kind of shared directory in turn."""
    yield from make_arena(request.param)


@pytest.fixture
def sticky_arena() -> Iterator[Arena]:
    """The sticky directory (like /tmp)."""
    yield from make_arena("sticky")


@pytest.fixture(params=OPEN_ARENAS)
def open_arena(request: pytest.FixtureRequest) -> Iterator[Arena]:
    """The shared directories without the sticky bit."""
    yield from make_arena(request.param)


def as_nobody(func: Callable[[], str]) -> str:
    """Run ``func`` as nobody in a child; what it returned, or its error as "Type: text"."""
    return run_in_child(func, as_user=NOBODY)


#: Files nobody makes to be given a freed inode number: ext4 hands out the lowest free
#: number of the directory's group, so the one just freed comes within a few.
_INODE_TRIES = 64


def take_inode(path: Path, number: int) -> Callable[[], str]:
    """nobody's move: make files beside ``path`` until one gets inode ``number``, and put
    that one at ``path`` (the others are removed); "taken", or "missed" if none did."""

    def move() -> str:
        made = []
        try:
            for i in range(_INODE_TRIES):
                name = path.with_name(f"nobody-{i}")
                name.write_bytes(b"nobody's data")
                made.append(name)
                if os.lstat(name).st_ino == number:
                    name.rename(path)
                    made.pop()
                    return "taken"
            return "missed"
        finally:
            for name in made:
                name.unlink()

    return move


class Attacker:
    """nobody running ``attack(stop_fd)`` in a child until the context ends."""

    def __init__(self, attack: Callable[[int], int]) -> None:
        self._attack = attack

    def __enter__(self) -> Attacker:
        stop_r, self._stop_w = os.pipe()

        def child() -> int:
            os.close(self._stop_w)  # so that the parent's close is the child's EOF
            return self._attack(stop_r)

        self.pid = fork(child, as_user=NOBODY)
        os.close(stop_r)
        return self

    def __exit__(self, *exc_info: object) -> None:
        os.close(self._stop_w)
        assert reap(self.pid) == 0


@pytest.fixture
def swap_after_check(monkeypatch: pytest.MonkeyPatch) -> Moves:
    """Moves to make right after udskit's last look at the socket's name before it removes
    the file there (after the probe, or at release)."""
    return after_look_at(monkeypatch, b"app.sock")


@pytest.fixture
def after_bind(monkeypatch: pytest.MonkeyPatch) -> Moves:
    """Moves to make right after the next bind() of an AF_UNIX socket returns."""
    return injected.after_bind(monkeypatch)
