"""``udskit.inspect``, the library under doctor, ls and wait, called directly."""

from __future__ import annotations

import dataclasses
import errno
import os
import socket
import stat
import struct
from pathlib import Path

import pytest

import udskit
from udskit import inspect
from udskit.inspect import Diagnosis, FileInfo, Finding, ServerInfo, UserInfo, doctor, names, paths

GUEST = UserInfo("guest", 4242, 4242, (4242,))


def listener(path: Path, kind: int = socket.SOCK_STREAM) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, kind)
    sock.bind(os.fspath(path))
    if kind != socket.SOCK_DGRAM:
        sock.listen()
    return sock


def stale(path: Path, kind: int = socket.SOCK_STREAM) -> None:
    sock = socket.socket(socket.AF_UNIX, kind)
    sock.bind(os.fspath(path))
    sock.close()


def checks(diagnosis: Diagnosis) -> list[tuple[str, str]]:
    return [(f.check, f.status) for f in diagnosis.findings]


# -- try_connect ----------------------------------------------------------------------------
def test_try_connect_every_outcome(sockdir: Path, no_fd_leak: None) -> None:
    with listener(sockdir / "s.sock"), listener(sockdir / "d.sock", socket.SOCK_DGRAM):
        ok = inspect.try_connect(sockdir / "s.sock")
        assert (ok.ok, ok.type) == (True, "stream")
        assert ok.peer is not None
        assert ok.peer.pid == os.getpid()
        dgram = inspect.try_connect(sockdir / "d.sock")  # any type: stream, seqpacket, dgram
        assert (dgram.ok, dgram.type, dgram.peer) == (True, "dgram", None)
        wrong = inspect.try_connect(sockdir / "d.sock", "stream")
        assert (wrong.ok, wrong.errno) == (False, errno.EPROTOTYPE)
    stale(sockdir / "x.sock")
    refused = inspect.try_connect(sockdir / "x.sock")
    assert (refused.ok, refused.errno) == (False, errno.ECONNREFUSED)
    assert "nothing is listening" in refused.reason
    missing = inspect.try_connect(sockdir / "none.sock")
    assert missing.errno == errno.ENOENT
    with pytest.raises(udskit.AddressError, match="give a path"):
        inspect.try_connect("fd:3")
    with pytest.raises(ValueError, match="unknown socket type 'raw'"):
        inspect.try_connect(sockdir / "s.sock", "raw")


def test_try_connect_tcp() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert inspect.try_connect(f"tcp:127.0.0.1:{port}").ok
    refused = inspect.try_connect(f"tcp:127.0.0.1:{port}")
    assert (refused.ok, refused.errno) == (False, errno.ECONNREFUSED)
    assert refused.reason == f"cannot connect to tcp:127.0.0.1:{port}: connection refused"


# -- diagnose -------------------------------------------------------------------------------
def test_diagnosis_of_a_live_server(sockdir: Path) -> None:
    with listener(sockdir / "ok.sock"):
        found = inspect.diagnose(sockdir / "ok.sock")
    assert found.ok
    assert found.server == ServerInfo(
        "stream",
        os.getpid(),
        os.geteuid(),
        os.getegid(),
        found.server.process if found.server else "",
    )
    assert checks(found) == [("permission", "ok"), ("server", "ok")]
    assert not found.as_other
    assert found.user == UserInfo.current()


def test_diagnosis_causes(sockdir: Path, no_fd_leak: None) -> None:
    (sockdir / "file").write_text("")
    stale(sockdir / "stale.sock")
    cases = {
        sockdir / "a" / "b.sock": ("path", "the directory"),
        sockdir / "none.sock": ("path", "no such file"),
        sockdir / "file": ("path", "not a socket"),
        sockdir / "file" / "x.sock": ("path", "not a directory"),
        sockdir / "stale.sock": ("listening", "stale socket file"),
        sockdir / ("n" * 300): ("length", "NAME_MAX"),
        sockdir / ("n" * 100): ("length", "does not fit"),
        sockdir: ("path", "not a socket"),
    }
    for address, (check, phrase) in cases.items():
        found = inspect.diagnose(address)
        assert not found.ok, address
        [problem] = found.problems
        assert problem.check == check, (address, found)
        assert phrase in problem.summary, (address, problem)


