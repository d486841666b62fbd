"""The socket file's life (DESIGN §3): what ``listen()`` does with whatever sits at the path,
what ``close()`` removes, and that N processes racing for one path never hurt the winner."""

from __future__ import annotations

import errno
import fcntl
import grp
import logging
import os
import pwd
import secrets
import select
import socket
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import udskit
from udskit import AddressError, AddressInUse, ConnectError, SocketFileError, Timeout
from udskit import sockfile as sockfile_module
from udskit.address import SUN_PATH_MAX

from ..conftest import wait_connectable
from .children import NOBODY, Held, fork, needs_root, read_report, reap, run_in_child
from .injected import after_look_at, after_probe

TYPES = ["stream", "seqpacket", "dgram"]
KINDS = {
    "stream": socket.SOCK_STREAM,
    "seqpacket": socket.SOCK_SEQPACKET,
    "dgram": socket.SOCK_DGRAM,
}

#: Race rounds and process counts: every count from 2 to 8, twice over. Each round forks
#: the test process (large, under coverage) up to 8 times: 25 rounds passed the test's
#: time limit on a CI machine loaded by the many-client tests running beside it.
RACE_ROUNDS = 14
RACE_MIN, RACE_MAX = 2, 8

#: Upper bound on lstat() calls by the mode watcher in one listen(); it stops long before.
MAX_LOOKS = 200_000

#: listen() calls watched per test: the window a wrong order would open is a few system
#: calls wide, so give the watcher many chances to land in it.
WATCHED_LISTENS = 60


def debris(directory: Path) -> list[str]:
    """Lock files and private bind directories a claim may have left behind."""
    return sorted(
        name for name in os.listdir(directory) if name.endswith(".lock") or ".udskit-" in name
    )


def stale_socket(path: Path, kind: str = "stream") -> os.stat_result:
    """Leave a socket file with nothing behind it, as a crashed server does."""
    with socket.socket(socket.AF_UNIX, KINDS[kind]) as sock:
        sock.bind(os.fspath(path))
    return os.lstat(path)


def deep_directory(base: Path, length: int) -> Path:
    """A directory under ``base`` whose path is at least ``length`` bytes long."""
    directory = base
    while len(os.fsencode(directory)) < length:
        directory /= "d" * 50
    directory.mkdir(parents=True)
    return directory


@pytest.fixture
def path(sockdir: Path) -> Iterator[Path]:
    yield sockdir / "app.sock"
    assert debris(sockdir) == [], "a claim left a lock file or private directory behind"


# -- what is at the path -----------------------------------------------------------------------


def _regular(path: Path) -> None:
    path.write_bytes(b"precious data")


def _directory(path: Path) -> None:
    path.mkdir()
    (path / "inside").write_bytes(b"precious data")


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _symlink_to_file(path: Path) -> None:
    target = path.with_name("target")
    target.write_bytes(b"precious data")
    path.symlink_to(target)


def _dangling_symlink(path: Path) -> None:
    path.symlink_to(path.with_name("nowhere"))


OBSTACLES: dict[str, tuple[Callable[[Path], None], str]] = {
    "regular-file": (_regular, "regular file"),
    "directory": (_directory, "directory"),
    "fifo": (_fifo, "FIFO"),
    "symlink": (_symlink_to_file, "symlink"),
    "dangling-symlink": (_dangling_symlink, "symlink"),
}


@pytest.mark.parametrize("kind", ["stream", "dgram"])
@pytest.mark.parametrize("obstacle", OBSTACLES)
def test_non_socket_is_never_unlinked(path: Path, obstacle: str, kind: str) -> None:
    make, name = OBSTACLES[obstacle]
    make(path)
    before = os.lstat(path)
    with pytest.raises(SocketFileError) as caught:
        udskit.listen(path, type=kind)
    message = str(caught.value)
    assert str(path) in message
    assert f"a {name} is in the way" in message
    assert "never deletes" in message
    assert caught.value.errno == errno.EEXIST
    assert isinstance(caught.value, OSError)
    after = os.lstat(path)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
    if obstacle in ("regular-file", "symlink"):
        assert path.read_bytes() == b"precious data"


