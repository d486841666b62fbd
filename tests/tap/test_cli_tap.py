"""``udskit tap`` on the command line: decoded lines, JSON, hex dumps, cut payloads,
--count and --duration, signals, a SIGKILLed tap and its restore, and bad input."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import udskit

from ..conftest import READY_TIMEOUT
from .cli import TapProcess, run_tap
from .servers import recv_exactly, server


def _talk(path: Path, data: bytes, kind: int = socket.SOCK_STREAM) -> bytes:
    with socket.socket(socket.AF_UNIX, kind) as client:
        client.settimeout(READY_TIMEOUT)
        client.connect(str(path))
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)
        return recv_exactly(client, len(data))


def test_lines_are_shown_with_their_client_and_the_tap_stops_after_count(sockdir: Path) -> None:
    path = sockdir / "echo.sock"
    with server(path) as srv:
        running = TapProcess("--framing", "lines", "--count", "4", path)
        assert _talk(path, b"hello\nworld\n") == b"hello\nworld\n"
        code, out, err = running.finish(signum=None)  # --count ends it
        assert os.lstat(path).st_ino == srv.inode
    assert code == 0
    me = rf"python3?\[{os.getpid()}\] uid {os.geteuid()}"
    lines = out.splitlines()
    assert re.fullmatch(rf"\d+\.\d{{6}} #1 open {me}", lines[0]), lines
    # each direction in order (the two directions interleave as the threads run)
    up = [line for line in lines if " #1 > " in line]
    down = [line for line in lines if " #1 < " in line]
    assert re.fullmatch(rf'\d+\.\d{{6}} #1 > {me}  6 B  line "hello\\n"', up[0]), lines
    assert re.fullmatch(rf'\d+\.\d{{6}} #1 > {me}  6 B  line "world\\n"', up[1]), lines
    assert re.fullmatch(rf'\d+\.\d{{6}} #1 < {me}  6 B  line "hello\\n"', down[0]), lines
    # --count 4 stops the display after four messages, whatever the order
    assert sum(" B  line " in line for line in lines) == 4
    assert "connections opened before now are not seen" in err
    assert "the server's socket is back in place" in err


def test_a_stdout_nobody_reads_stops_the_tap_as_sigpipe_stops_cat(sockdir: Path) -> None:
    # It went on relaying and showing nothing, until Ctrl-C.
    path = sockdir / "echo.sock"
    read_end, write_end = os.pipe()
    os.close(read_end)  # as `udskit tap PATH | head -1` once head has gone
    with server(path) as srv:
        try:
            running = TapProcess("--framing", "lines", path, stdout=write_end)
        finally:
            os.close(write_end)
        assert _talk(path, b"hello\n") == b"hello\n"
        code, _, err = running.finish(signum=None)  # the first line it shows ends it
        assert os.lstat(path).st_ino == srv.inode
    assert code == -signal.SIGPIPE
    assert "the server's socket is back in place" in err


def test_json_gives_one_object_per_line(sockdir: Path) -> None:
    path = sockdir / "echo.sock"
    with server(path):
        running = TapProcess("--json", path)
        _talk(path, b"\x00\x00\x00\x03abc")
        code, out, _ = running.finish()
    assert code == 0
    records = [json.loads(line) for line in out.splitlines()]
    messages = [r for r in records if r["event"] == "message"]
    assert [(m["direction"], m["framing"], m["size"], m["text"]) for m in messages] == [
        ("up", "length", 3, "abc"),
        ("down", "length", 3, "abc"),
    ]
    assert messages[0]["pid"] == os.getpid()
    assert messages[0]["uid"] == os.geteuid()
    assert messages[0]["conn"] == 1
    assert {r["event"] for r in records} == {"open", "message", "end", "closed"}


def test_hex_dump_and_max_bytes_cut_the_display_not_the_relay(sockdir: Path) -> None:
    path = sockdir / "echo.sock"
    payload = bytes(range(200))
    with server(path):
        running = TapProcess("-x", "--max-bytes", "20", "--framing", "raw", path)
        assert _talk(path, payload) == payload  # everything relayed
        code, out, _ = running.finish()
    assert code == 0
    assert "200 B  raw 00 01 02 03" in out
    assert "...(+180 B)" in out
    assert "  00000000  00 01 02 03 04 05 06 07  08 09 0a 0b 0c 0d 0e 0f  |................|" in out
    assert "  00000010  10 11 12 13" in out
    assert "  00000020" not in out  # the dump is cut at --max-bytes too


def test_duration_ends_the_tap(sockdir: Path) -> None:
    path = sockdir / "echo.sock"
    with server(path) as srv:
        running = TapProcess("--duration", "0.2", path)
        code, _, err = running.finish(signum=None)
        assert os.lstat(path).st_ino == srv.inode
    assert code == 0
    assert "back in place" in err


def test_sigterm_restores_and_lets_a_relayed_connection_finish(sockdir: Path) -> None:
    path = sockdir / "echo.sock"
    with server(path) as srv:
        running = TapProcess(path)
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(READY_TIMEOUT)
            client.connect(str(path))
            client.sendall(b"before\n")
            assert recv_exactly(client, 7) == b"before\n"
            running.signal(signal.SIGTERM)
            running.wait_stderr("waiting for 1 relayed connections to end")
            # The server's socket is back: a new client reaches it directly ...
            assert os.lstat(path).st_ino == srv.inode
            assert _talk(path, b"direct\n") == b"direct\n"
            # ... while the relayed connection still works until it ends.
            client.sendall(b"after\n")
            assert recv_exactly(client, 6) == b"after\n"
        code, out, _ = running.finish(signum=None)
        assert os.lstat(path).st_ino == srv.inode
    assert code == 0
    assert '"after\\n"' in out
    assert "direct" not in out


def test_a_relayed_connection_that_does_not_end_is_cut_after_the_drain_timeout(
    sockdir: Path,
) -> None:
    # A connection that never ends (a subscriber, a pooled database connection) kept the
    # stopped tap waiting for ever: under a service manager, until it killed the tap.
    path = sockdir / "echo.sock"
    with server(path) as srv:
        running = TapProcess("--drain-timeout", "0.5", path)
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(READY_TIMEOUT)
            client.connect(str(path))
            client.sendall(b"stay\n")
            assert recv_exactly(client, 5) == b"stay\n"
            running.signal(signal.SIGTERM)
            code, _, err = running.finish(signum=None)
            assert client.recv(1) == b""  # cut: our end of stream
        assert os.lstat(path).st_ino == srv.inode
    assert code == 0
    assert "waiting for 1 relayed connections to end, at most 0.5 s" in err
    assert "cutting 1 relayed connections still open after 0.5 s" in err


def test_listing_a_tapped_socket_says_so_without_connecting_to_the_tap(sockdir: Path) -> None:
    """udskit ls, of the host or of a directory, reads the kernel's socket table: whether
    the tap still runs comes from there, not from a connection the tap would relay."""
    path = sockdir / "app.sock"
    with server(path):
        running = TapProcess(path)
        for listed in (_udskit("ls"), _udskit("ls", str(sockdir))):
            assert listed.returncode == 0, listed.stderr
            assert f"(tapped: its server's socket is at {sockdir}/.app.sock.udskit-tapped)" in (
                listed.stdout
            )
        code, out, _ = running.finish()
    assert code == 0
    assert " open " not in out, out  # nobody connected through the tap


def test_a_killed_tap_is_explained_refused_by_claims_and_restored(sockdir: Path) -> None:
    path = sockdir / "app.sock"
    with server(path) as srv:
        running = TapProcess(path)
        running.kill()  # SIGKILL: nothing restored
        aside = sockdir / ".app.sock.udskit-tapped"
        assert os.lstat(aside).st_ino == srv.inode
        with socket.socket(socket.AF_UNIX) as probe, pytest.raises(ConnectionRefusedError):
            probe.connect(str(path))  # the dead relay's socket
        doctor = _udskit("doctor", str(path))
        assert "a tap that was killed left the server's socket aside at" in doctor.stdout
        assert "(its server is still running)" in doctor.stdout
        assert f"udskit tap --restore {path}" in doctor.stdout
        listing = _udskit("ls", str(sockdir))
        assert f"(displaced by a killed tap: udskit tap --restore {path})" in listing.stdout
        with pytest.raises(udskit.AddressInUse, match=r"udskit tap --restore"):
            udskit.listen(path)
        served = _udskit("serve", "--echo", str(path))
        assert served.returncode == 1
        assert served.stderr.count("\n") == 1
        assert "moved aside to .app.sock.udskit-tapped by udskit tap" in served.stderr
        restored = run_tap("--restore", path)
        assert restored.returncode == 0
        assert restored.stdout == f"restored {path}: its server answers there again\n"
        assert os.lstat(path).st_ino == srv.inode
        assert not aside.exists()
        assert _talk(path, b"back\n") == b"back\n"
        again = run_tap("--restore", path)
    assert again.returncode == 1
    assert again.stderr == (
        f"udskit tap: nothing to restore at {path}: no tapped socket "
        "(.app.sock.udskit-tapped) next to it\n"
    )


def test_restore_refuses_while_the_tap_runs(sockdir: Path) -> None:
    path = sockdir / "app.sock"
    with server(path):
        running = TapProcess(path)
        try:
            refused = run_tap("--restore", path)
        finally:
            running.finish()
    assert refused.returncode == 1
    assert re.fullmatch(
        rf"udskit tap: cannot restore {re.escape(str(path))}: a live socket is there "
        r"\(pid \d+\): the tap still runs; stop it \(Ctrl-C, or kill -TERM its pid\) and it "
        r"restores the server's socket itself\n",
        refused.stderr,
    )


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--max-bytes", "-1"], 2, "udskit tap: --max-bytes must be 0 or more, not -1\n"),
        (["--count", "0"], 2, "argument --count: '0' must be at least 1"),
        (["--framing", "xml"], 2, "argument --framing: invalid choice: 'xml'"),
        (["--pcap-port", "0"], 2, "argument --pcap-port: '0' must be at least 1"),
        (["--type", "tcp"], 2, "argument --type: invalid choice: 'tcp'"),
    ],
)
def test_bad_options_are_one_line(sockdir: Path, args: list[str], code: int, message: str) -> None:
    result = run_tap(*args, sockdir / "none.sock")
    assert result.returncode == code
    assert message in result.stderr
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


def test_a_missing_path_is_one_line(sockdir: Path) -> None:
    result = run_tap(sockdir / "none.sock")
    assert result.returncode == 1
    assert result.stderr == (
        f"udskit tap: cannot tap {sockdir / 'none.sock'}: no such file; start its server "
        f"first (udskit wait {sockdir / 'none.sock'} waits for it)\n"
    )


def _udskit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "udskit", *args],
        capture_output=True,
        text=True,
        timeout=READY_TIMEOUT,
        check=False,
    )


def test_pcap_without_dpkt_says_what_to_install(sockdir: Path) -> None:
    args = ["tap", "--pcap", str(sockdir / "x.pcap"), str(sockdir / "a.sock")]
    code = (
        "import sys; sys.modules['dpkt'] = None; from udskit.cli import main; "
        f"sys.exit(main({args!r}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=READY_TIMEOUT,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr == (
        "udskit tap: error: --pcap needs dpkt, which the tap extra brings: pip install "
        "'udskit[tap]'\n"
    )
    assert not (sockdir / "x.pcap").exists()
