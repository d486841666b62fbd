"""``udskit ls``: the host's Unix sockets from the kernel's socket table, and stale files."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest

from tests.cli.conftest import UDSKIT, Background, one_line_error, serve, udskit


def rows(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines()[1:]]


def test_a_name_bound_with_a_newline_is_one_escaped_row_and_forges_none(sockdir: Path) -> None:
    """/proc/net/unix writes each name raw: another user binding a name with a newline and
    a line of that table after it would add a row of their choosing. ls reads sock_diag,
    where a name is length-delimited, and prints it escaped."""
    forged = f"0000000000000000: 00000002 00000000 00010000 0001 01 99 {sockdir}/forged.sock"
    directory = sockdir / f"d\n{forged.rsplit('/', 1)[0]}"
    directory.mkdir(parents=True)
    name = f"{sockdir}/d\n{forged}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as bound:
        bound.bind(name)
        for listing in (udskit("ls", sockdir), udskit("ls")):
            assert listing.code == 0, listing.err
            assert "forged.sock" not in listing.text.replace(f"d\\n{forged}", ""), listing.text
            [row] = [line for line in listing.text.splitlines() if f"{sockdir}/d" in line]
            assert row.endswith(f"{sockdir}/d\\n{forged}"), row
        data = json.loads(udskit("ls", "--json", sockdir).out)
        assert [entry["path"] for entry in data] == [name]


def test_lists_a_udskit_listener_under_its_real_path(
    sockdir: Path, background: list[Background]
) -> None:
    path = sockdir / "echo.sock"
    server = serve(background, path, "--echo")
    with socket.socket(socket.AF_UNIX) as client:  # one connection, counted
        client.connect(os.fspath(path))
        client.sendall(b"x")
        assert client.recv(10) == b"x"
        result = udskit("ls", sockdir)
    assert result.code == 0, result.err
    assert result.text.splitlines()[0].split() == [
        "TYPE",
        "STATE",
        "CONNS",
        "PID",
        "PROCESS",
        "PATH",
    ]
    # bound in DIR/.udskit-XXXXXXXX/echo.sock and linked into place: shown as DIR/echo.sock
    [row] = rows(result.text)
    assert row[:4] == ["stream", "listening", "1", str(server.pid)]
    assert row[4].startswith("python")
    assert row[5] == str(path)


def test_a_socket_renamed_into_place_after_bind_is_listed_where_it_is(sockdir: Path) -> None:
    """haproxy binds NAME.PID.tmp and renames it to NAME; the kernel keeps the first name.
    ls finds the file by its device and inode, and keeps the kernel's name as bound_as."""
    path = sockdir / "front.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(f"{path}.1234.tmp")
        listener.listen()
        os.rename(f"{path}.1234.tmp", path)
        with socket.socket(socket.AF_UNIX) as client:  # counted under the path it is at
            client.connect(os.fspath(path))
            listing = udskit("ls", sockdir)
            data = json.loads(udskit("ls", "--json", sockdir).out)
    assert listing.code == 0, listing.err
    [row] = rows(listing.text)
    assert row[:3] == ["stream", "listening", "1"]
    assert row[-1] == str(path)
    [entry] = data
    assert (entry["path"], entry["bound_as"]) == (str(path), f"{path}.1234.tmp")


def test_types_states_and_the_directory_filter(sockdir: Path, background: list[Background]) -> None:
    serve(background, sockdir / "d.sock", "--type", "dgram", "--print")
    serve(background, sockdir / "q.sock", "--type", "seqpacket", "--echo")
    other = sockdir / "sub"
    other.mkdir()
    serve(background, other / "s.sock", "--echo")
    result = udskit("ls", sockdir)
    found = {(row[-1], row[0], row[1]) for row in rows(result.text)}
    assert found == {
        (str(sockdir / "d.sock"), "dgram", "bound"),
        (str(sockdir / "q.sock"), "seqpacket", "listening"),
        (str(other / "s.sock"), "stream", "listening"),
    }
    only_sub = udskit("ls", other)
    assert [row[-1] for row in rows(only_sub.text)] == [str(other / "s.sock")]


def test_everything_without_a_directory(background: list[Background]) -> None:
    name = f"@udskit-ls-{os.getpid()}"
    server = Background([*UDSKIT, "serve", "--echo", name])
    background.append(server)
    assert udskit("wait", name).code == 0
    result = udskit("ls")
    mine = [row for row in rows(result.text) if row[-1] == name]
    assert mine
    assert mine[0][3] == str(server.pid)


def test_json(sockdir: Path, background: list[Background]) -> None:
    path = sockdir / "j.sock"
    server = serve(background, path, "--echo")
    entries = json.loads(udskit("ls", "--json", sockdir).out)
    assert len(entries) == 1
    entry = entries[0]
    assert entry["path"] == str(path)
    assert entry["bound_as"].startswith(f"{sockdir}/.udskit-")
    assert entry["bound_as"].endswith("/j.sock")
    assert (entry["type"], entry["state"], entry["pids"]) == ("stream", "listening", [server.pid])
    assert entry["processes"] == ["python"] or entry["processes"][0].startswith("python")
    assert isinstance(entry["inode"], int)


def test_stale_lists_only_dead_sockets(sockdir: Path, background: list[Background]) -> None:
    serve(background, sockdir / "live.sock", "--echo")
    nested = sockdir / "a" / "b"
    nested.mkdir(parents=True)
    for path in (sockdir / "dead.sock", nested / "dead-dgram.sock"):
        kind = socket.SOCK_DGRAM if "dgram" in path.name else socket.SOCK_STREAM
        sock = socket.socket(socket.AF_UNIX, kind)
        sock.bind(os.fspath(path))
        sock.close()
    (sockdir / "file.txt").write_text("not a socket")
    result = udskit("ls", "--stale", sockdir)
    assert result.code == 0, result.err
    assert result.text.splitlines()[0].split() == ["AGE", "UID", "MODIFIED", "PATH"]
    assert sorted(row[-1] for row in rows(result.text)) == sorted(
        [str(sockdir / "dead.sock"), str(nested / "dead-dgram.sock")]
    )
    assert all(row[1] == str(os.geteuid()) for row in rows(result.text))
    data = json.loads(udskit("ls", "--stale", "--json", sockdir).out)
    assert {d["path"] for d in data} == {
        str(sockdir / "dead.sock"),
        str(nested / "dead-dgram.sock"),
    }
    assert all(0 <= d["age"] < time.time() for d in data)


def test_stale_needs_a_directory() -> None:
    line = one_line_error(udskit("ls", "--stale"), 2)
    assert "--stale needs the directory to search" in line


@pytest.mark.parametrize("stale", [[], ["--stale"]])
@pytest.mark.parametrize("what", ["nope", "file"])
def test_ls_in_a_missing_directory(sockdir: Path, stale: list[str], what: str) -> None:
    # a mistyped DIR is an error, not an empty list
    (sockdir / "file").write_text("")
    line = one_line_error(udskit("ls", *stale, sockdir / what), 1)
    assert (
        line
        == {
            "nope": f"udskit ls: no such directory: {sockdir}/nope; check the path",
            "file": f"udskit ls: {sockdir}/file is not a directory; give the directory to list",
        }[what]
    )