def test_symlink_to_live_socket_is_refused_not_followed(path: Path, sockdir: Path) -> None:
    real = sockdir / "real.sock"
    with udskit.listen(real):
        path.symlink_to(real)
        with pytest.raises(SocketFileError, match="a symlink is in the way"):
            udskit.listen(path)
        assert path.is_symlink()
        wait_connectable(real)


# -- a live owner ------------------------------------------------------------------------------


def _listen_and_report(path: Path, kind: str) -> Callable[[], tuple[str, Callable[[], object]]]:
    def setup() -> tuple[str, Callable[[], object]]:
        listener = udskit.listen(path, type=kind)
        return str(os.getpid()), listener.close

    return setup


@pytest.mark.parametrize("kind", TYPES)
def test_live_server_in_another_process_is_address_in_use(path: Path, kind: str) -> None:
    with Held(_listen_and_report(path, kind)) as owner:
        assert owner.report == str(owner.pid)
        inode = os.lstat(path).st_ino
        for attempt_kind in TYPES:  # whatever type we ask for, the path is taken
            with pytest.raises(AddressInUse) as caught:
                udskit.listen(path, type=attempt_kind)
            error = caught.value
            assert isinstance(error, OSError)
            assert error.errno == errno.EADDRINUSE
            message = str(error)
            assert str(path) in message
            assert "live server" in message
            assert error.uid == os.getuid()
            assert f"uid {os.getuid()}" in message
            if kind == "dgram":
                assert error.pid is None  # a datagram socket has no peer credentials to ask
            else:
                assert error.pid == owner.pid
                assert f"pid {owner.pid}" in message
        assert os.lstat(path).st_ino == inode, "the owner's socket file was replaced"
        wait_connectable(path, KINDS[kind])
    assert owner.stop() == 0
    assert not path.exists(), "the owner removes its socket file when it closes"


def test_live_server_with_a_full_backlog_is_still_live(path: Path) -> None:
    clients: list[socket.socket] = []
    with udskit.listen(path, backlog=1):
        try:
            for _ in range(16):  # the kernel queues backlog + 1; bounded well above that
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
                clients.append(client)
                if client.connect_ex(os.fspath(path)) == errno.EAGAIN:
                    break
            else:
                pytest.fail("the backlog never filled")
            with pytest.raises(AddressInUse, match="backlog is full") as caught:
                udskit.listen(path)
            assert caught.value.uid == os.getuid()
        finally:
            for client in clients:
                client.close()


# -- stale sockets -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", TYPES)
def test_stale_socket_is_reclaimed(path: Path, kind: str, caplog: pytest.LogCaptureFixture) -> None:
    stale_socket(path, kind)
    path.chmod(0o644)
    with socket.socket(socket.AF_UNIX, KINDS[kind]) as probe:
        assert probe.connect_ex(os.fspath(path)) == errno.ECONNREFUSED
    with caplog.at_level(logging.INFO, logger="udskit"), udskit.listen(path, type=kind):
        # (The inode number may well be reused: tell the files apart by mode and liveness.)
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        wait_connectable(path, KINDS[kind])
    assert f"removing stale socket file {path}" in caplog.text
    assert not path.exists()


# -- N processes racing for one path ------------------------------------------------------------


def _racer(
    path: Path, go: int, result: int, stop: int, parent_ends: list[int]
) -> Callable[[], int]:
    def run() -> int:
        for fd in parent_ends:  # else the pipes never reach end of file
            os.close(fd)
        select.select([go], [], [], 30)  # the parent closes its end: everyone starts at once
        try:
            listener = udskit.listen(path)
        except AddressInUse as exc:
            os.write(result, b"lost %d" % (exc.pid or -1))
            return 0
        os.write(result, b"won")
        os.close(result)
        select.select([stop], [], [], 30)  # until the parent closes its end
        listener.close()
        return 0

    return run


