"""``udskit doctor``: one test per cause, and proof that the advice works."""

from __future__ import annotations

import errno
import grp
import json
import os
import shlex
import socket
import struct
import subprocess
from pathlib import Path

import pytest

from tests.cli.conftest import UDSKIT, Background, Result, require, serve, udskit

NOBODY = 65534


def doctor(*args: str | os.PathLike[str]) -> Result:
    result = udskit("doctor", *args)
    assert result.code in (0, 1), result.err
    assert result.err == ""
    return result


def fixes(result: Result) -> list[str]:
    return [line.split("fix: ", 1)[1] for line in result.text.splitlines() if "fix: " in line]


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root, to judge and test another user for real")


def connects_as_nobody(path: Path) -> bool:
    """The kernel's verdict, from a real peer (socat) running as nobody."""
    socat = require("socat")
    done = subprocess.run(
        [socat, "-u", "/dev/null", f"UNIX-CONNECT:{path}"],
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        capture_output=True,
        timeout=20,
        check=False,
    )
    return done.returncode == 0


def stale_socket(path: Path, kind: int = socket.SOCK_STREAM) -> None:
    sock = socket.socket(socket.AF_UNIX, kind)
    sock.bind(os.fspath(path))
    sock.close()


# -- the causes ---------------------------------------------------------------------------
def test_missing_directory_is_named(sockdir: Path) -> None:
    result = doctor(sockdir / "run" / "app" / "app.sock")
    assert result.code == 1
    assert f"the directory {sockdir}/run does not exist ({sockdir} does)" in result.text
    assert f"mkdir -p {sockdir}/run/app" in fixes(result)[-1]


def test_missing_file_suggests_a_close_name(sockdir: Path, background: list[Background]) -> None:
    serve(background, sockdir / "app.sock", "--echo")
    result = doctor(sockdir / "ap.sock")
    assert result.code == 1
    assert f"no such file: {sockdir}/ap.sock" in result.text
    assert "sockets in it: app.sock" in result.text
    assert f"did you mean {sockdir}/app.sock?" in fixes(result)


def test_not_a_socket(sockdir: Path) -> None:
    path = sockdir / "app.sock"
    path.write_text("log line\n")
    result = doctor(path)
    assert result.code == 1
    assert f"{path} is a regular file, not a socket" in result.text
    assert path.read_text() == "log line\n"


def test_a_file_where_a_directory_should_be(sockdir: Path) -> None:
    (sockdir / "run").write_text("")
    result = doctor(sockdir / "run" / "app.sock")
    assert result.code == 1
    assert f"{sockdir}/run is a regular file, not a directory" in result.text


def test_permission_denied_on_a_directory_and_its_fix(
    sockdir: Path, background: list[Background]
) -> None:
    needs_root()
    private = sockdir / "private"
    private.mkdir(mode=0o700)
    os.chmod(sockdir, 0o755)
    path = private / "app.sock"
    serve(background, path, "--echo", "--mode", "666")
    result = doctor(path, "--as", "nobody")
    assert result.code == 1
    text = result.text
    assert "doctor: " in text
    assert "nobody (uid 65534, groups nogroup(65534))" in text
    assert f"nobody lacks search (x) permission on directory {private}" in text
    assert f"{private}: drwx------ root:root (mode 0700)" in text
    assert "confirmed: a connect as nobody was refused (permission denied)" in text
    assert not connects_as_nobody(path)
    advice = [f for f in fixes(result) if f.startswith("chmod o+x")]
    subprocess.run(advice[0].split("   (")[0], shell=True, check=True)
    assert doctor(path, "--as", "nobody").code == 0
    assert connects_as_nobody(path)


def test_permission_denied_on_the_socket_and_its_fix(
    sockdir: Path, background: list[Background]
) -> None:
    needs_root()
    os.chmod(sockdir, 0o755)
    path = sockdir / "app.sock"
    serve(background, path, "--echo")  # mode 0600, root's
    result = doctor(path, "--as", "nobody")
    assert result.code == 1
    assert f"nobody lacks write (w) permission on socket {path}" in result.text
    assert f"{path}: srw------- root:root (mode 0600)" in result.text
    first = fixes(result)[0]
    assert first == f"chgrp nogroup {path} && chmod 660 {path}"
    assert not connects_as_nobody(path)
    subprocess.run(first, shell=True, check=True)
    assert doctor(path, "--as", "nobody").code == 0
    assert connects_as_nobody(path)