def test_bad_and_foreign_addresses() -> None:
    bad = inspect.diagnose("gopher:x")
    assert checks(bad) == [("address", "problem")]
    assert bad.address == "gopher:x"
    huge = inspect.diagnose("/" + "d/" * 2100)
    assert checks(huge) == [("length", "problem")]
    fd = inspect.diagnose("fd:3")
    assert "not an address other programs reach" in fd.problems[0].summary
    refused = inspect.diagnose("tcp:127.0.0.1:1")
    assert checks(refused) == [("listening", "problem")]
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        found = inspect.diagnose(f"tcp:127.0.0.1:{server.getsockname()[1]}")
    assert found.ok
    assert found.server == ServerInfo("stream")


def test_abstract(sockdir: Path, no_fd_leak: None) -> None:
    name = f"udskit-inspect-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as bound:
        bound.bind("\0" + name)
        found = inspect.diagnose("@" + name, type="dgram")
        assert found.ok
        assert found.server is not None
        assert found.server.pid == os.getpid()
        wrong = inspect.diagnose("@" + name)
        assert wrong.problems[0].check == "type"
        unknown = inspect.diagnose("@" + name + "x")
    assert "similar names in use: @" + name in unknown.problems[0].facts[0]


def test_long_path_is_a_warning_not_a_problem(sockdir: Path) -> None:
    deep = sockdir / ("d" * 60) / ("e" * 40)
    deep.mkdir(parents=True)
    directory = os.open(deep, os.O_PATH)
    try:
        with listener(Path(f"/proc/self/fd/{directory}/app.sock")):
            found = inspect.diagnose(deep / "app.sock")
    finally:
        os.close(directory)
    assert found.ok
    assert checks(found)[0] == ("length", "warning")


def test_permissions_judged_for_another_user(sockdir: Path) -> None:
    os.chmod(sockdir, 0o755)
    path = sockdir / "app.sock"
    with listener(path):
        os.chmod(path, 0o600)
        found = inspect.diagnose(path, user=GUEST)
        assert found.as_other
        assert not found.ok
        assert found.problems[0].summary == f"guest lacks write (w) permission on socket {path}"
        os.chmod(path, 0o666)
        assert inspect.diagnose(path, user=GUEST).ok


def test_permission_fixes() -> None:
    def info(mode: int, uid: int = 0, gid: int = 0, kind: str = "socket") -> FileInfo:
        return FileInfo("/run/app/s.sock", kind, mode, uid, gid, 0.0)

    owner = paths._permission_fixes(GUEST, info(0o400, uid=4242), paths.WRITE)
    assert owner[0] == "chmod 600 /run/app/s.sock"
    member = paths._permission_fixes(GUEST, info(0o600, gid=4242), paths.WRITE)
    assert member[0] == "chmod 660 /run/app/s.sock"
    outsider = paths._permission_fixes(GUEST, info(0o660, gid=1), paths.WRITE)
    assert outsider[0].startswith("usermod -aG ")
    assert outsider[0].split()[3] == "guest"
    root_group = paths._permission_fixes(GUEST, info(0o660, gid=0), paths.WRITE)
    assert not any(f.startswith("usermod") for f in root_group)  # never "join group root"
    directory = paths._permission_fixes(GUEST, info(0o700, kind="directory"), paths.SEARCH)
    assert "chmod o+x /run/app/s.sock" in directory[-1]
    assert "chmod 710" in directory[0]


def test_allowed_follows_one_class_of_bits() -> None:
    def info(mode: int, uid: int, gid: int) -> FileInfo:
        return FileInfo("/x", "socket", mode, uid, gid, 0.0)

    assert not paths._allowed(GUEST, info(0o066, 4242, 4242), paths.WRITE)  # owner bits rule
    assert paths._allowed(GUEST, info(0o020, 1, 4242), paths.WRITE)
    assert not paths._allowed(GUEST, info(0o602, 1, 4242), paths.WRITE)  # group bits rule
    assert paths._allowed(GUEST, info(0o002, 1, 1), paths.WRITE)
    assert paths._allowed(UserInfo("root", 0, 0, (0,)), info(0o000, 1, 1), paths.WRITE)


def test_kernel_verdict_wins(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch, no_fd_leak: None
) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root can ask the kernel on another user's behalf")
    os.chmod(sockdir, 0o755)
    path = sockdir / "app.sock"
    with listener(path):
        os.chmod(path, 0o666)
        confirmed = inspect.diagnose(path, user=GUEST)  # a real fork and setuid
        assert confirmed.ok
        assert "confirmed: a connect as guest was accepted" in [
            f.summary for f in confirmed.findings
        ]
        # Faults only a security module or an odd system produces: injected.
        monkeypatch.setattr(doctor, "_connect_as", lambda *a: errno.EACCES)
        refused = inspect.diagnose(path, user=GUEST)
        assert not refused.ok
        assert "although the permission bits allow it" in refused.problems[0].summary
        monkeypatch.setattr(doctor, "_connect_as", lambda *a: -1)
        unknown = inspect.diagnose(path, user=GUEST)
        assert unknown.ok
        assert "a connect as guest failed: the check could not run" in [
            f.summary for f in unknown.findings
        ]