@pytest.mark.long
@pytest.mark.timeout(180)  # forks: see RACE_ROUNDS
def test_racing_processes_exactly_one_wins(sockdir: Path) -> None:
    path = sockdir / "race.sock"
    for round_number in range(RACE_ROUNDS):
        count = RACE_MIN + round_number % (RACE_MAX - RACE_MIN + 1)
        go_r, go_w = os.pipe()
        stop_r, stop_w = os.pipe()
        racers: list[tuple[int, int]] = []  # (pid, result read end)
        try:
            for _ in range(count):
                result_r, result_w = os.pipe()
                pid = fork(_racer(path, go_r, result_w, stop_r, [go_w, stop_w]))
                os.close(result_w)
                racers.append((pid, result_r))
            os.close(go_w)
            go_w = -1
            reports = {pid: read_report(fd) for pid, fd in racers}
            winners = [pid for pid, report in reports.items() if report == "won"]
            assert len(winners) == 1, f"round {round_number}: {reports}"
            winner = winners[0]
            for pid, report in reports.items():
                if pid != winner:
                    assert report == f"lost {winner}", f"round {round_number}: {reports}"
            # The winner's socket was never unlinked: it is the one that answers.
            with udskit.connect(path) as client:
                assert client.peer is not None
                assert client.peer.pid == winner
        finally:
            if go_w != -1:
                os.close(go_w)
            os.close(stop_w)  # the winner closes its listener and exits
            codes = [reap(pid) for pid, _ in racers]
            for _, fd in racers:
                os.close(fd)
            os.close(go_r)
            os.close(stop_r)
        assert codes == [0] * count
        assert not path.exists()
        assert debris(sockdir) == []


# -- close() and the path ----------------------------------------------------------------------


def _replace_with_file(path: Path) -> None:
    path.write_bytes(b"not yours")


def _replace_with_socket(path: Path) -> None:
    stale_socket(path)


REPLACEMENTS = {"file": _replace_with_file, "socket": _replace_with_socket}


@pytest.mark.parametrize("replacement", REPLACEMENTS)
@pytest.mark.parametrize("kind", ["stream", "dgram"])
def test_close_never_deletes_a_replacement(
    path: Path, kind: str, replacement: str, caplog: pytest.LogCaptureFixture
) -> None:
    listener = udskit.listen(path, type=kind)
    os.unlink(path)
    REPLACEMENTS[replacement](path)
    inode = os.lstat(path).st_ino
    with caplog.at_level(logging.INFO, logger="udskit"):
        listener.close()
    assert os.lstat(path).st_ino == inode
    assert "was replaced by another file; leaving it in place" in caplog.text