def test_group_bits_suggest_joining_the_group(sockdir: Path, background: list[Background]) -> None:
    needs_root()
    os.chmod(sockdir, 0o755)
    path = sockdir / "app.sock"
    group = grp.getgrnam("daemon")
    serve(background, path, "--echo", "--mode", "660", "--group", "daemon")
    result = doctor(path, "--as", "nobody")
    assert result.code == 1
    assert "it is neither the owner nor in the group, so the 'other' bits apply" in result.text
    assert any(f.startswith("usermod -aG daemon nobody") for f in fixes(result))
    assert group.gr_gid not in os.getgrouplist("nobody", NOBODY)


def test_an_acl_can_allow_what_the_bits_do_not(sockdir: Path, background: list[Background]) -> None:
    needs_root()
    os.chmod(sockdir, 0o755)
    path = sockdir / "app.sock"
    serve(background, path, "--echo")
    # user::rw- user:nobody:rw- group::--- mask::rw- other::--- (the xattr's binary form)
    entries = [(0x01, 6, -1), (0x02, 6, NOBODY), (0x04, 0, -1), (0x10, 6, -1), (0x20, 0, -1)]
    acl = struct.pack("<I", 2) + b"".join(
        struct.pack("<HHI", tag, perm, who & 0xFFFFFFFF) for tag, perm, who in entries
    )
    try:
        os.setxattr(path, "system.posix_acl_access", acl)
    except OSError as exc:
        pytest.skip(f"no POSIX ACLs on this file system: {exc}")
    result = doctor(path, "--as", "nobody")
    assert result.code == 0, result.text
    assert "yet the kernel let nobody connect: an ACL grants" in result.text
    assert connects_as_nobody(path)


def test_stale_socket_file(sockdir: Path) -> None:
    path = sockdir / "gunicorn.sock"
    stale_socket(path)
    result = doctor(path)
    assert result.code == 1
    assert f"nothing is listening on {path}: a stale socket file" in result.text
    assert "the socket file was created " in result.text
    assert f"ago by uid {os.geteuid()}" in result.text
    assert f"or remove it: rm {path}" in fixes(result)


def test_replaced_socket_names_the_orphaned_listener(sockdir: Path) -> None:
    path = sockdir / "app.sock"
    with socket.socket(socket.AF_UNIX) as orphan:
        orphan.bind(os.fspath(path))
        orphan.listen()
        path.unlink()  # a careless restart deleted the live socket...
        stale_socket(path)  # ...and left another, dead one in its place
        result = doctor(path)
    assert result.code == 1
    assert f"pid {os.getpid()}" in result.text
    assert "still listens on a socket once bound at this path" in result.text


def test_wrong_socket_type(sockdir: Path, background: list[Background]) -> None:
    path = sockdir / "d.sock"
    serve(background, path, "--type", "dgram", "--echo")
    result = doctor(path)
    assert result.code == 1
    assert f"{path} is a dgram socket, not a stream one (EPROTOTYPE)" in result.text
    assert fixes(result)[0].startswith("connect with --type dgram")
    assert doctor("--type", "dgram", path).code == 0


def test_backlog_full(sockdir: Path) -> None:
    path = sockdir / "busy.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(os.fspath(path))
        listener.listen(0)
        queued = []
        try:
            for _ in range(16):
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
                queued.append(client)
                if client.connect_ex(os.fspath(path)) == errno.EAGAIN:
                    break
            result = doctor(path)
        finally:
            for client in queued:
                client.close()
    assert result.code == 1
    assert "alive but its backlog is full" in result.text


def test_file_name_too_long_for_sun_path(sockdir: Path) -> None:
    path = sockdir / ("n" * 100 + ".sock")
    result = doctor(path)
    assert result.code == 1
    assert "[problem] length:" in result.text
    assert f"is {len(os.fsencode(path))} bytes and its file name alone 105" in result.text


def test_long_path_connects_with_a_warning(sockdir: Path, background: list[Background]) -> None:
    deep = sockdir / ("d" * 60) / ("e" * 40)
    deep.mkdir(parents=True)
    path = deep / "app.sock"
    serve(background, path, "--echo")
    result = doctor(path)
    assert result.code == 0, result.text
    assert "[warning] length:" in result.text
    assert "more than the 107 that fit in sun_path" in result.text


def test_abstract_name_unknown(background: list[Background]) -> None:
    name = f"@udskit-doctor-{os.getpid()}"
    server = Background([*UDSKIT, "serve", "--echo", name + "-live"])
    background.append(server)
    assert udskit("wait", name + "-live").code == 0
    result = doctor(name + "-lve")
    assert result.code == 1
    assert f"no socket is bound to {name}-lve in this network namespace" in result.text
    assert f"similar names in use: {name}-live" in result.text
    ok = doctor(name + "-live")
    assert ok.code == 0
    assert "abstract names have no file permissions" in ok.text


