"""The tap in front of real servers: a udskit echo server, socat, and gunicorn behind
nginx, with the relayed bytes, the decoded output and a capture that tshark dissects."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from ..conftest import READY_TIMEOUT, wait_connectable
from ..e2e.conftest import gunicorn, nginx, site  # noqa: F401 (fixtures)
from ..e2e.servers import Gunicorn, Nginx, require_peer, worker_user
from ..e2e.wsgi_app import pattern
from .cli import TapProcess

pytestmark = pytest.mark.e2e


def _udskit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "udskit", *args],
        capture_output=True,
        text=True,
        timeout=READY_TIMEOUT,
        check=False,
    )


class _Peer:
    """A server process owned by the test, stopped by pid."""

    def __init__(self, args: list[str], path: Path) -> None:
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_connectable(path)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.communicate(timeout=READY_TIMEOUT)


def test_a_udskit_echo_server_length_frames_decoded(sockdir: Path) -> None:
    path = sockdir / "echo.sock"
    peer = _Peer(
        [sys.executable, "-m", "udskit", "serve", "--echo", "--framing", "length", str(path)],
        path,
    )
    try:
        running = TapProcess("--json", path)
        sent = _udskit("send", "--framing", "length", "--reply", str(path), "one", "two")
        code, out, _ = running.finish()
    finally:
        peer.stop()
    assert sent.stdout == "one\ntwo\n"
    assert code == 0
    messages = [r for r in map(json.loads, out.splitlines()) if r["event"] == "message"]
    assert [
        (m["direction"], m["framing"], m["text"]) for m in messages if m["direction"] == "up"
    ] == [
        ("up", "length", "one"),
        ("up", "length", "two"),
    ]
    assert [m["text"] for m in messages if m["direction"] == "down"] == ["one", "two"]
    assert {m["command"] for m in messages} <= {"python", "python3", "udskit"}


def test_socat_server_and_client_through_the_tap(sockdir: Path) -> None:
    require_peer("socat", shutil.which("socat") is not None)
    path = sockdir / "socat.sock"
    peer = _Peer(["socat", f"UNIX-LISTEN:{path},fork", "SYSTEM:tr a-z A-Z"], path)
    try:
        running = TapProcess("--framing", "lines", path)
        answer = subprocess.run(
            ["socat", "-", f"UNIX-CONNECT:{path}"],
            input=b"hello socat\n",
            capture_output=True,
            timeout=READY_TIMEOUT,
            check=False,
        )
        code, out, _ = running.finish()
    finally:
        peer.stop()
    assert answer.stdout == b"HELLO SOCAT\n"
    assert code == 0
    assert '] uid 0  12 B  line "hello socat\\n"' in out or "12 B  line" in out
    assert "socat[" in out
    assert '12 B  line "HELLO SOCAT\\n"' in out


def test_gunicorn_behind_nginx_http_decoded_and_captured(
    site: Path,  # noqa: F811
    gunicorn: Callable[..., Gunicorn],  # noqa: F811
    nginx: Callable[..., Nginx],  # noqa: F811
) -> None:
    """nginx's workers (another user, as root runs them) reach gunicorn through the tap;
    every response is whole, the tap shows the requests and responses, and tshark
    dissects the capture as HTTP."""
    require_peer("tshark", shutil.which("tshark") is not None)
    app = gunicorn(site / "gunicorn.sock", umask=0)
    user = worker_user() if os.geteuid() == 0 else None
    front = nginx(site / "nginx", f"unix:{app.sock}", user=user)
    capture = site / "http.pcap"
    running = TapProcess("--pcap", capture, "--pcap-port", "80", app.sock)
    try:
        assert front.get("/") == (200, b"hello from gunicorn\n")
        assert front.get("/bytes?n=300000") == (200, pattern(300_000))
    finally:
        code, out, err = running.finish()
    assert code == 0, err
    assert "  http GET / HTTP/1.0\n" in out
    assert "  http HTTP/1.0 200 OK\n" in out  # gunicorn answers in the request's version
    assert '20 B  http body "hello from gunicorn\\n"' in out
    assert "300000 B  http body" in out
    assert "nginx[" in out
    dissected = subprocess.run(
        [
            "tshark",
            "-r",
            str(capture),
            "-Y",
            "http",
            "-T",
            "fields",
            "-e",
            "http.request.uri",
            "-e",
            "http.response.code",
        ],
        capture_output=True,
        text=True,
        timeout=READY_TIMEOUT * 3,
        check=False,
    )
    assert dissected.returncode == 0, dissected.stderr
    fields = [line.split("\t") for line in dissected.stdout.splitlines()]
    assert ["/", ""] in fields
    assert ["/bytes?n=300000", ""] in fields
    assert fields.count(["", "200"]) == 2


def test_redis_shut_down_while_tapped_stops_the_tap_and_leaves_no_socket(sockdir: Path) -> None:
    """redis removes its socket file by name as it shuts down, which takes the relay's: no
    client reaches the tap any more, and no refused connect tells it the server is gone.
    The tap used to run on (until Ctrl-C, and then put the stale socket back at PATH)."""
    require_peer("redis-server", shutil.which("redis-server") is not None)
    path = sockdir / "redis.sock"
    redis = _Peer(
        [
            "redis-server",
            "--port",
            "0",
            "--unixsocket",
            str(path),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(sockdir),
        ],
        path,
    )
    try:
        running = TapProcess(path)
        redis.stop()  # SIGTERM: redis shuts down and unlinks PATH
        try:
            running.popen.wait(timeout=READY_TIMEOUT)
        except subprocess.TimeoutExpired:
            running.kill()
            raise AssertionError("the tap ran on after redis removed its socket") from None
        code, _, err = running.finish(signum=None)
    finally:
        if redis.process.poll() is None:
            redis.stop()
    assert code == 1
    assert f"{path} no longer leads to the tap: the server removed its socket file" in err
    assert "the server exited while tapped and removed its socket file" in err
    assert sorted(p.name for p in sockdir.iterdir() if p.is_socket()) == []