def test_close_after_the_file_was_removed(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    listener = udskit.listen(path)
    os.unlink(path)
    with caplog.at_level(logging.INFO, logger="udskit"):
        listener.close()
    assert not path.exists()
    assert caplog.records == []


def test_close_removes_the_file_and_is_idempotent(path: Path) -> None:
    listener = udskit.listen(path)
    listener.close()
    listener.close()
    assert not path.exists()
    assert listener.closed


def test_context_manager_removes_the_file(path: Path) -> None:
    def body() -> None:
        with udskit.listen(path, type="seqpacket"):
            assert path.exists()
            raise RuntimeError("the body failed")

    with pytest.raises(RuntimeError, match="the body failed"):
        body()
    assert not path.exists()


@pytest.mark.parametrize("kind", TYPES)
def test_forked_child_closing_its_copy_keeps_the_parents_socket(path: Path, kind: str) -> None:
    with udskit.listen(path, type=kind) as listener:
        inode = os.lstat(path).st_ino
        pid = fork(listener.close)
        assert reap(pid) == 0
        assert os.lstat(path).st_ino == inode
        wait_connectable(path, KINDS[kind])
    assert not path.exists(), "the parent still removes it"


# -- directories -------------------------------------------------------------------------------


def test_missing_parent_directory(sockdir: Path) -> None:
    missing = sockdir / "not-here" / "sub"
    with pytest.raises(SocketFileError) as caught:
        udskit.listen(missing / "app.sock")
    message = str(caught.value)
    assert f"directory {missing} does not exist" in message
    assert f"mkdir -p {missing}" in message
    assert caught.value.errno == errno.ENOENT
    assert os.listdir(sockdir) == []


def test_path_naming_a_directory(sockdir: Path) -> None:
    with pytest.raises(AddressError) as caught:
        udskit.listen(f"{sockdir}/")
    assert str(caught.value) == (
        f"socket path {sockdir}/ names a directory, not a file; give the socket's file name "
        f"too, e.g. {sockdir}/app.sock"
    )


@needs_root
@pytest.mark.parametrize("dir_mode", [0o755, 0o700], ids=["no-write", "no-search"])
def test_no_permission_on_the_directory(sockdir: Path, dir_mode: int) -> None:
    sockdir.chmod(0o755)
    directory = sockdir / "root-only"
    directory.mkdir(mode=dir_mode)
    directory.chmod(dir_mode)
    target = directory / "app.sock"

    def attempt() -> str:
        udskit.listen(target)
        return "listening"

    report = run_in_child(attempt, as_user=NOBODY)
    assert report.startswith("SocketFileError: ")
    assert str(target) in report
    assert "permission denied" in report
    assert os.listdir(directory) == []


@needs_root
def test_live_socket_we_may_not_probe_is_in_use(sockdir: Path) -> None:
    sockdir.chmod(0o755)
    shared = sockdir / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp: everyone may create, only owners may remove
    target = shared / "app.sock"
    with udskit.listen(target, mode=0o600):

        def attempt() -> str:
            try:
                udskit.listen(target)
            except AddressInUse as exc:
                return f"uid={exc.uid} {exc}"
            return "listening"

        report = run_in_child(attempt, as_user=NOBODY)
        assert report.startswith(f"uid={os.getuid()} ")
        assert "may not connect to it" in report
        assert str(target) in report
        wait_connectable(target)
    assert debris(shared) == []


def test_lock_held_too_long_is_a_timeout(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sockfile_module, "CLAIM_LOCK_TIMEOUT", 0.1)
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another holder, stuck
        with pytest.raises(Timeout, match="held the lock") as caught:
            udskit.listen(path)
        assert str(lock_path) in str(caught.value)
        assert "fuser" in str(caught.value)
        assert "belongs to" not in str(caught.value)  # our own file: nothing to add
        assert not path.exists()
        if os.geteuid() == 0:
            os.fchown(fd, NOBODY, NOBODY)  # as if another user made and holds it
            with pytest.raises(Timeout, match=f"its file belongs to uid {NOBODY}"):
                udskit.listen(path)
    finally:
        os.close(fd)
        os.unlink(lock_path)


def test_symlink_planted_at_the_lock_path_is_not_followed(path: Path, sockdir: Path) -> None:
    victim = sockdir / "victim"
    lock_path = path.with_name(path.name + ".lock")
    lock_path.symlink_to(victim)
    try:
        with pytest.raises(SocketFileError, match="cannot create lock file") as caught:
            udskit.listen(path)
        assert str(lock_path) in str(caught.value)
        assert not victim.exists(), "the lock must never create a file through a symlink"
        assert not path.exists()
    finally:
        lock_path.unlink()


# -- long paths --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", TYPES)
def test_path_over_sun_path_works(sockdir: Path, kind: str) -> None:
    directory = deep_directory(sockdir, 2 * SUN_PATH_MAX)
    target = directory / "server.sock"
    assert len(os.fsencode(target)) > SUN_PATH_MAX
    with udskit.listen(target, type=kind) as listener:
        assert stat.S_IMODE(os.lstat(target).st_mode) == 0o600
        with udskit.connect(target, type=kind) as client:
            client.send(b"over 108 bytes")
            if isinstance(listener, udskit.DatagramListener):
                datagram = listener.recv()
                assert datagram.data == b"over 108 bytes"
                assert datagram.sender is not None
                listener.send_to(datagram.sender, b"reply")
            else:
                with listener.accept() as server:
                    assert server.recv() == b"over 108 bytes"
                    server.send(b"reply")
            assert client.recv() == b"reply"
        with pytest.raises(AddressInUse):
            udskit.listen(target, type=kind)
    assert not target.exists()
    assert debris(directory) == []


def test_stale_socket_over_sun_path_is_reclaimed(sockdir: Path) -> None:
    directory = deep_directory(sockdir, 2 * SUN_PATH_MAX)
    target = directory / "server.sock"
    here = os.open(directory, os.O_PATH | os.O_DIRECTORY)
    try:
        stale_socket(Path(f"/proc/self/fd/{here}/server.sock"))
    finally:
        os.close(here)
    assert stat.S_ISSOCK(os.lstat(target).st_mode)
    with udskit.listen(target), udskit.connect(target):
        pass
    assert not target.exists()


def test_connect_over_sun_path_to_nothing(sockdir: Path) -> None:
    directory = deep_directory(sockdir, 2 * SUN_PATH_MAX)
    with pytest.raises(ConnectError, match="no such file"):
        udskit.connect(directory / "absent.sock")


def test_file_name_too_long_for_proc_fd(path: Path, sockdir: Path) -> None:
    target = sockdir / ("n" * 100)
    length = len(os.fsencode(target))
    for attempt in (udskit.listen, udskit.connect):
        with pytest.raises(AddressError) as caught:
            attempt(target)
        message = str(caught.value)
        assert str(target) in message
        assert f"{length} bytes" in message
        assert f"sun_path holds {SUN_PATH_MAX - 1}" in message
    assert os.listdir(sockdir) == []


# -- mode and ownership ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", TYPES)
def test_default_mode_is_0600(path: Path, kind: str) -> None:
    with udskit.listen(path, type=kind):
        info = os.lstat(path)
        assert stat.S_IMODE(info.st_mode) == 0o600
        assert (info.st_uid, info.st_gid) == (os.geteuid(), os.getegid())


@pytest.mark.parametrize("mode", [0o660, 0o666, 0o640, 0o700, 0o000])
def test_mode_is_applied_whatever_the_umask(path: Path, mode: int) -> None:
    old = os.umask(0o077)
    try:
        with udskit.listen(path, mode=mode):
            assert stat.S_IMODE(os.lstat(path).st_mode) == mode
    finally:
        os.umask(old)


@needs_root
@pytest.mark.parametrize("by", ["number", "name"])
def test_owner_and_group_are_applied(path: Path, by: str) -> None:
    if by == "number":
        owner: int | str = NOBODY
        group: int | str = NOBODY
    else:
        owner = pwd.getpwuid(NOBODY).pw_name
        group = grp.getgrgid(NOBODY).gr_name
    with udskit.listen(path, mode=0o660, owner=owner, group=group):
        info = os.lstat(path)
        assert (info.st_uid, info.st_gid) == (NOBODY, NOBODY)
        assert stat.S_IMODE(info.st_mode) == 0o660


def test_unknown_owner_and_group_are_refused_before_anything_exists(path: Path) -> None:
    unknown = "no-such-user-" + secrets.token_hex(4)
    # in the keyword's words (it read "owner: unknown user ...")
    with pytest.raises(ValueError, match=f"^unknown user '{unknown}' for owner= \\(not in"):
        udskit.listen(path, owner=unknown)
    with pytest.raises(ValueError, match=f"^unknown group '{unknown}' for group= \\(not in"):
        udskit.listen(path, group=unknown)
    assert not path.exists()


def _watch(path: Path, seen: list[tuple[int, int, int]], stop: threading.Event) -> None:
    for _ in range(MAX_LOOKS):
        done = stop.is_set()  # read first: the look below then sees listen()'s final state
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            seen.append((stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid))
        if done:
            return


def _watched_listens(
    path: Path, kind: str, mode: int, owner: int, group: int
) -> list[set[tuple[int, int, int]]]:
    """What a watching thread saw at ``path`` during each of WATCHED_LISTENS listen() calls."""
    rounds = []
    for _ in range(WATCHED_LISTENS):
        seen: list[tuple[int, int, int]] = []
        stop = threading.Event()
        watcher = threading.Thread(target=_watch, args=(path, seen, stop))
        watcher.start()
        try:
            listener = udskit.listen(path, type=kind, mode=mode, owner=owner, group=group)
        finally:
            stop.set()
            watcher.join()
        listener.close()
        assert seen, "the watcher saw the socket file at least once, after listen()"
        assert seen[-1] == (mode, owner, group)
        rounds.append(set(seen))
    return rounds


def _final_owner() -> tuple[int, int]:
    return (NOBODY, NOBODY) if os.geteuid() == 0 else (os.geteuid(), os.getegid())


@pytest.mark.parametrize("kind", ["stream", "seqpacket"])
def test_path_is_never_visible_with_another_mode(path: Path, kind: str) -> None:
    mode = 0o640
    owner, group = _final_owner()
    for seen in _watched_listens(path, kind, mode, owner, group):
        assert seen == {(mode, owner, group)}


def test_datagram_path_is_never_visible_with_more_permission(path: Path) -> None:
    # A datagram server binds at the path itself (its replies must come from that name):
    # the file may appear owner-only first, but never with a bit the final mode lacks,
    # and never open to group or others before its final owner and group are in place.
    mode = 0o660
    owner, group = _final_owner()
    for seen in _watched_listens(path, "dgram", mode, owner, group):
        for seen_mode, seen_owner, seen_group in seen:
            assert seen_mode & ~mode == 0, oct(seen_mode)
            if seen_mode & 0o077:
                assert (seen_owner, seen_group) == (owner, group)


# -- abstract names ----------------------------------------------------------------------------


def _abstract_name() -> str:
    return f"@udskit-test-{os.getpid()}-{secrets.token_hex(4)}"


@pytest.mark.parametrize("kind", TYPES)
def test_abstract_name_in_use(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    name = _abstract_name()
    with caplog.at_level(logging.WARNING, logger="udskit"), udskit.listen(name, type=kind):
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert "abstract names have no file permissions" in warnings[0].getMessage()
        assert name in warnings[0].getMessage()
        with pytest.raises(AddressInUse) as caught:
            udskit.listen(name, type=kind, allow=udskit.Policy(same_user=True))
        assert name in str(caught.value)
        assert caught.value.errno == errno.EADDRINUSE
        if kind != "dgram":
            assert caught.value.pid == os.getpid()
            assert caught.value.uid == os.getuid()
            assert f"pid {os.getpid()}" in str(caught.value)
    with udskit.listen(name, type=kind):  # free again once closed: nothing to clean up
        pass


def test_abstract_name_with_a_policy_is_not_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    name = _abstract_name()
    policy = udskit.Policy(same_user=True)
    with (
        caplog.at_level(logging.WARNING, logger="udskit"),
        udskit.listen(name, allow=policy),
        udskit.connect(name) as client,
    ):
        assert client.peer is not None
        assert client.peer.pid == os.getpid()
    assert caplog.records == []


# -- a process that ignores the lock -------------------------------------------------------


class Intruder(socket.socket):
    """A socket whose bind() lets ``intrude`` create PATH right after it: another process
    that ignores the lock file and creates the path while our claim is under way."""

    def __init__(self, intrude: Callable[[], object]) -> None:
        super().__init__(socket.AF_UNIX, socket.SOCK_STREAM)
        self.intrude = intrude

    def bind(self, address: object) -> None:
        super().bind(address)  # type: ignore[arg-type]
        self.intrude()


def test_a_file_created_during_the_claim_is_never_clobbered(path: Path, sockdir: Path) -> None:
    intruder = Intruder(lambda: path.write_bytes(b"theirs"))
    with intruder, pytest.raises(SocketFileError, match="regular file is in the way"):
        sockfile_module.claim(intruder, udskit.Address.parse(path))
    assert path.read_bytes() == b"theirs"
    assert debris(sockdir) == []
    path.unlink()


def test_a_server_started_during_the_claim_keeps_its_socket(path: Path) -> None:
    intruder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def start_server() -> None:
        intruder.bind(os.fspath(path))
        intruder.listen()

    try:
        with Intruder(start_server) as sock, pytest.raises(AddressInUse) as caught:
            sockfile_module.claim(sock, udskit.Address.parse(path))
        assert caught.value.pid == os.getpid()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(os.fspath(path))  # the intruder's socket is still the one there
    finally:
        intruder.close()
        path.unlink()


# -- nothing removed that changed after we looked ----------------------------------------------


@pytest.fixture
def open_path(sockdir: Path) -> Iterator[Path]:
    """A socket path in a directory anyone may write (0777, no sticky bit): where another
    user could swap files, so udskit sets each file aside before removing it. Here the
    swaps are made by this same user, standing in for another."""
    shared = sockdir / "open"
    shared.mkdir()
    shared.chmod(0o777)
    yield shared / "app.sock"
    assert debris(shared) == [], "a claim left a lock file or private directory behind"


def _swap_for_regular_file(path: Path) -> Callable[[], None]:
    def swap() -> None:
        os.unlink(path)
        path.write_bytes(b"precious data")

    return swap


@pytest.mark.parametrize("kind", ["stream", "dgram"])
def test_stale_socket_swapped_for_a_file_after_the_check_is_never_deleted(
    open_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    stale_socket(open_path, kind)
    after_look = after_look_at(monkeypatch, b"app.sock")
    swapped: list[bool] = []

    def swap() -> None:
        _swap_for_regular_file(open_path)()
        swapped.append(True)

    # Armed once the probe is done: the next look is the last before removal.
    after_probe(monkeypatch).append(lambda: after_look.append(swap))
    with pytest.raises(SocketFileError, match="replaced by a regular file") as caught:
        udskit.listen(open_path, type=kind)
    assert swapped == [True]
    assert str(open_path) in str(caught.value)
    assert open_path.read_bytes() == b"precious data"


@pytest.mark.parametrize("kind", ["stream", "dgram"])
def test_close_never_deletes_a_file_swapped_in_after_the_check(
    open_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    listener = udskit.listen(open_path, type=kind)
    after_look_at(monkeypatch, b"app.sock").append(_swap_for_regular_file(open_path))
    with caplog.at_level(logging.INFO, logger="udskit"):
        listener.close()
    assert open_path.read_bytes() == b"precious data"
    assert "was replaced by another file; leaving it in place" in caplog.text


@pytest.mark.parametrize("kind", ["stream", "dgram"])
def test_a_lock_file_udskit_did_not_create_is_kept(path: Path, kind: str) -> None:
    lock_path = path.with_name(path.name + ".lock")
    lock_path.write_bytes(b"")
    inode = os.lstat(lock_path).st_ino
    try:
        with udskit.listen(path, type=kind):
            assert os.lstat(lock_path).st_ino == inode
        assert os.lstat(lock_path).st_ino == inode, "a lock file we did not create was removed"
    finally:
        lock_path.unlink()


def test_a_fifo_at_the_lock_path_is_refused_without_hanging(path: Path) -> None:
    lock_path = path.with_name(path.name + ".lock")
    os.mkfifo(lock_path)
    try:
        with pytest.raises(SocketFileError, match="a FIFO is there, not a lock file") as caught:
            udskit.listen(path)
        assert str(lock_path) in str(caught.value)
        assert stat.S_ISFIFO(os.lstat(lock_path).st_mode)
        assert not path.exists()
    finally:
        lock_path.unlink()


@pytest.mark.parametrize("kind", ["stream", "dgram"])
def test_aio_listen_waiting_for_the_lock_leaves_the_loop_free(path: Path, kind: str) -> None:
    """While another process holds the claim lock, aio.listen() is pending and the other
    tasks on the loop keep running; once it is released, the listen completes."""
    import asyncio

    import udskit.aio

    lock_path = path.with_name(path.name + ".lock")
    holder = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)  # another claimant's lock
    fcntl.flock(holder, fcntl.LOCK_EX)
    ticks = 0

    async def main() -> None:
        nonlocal ticks
        listening = asyncio.ensure_future(udskit.aio.listen(path, type=kind))
        for _ in range(50):  # the loop turns while listen() waits
            await asyncio.sleep(0)
            assert not listening.done(), "listen() did not wait for the lock"
            ticks += 1
        fcntl.flock(holder, fcntl.LOCK_UN)
        listener = await asyncio.wait_for(listening, sockfile_module.CLAIM_LOCK_TIMEOUT)
        async with listener:
            assert path.exists()

    try:
        asyncio.run(main())
    finally:
        os.close(holder)
        lock_path.unlink()
    assert ticks == 50


def test_aio_listen_cancelled_while_waiting_leaves_nothing_behind(path: Path) -> None:
    """The claim goes on in its thread after the task is cancelled; what it claims is
    closed and its socket file removed, with no descriptor left open."""
    import asyncio

    import udskit.aio

    from ..conftest import open_fds

    lock_path = path.with_name(path.name + ".lock")
    holder = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(holder, fcntl.LOCK_EX)
    before = open_fds()

    async def main() -> None:
        listening = asyncio.ensure_future(udskit.aio.listen(path, type="dgram"))
        await asyncio.sleep(0)  # it is waiting for the lock, in its thread
        listening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await listening
        fcntl.flock(holder, fcntl.LOCK_UN)  # now the claim completes, for nobody

    try:
        asyncio.run(main())  # waits for the executor's threads to finish
    finally:
        os.close(holder)
        lock_path.unlink()
    assert not path.exists()
    assert open_fds() - before <= {holder}


@pytest.mark.parametrize(
    ("mode", "mine", "expected"),
    [
        (0o700, True, True),
        (0o755, True, True),
        (0o777, True, False),
        (0o770, True, False),
        (0o1777, True, True),
        (0o1777, False, False),
    ],
    ids=["0700", "0755", "0777", "0770", "1777-mine", "1777-theirs"],
)
def test_where_others_cannot_swap_a_file(
    sockdir: Path, mode: int, mine: bool, expected: bool
) -> None:
    """Where udskit may check and unlink by name: only we (or root) write the directory,
    or it is sticky and the file is ours."""
    directory = sockdir / "d"
    directory.mkdir()
    directory.chmod(mode)
    found = os.lstat(sockdir)
    if not mine:  # a file of another uid, as stat would show it
        values = list(found)
        values[stat.ST_UID] = os.geteuid() + 1
        found = os.stat_result(values)
    handle = sockfile_module._Directory(os.fsencode(directory / "app.sock"))
    try:
        assert sockfile_module._others_cannot_swap(handle, found) is expected
    finally:
        handle.close()


@pytest.mark.parametrize("full", ["lock", "private"])
def test_a_full_file_system_is_said_not_taken_for_permissions(
    path: Path, monkeypatch: pytest.MonkeyPatch, full: str
) -> None:
    """ENOSPC creating the lock file or the private directory: the advice is to free
    space, not to fix permissions, and nothing is left behind."""
    real_open = os.open

    def open_without_space(name: bytes, flags: int, *args: object, **kwargs: int) -> int:
        if flags & os.O_CREAT:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(name, flags, *args, **kwargs)  # type: ignore[arg-type]

    def mkdir_without_space(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patched:
        if full == "lock":
            patched.setattr(os, "open", open_without_space)
        else:
            patched.setattr(os, "mkdir", mkdir_without_space)
        with pytest.raises(SocketFileError) as refused:
            udskit.listen(path)
    message = str(refused.value)
    assert str(path) in message
    assert "no space left on device" in message
    assert "free space or inodes there" in message
    assert "permission" not in message
    assert os.listdir(path.parent) == []