def test_success_names_the_server(sockdir: Path, background: list[Background]) -> None:
    path = sockdir / "ok.sock"
    server = serve(background, path, "--type", "seqpacket", "--echo")
    result = doctor("--type", "seqpacket", path)
    assert result.code == 0
    uid, gid = os.geteuid(), os.getegid()
    assert f"connected to {path}: a seqpacket server, pid {server.pid} (python" in result.text
    assert f"uid {uid} (" in result.text
    assert f"gid {gid} (" in result.text
    assert result.text.splitlines()[-1].endswith(f"can connect to {path}")


def test_datagram_server_found_through_proc(sockdir: Path, background: list[Background]) -> None:
    path = sockdir / "dg.sock"
    server = serve(background, path, "--type", "dgram", "--print")
    result = doctor("--type", "dgram", path)
    assert result.code == 0
    assert f"a dgram server, pid {server.pid}" in result.text


def test_json(sockdir: Path) -> None:
    path = sockdir / "gone.sock"
    stale_socket(path)
    result = doctor("--json", path)
    data = json.loads(result.out)
    assert data["address"] == str(path)
    assert data["user"]["uid"] == os.geteuid()
    checks = [(f["check"], f["status"]) for f in data["findings"]]
    assert ("listening", "problem") in checks


def test_bad_address_is_a_finding() -> None:
    result = doctor("gopher:x")
    assert result.code == 1
    assert "[problem] address: unknown address scheme 'gopher'" in result.text


def test_an_empty_address_is_named_in_the_report() -> None:
    result = doctor("")
    assert result.code == 1
    lines = result.text.splitlines()
    assert lines[0].startswith("doctor: '' for "), lines
    assert "[problem] address: empty address" in result.text
    assert lines[-1].endswith("cannot connect to '': 1 problem"), lines


def test_unknown_user_is_a_usage_error(sockdir: Path) -> None:
    result = udskit("doctor", "--as", "no-such-user-here", sockdir / "x.sock")
    assert result.code == 2
    assert result.err.strip() == (
        "udskit doctor: unknown user 'no-such-user-here': not in the passwd database "
        "(getent passwd no-such-user-here)"
    )


def test_fix_commands_quote_paths(sockdir: Path) -> None:
    path = sockdir / "with space" / "app.sock"
    path.parent.mkdir()
    stale_socket(path)
    result = doctor(path)
    assert f"or remove it: rm {shlex.quote(str(path))}" in fixes(result)


def _connections_received(listener: socket.socket) -> list[bytes]:
    """What each connection queued on ``listener`` sent before it closed."""
    listener.setblocking(False)
    received = []
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return received
        with conn:
            conn.settimeout(5)
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            received.append(data)


def test_doctor_sends_a_server_nothing_unless_asked_for_http(sockdir: Path) -> None:
    """A server of another protocol (PostgreSQL logs "invalid startup packet") must not see
    a byte from a default diagnosis; with --http it gets one HEAD request."""
    path = sockdir / "quiet.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(os.fspath(path))
        listener.listen(16)  # never answers: what reaches it stays queued
        result = doctor(path)
        assert result.code == 0
        assert "http" not in result.text
        received = _connections_received(listener)
        assert received, "doctor connected"
        assert set(received) == {b""}, received
        asked = doctor("--http", path)
        received = _connections_received(listener)
    assert any(data.startswith(b"HEAD / HTTP/1.1\r\n") for data in received), received
    assert "[info]    http: the server gave no HTTP answer to 'HEAD /'" in asked.text


def test_http_check_shows_bytes_as_text(sockdir: Path, background: list[Background]) -> None:
    """An echo server sends the request back: not HTTP, said without Python's notation."""
    path = sockdir / "echo.sock"
    serve(background, path, "--echo")
    result = doctor("--http", path)
    assert result.code == 0  # reachable: HTTP or not, that is no problem
    lines = result.text.splitlines()
    at = lines.index(
        "[info]    http: the server gave no HTTP answer to 'HEAD /' (fine unless nginx or curl "
        "should reach it)"
    )
    assert "'HEAD / HTTP/1.1'" in lines[at + 1]
    assert "bytearray" not in result.text
    assert "b'" not in result.text
    assert "--no-http" in udskit("doctor", "--help").text  # still accepted
    assert doctor("--no-http", path).text == doctor(path).text