def test_diagnosis_values() -> None:
    base = Diagnosis("/x", GUEST, ())
    assert base.ok
    more = base.adding(Finding("http", "problem", "no HTTP"), Finding("x", "info", "note"))
    assert [f.check for f in more.findings] == ["http", "x"]
    assert not more.ok
    assert [f.check for f in more.problems] == ["http"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        more.address = "/y"  # type: ignore[misc]
    assert str(GUEST) == "guest (uid 4242, groups 4242(4242))"
    assert str(ServerInfo("dgram")) == "a dgram server"


def test_user_lookup() -> None:
    root = UserInfo.lookup("root")
    assert (root.uid, root.gid) == (0, 0)
    assert 0 in root.groups
    assert UserInfo.lookup(0) == root
    assert UserInfo.lookup("0") == root
    with pytest.raises(ValueError, match="unknown user 'no-such-user-here'"):
        UserInfo.lookup("no-such-user-here")


def test_file_info_shows_mode_owner_and_acl(sockdir: Path) -> None:
    info = FileInfo.of(os.fsencode(sockdir), os.stat(sockdir))
    assert info.kind == "directory"
    assert str(info).startswith("drwx------ ")
    assert str(info).endswith("(mode 0700)")
    marked = dataclasses.replace(info, has_acl=True)
    assert str(marked).startswith("drwx------+ ")


# -- list_sockets ---------------------------------------------------------------------------
def fake_proc(tmp_path: Path, table: str, holders: dict[int, list[int]]) -> Path:
    proc = tmp_path / "proc"
    (proc / "net").mkdir(parents=True)
    (proc / "net" / "unix").write_text(
        "Num       RefCount Protocol Flags    Type St Inode Path\n" + table
    )
    for pid, inodes in holders.items():
        fds = proc / str(pid) / "fd"
        fds.mkdir(parents=True)
        (proc / str(pid) / "comm").write_text(f"prog{pid}\n")
        for n, inode in enumerate(inodes):
            (fds / str(n)).symlink_to(f"socket:[{inode}]")
        (fds / "99").symlink_to("/dev/null")
    (proc / "self").mkdir()  # not a pid: ignored
    return proc


def test_list_sockets_reads_proc(tmp_path: Path) -> None:
    table = (
        "0000: 00000002 00000000 00010000 0001 01 100 /run/app/.udskit-0123abcd/app.sock\n"
        "0000: 00000003 00000000 00000000 0001 03 101 /run/app/.udskit-0123abcd/app.sock\n"
        "0000: 00000003 00000000 00000000 0001 02 102 /run/app/.udskit-0123abcd/app.sock\n"
        "0000: 00000002 00000000 00000000 0002 01 103 /run/app/log sock\n"
        "0000: 00000002 00000000 00010000 0005 01 104 @abstract\n"
        "0000: 00000003 00000000 00000000 0001 03 105\n"
        "0000: 00000002 00000000 00000000 0001 03 106 /tmp/client.sock\n"
        "0000: 00000002 00000000 00000000 0003 01 107 /raw/socket\n"
        "garbage line\n"
        "0000: 00000002 00000000 zzzzzzzz 0001 01 108 /bad/flags\n"
    )
    proc = fake_proc(tmp_path, table, {10: [100, 101], 11: [106]})
    entries = inspect.list_sockets(proc=os.fspath(proc))
    by_path = {e.path: e for e in entries}
    assert sorted(by_path) == [
        "/run/app/app.sock",
        "/run/app/log sock",
        "/tmp/client.sock",
        "@abstract",
    ]
    app = by_path["/run/app/app.sock"]
    assert (app.type, app.state, app.connections) == ("stream", "listening", 2)
    assert app.bound_as == "/run/app/.udskit-0123abcd/app.sock"
    assert (app.pids, app.processes) == ((10,), ("prog10",))
    assert by_path["/run/app/log sock"].state == "bound"
    assert by_path["@abstract"].type == "seqpacket"
    assert by_path["/tmp/client.sock"].state == "connected"
    assert by_path["/tmp/client.sock"].pids == (11,)
    assert by_path["@abstract"].pids == ()
    only = inspect.list_sockets("/run/app", proc=os.fspath(proc), with_owners=False)
    assert [e.path for e in only] == ["/run/app/app.sock", "/run/app/log sock"]
    assert only[0].pids == ()
    assert only[0].as_dict()["path"] == "/run/app/app.sock"


def test_list_sockets_sees_a_real_listener(sockdir: Path) -> None:
    with udskit.listen(sockdir / "real.sock"):
        [entry] = inspect.list_sockets(sockdir)
    assert entry.path == str(sockdir / "real.sock")
    assert os.getpid() in entry.pids
    assert entry.state == "listening"


# -- find_stale -----------------------------------------------------------------------------
def test_find_stale(sockdir: Path, no_fd_leak: None) -> None:
    (sockdir / "sub").mkdir()
    stale(sockdir / "sub" / "dead.sock", socket.SOCK_DGRAM)
    stale(sockdir / "dead.sock")
    (sockdir / "file").write_text("")
    (sockdir / ".udskit-00000000").mkdir()
    stale(sockdir / ".udskit-00000000" / "claiming.sock")  # a claim in progress: skipped
    with listener(sockdir / "live.sock"):
        found = inspect.find_stale(sockdir)
    assert [s.path for s in found] == [str(sockdir / "dead.sock"), str(sockdir / "sub/dead.sock")]
    assert all(s.uid == os.geteuid() and s.age >= 0 for s in found)
    assert stat.S_ISSOCK(os.stat(found[0].path).st_mode)  # reported, never removed
    assert found[0].as_dict()["path"] == found[0].path
    with pytest.raises(NotADirectoryError):
        inspect.find_stale(sockdir / "file")


# -- the rarer findings ---------------------------------------------------------------------
def test_full_backlog(sockdir: Path) -> None:
    path = sockdir / "busy.sock"
    with listener(path) as server:
        server.listen(0)
        queued = []
        try:
            for _ in range(16):
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
                queued.append(client)
                if client.connect_ex(os.fspath(path)) == errno.EAGAIN:
                    break
            found = inspect.diagnose(path)
        finally:
            for client in queued:
                client.close()
    assert "backlog is full" in found.problems[0].summary


def test_replaced_socket(sockdir: Path) -> None:
    path = sockdir / "app.sock"
    with listener(path):
        path.unlink()
        stale(path)
        found = inspect.diagnose(path)
    facts = found.problems[0].facts
    assert any(f"pid {os.getpid()}" in fact and "deleted and re-created" in fact for fact in facts)


def test_acl_granting_access(sockdir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root can ask the kernel on another user's behalf")
    os.chmod(sockdir, 0o755)
    path = sockdir / "acl.sock"
    entries = [(0x01, 6, 0), (0x02, 6, GUEST.uid), (0x04, 0, 0), (0x10, 6, 0), (0x20, 0, 0)]
    acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)
    with listener(path):
        os.chmod(path, 0o600)
        try:
            os.setxattr(path, "system.posix_acl_access", acl)
        except OSError as exc:
            pytest.skip(f"no POSIX ACLs here: {exc}")
        found = inspect.diagnose(path, user=GUEST)
    assert found.ok
    assert ("permission", "warning") in checks(found)
    assert any("an ACL grants what the mode bits do not" in f.summary for f in found.findings)


def test_a_directory_we_cannot_look_into(sockdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hidden = sockdir / "hidden"
    hidden.mkdir()
    real_stat = os.stat

    def refusing(path: object, *args: object, **kwargs: object) -> os.stat_result:
        if os.fsdecode(path).startswith(os.fspath(hidden) + "/"):  # type: ignore[arg-type]
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_stat(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(paths.os, "stat", refusing)
    found = inspect.diagnose(hidden / "app.sock")
    assert found.problems[0].summary.startswith(f"cannot look inside {hidden}")


def test_denied_to_ourselves_stops_before_connecting(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = sockdir / "app.sock"
    with listener(path):
        os.chmod(path, 0o600)
        monkeypatch.setattr(UserInfo, "current", classmethod(lambda cls: GUEST))
        found = inspect.diagnose(path)
    assert not found.as_other
    assert checks(found)[-1] == ("permission", "problem")
    assert found.server is None


def test_ages() -> None:
    assert [names.age(s) for s in (5, 600, 7200 + 300, 86400 * 3)] == [
        "5 s",
        "10 min",
        "2 h 5 min",
        "3 days",
    ]
    assert names.user_name(2**31 - 2) == str(2**31 - 2)
    assert names.group_name(2**31 - 2) == str(2**31 - 2)
