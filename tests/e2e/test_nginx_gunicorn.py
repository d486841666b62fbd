"""Seed S9 with the real servers: nginx proxying HTTP to gunicorn over a Unix socket.

gunicorn serves tests/e2e/wsgi_app.py on a socket in a temporary directory; Debian's nginx
listens on 127.0.0.1 and proxies to it as in seed 004. The tests show that ``udskit http``
talks to gunicorn directly, that ``udskit bridge`` exposes the socket on TCP, that ``udskit
doctor --as`` predicts nginx's 502 for a 0600 socket and that its fix gives a 200, and that
a gunicorn killed with SIGKILL leaves a stale socket that ``ls --stale`` and ``doctor``
report and that a udskit-claimed restart reclaims.
"""

from __future__ import annotations

import asyncio
import base64
import grp
import hashlib
import json
import os
import pwd
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

import udskit
from udskit import http

from ..bridge.cli import bridge_process, run_udskit
from .as_user import connect_as
from .servers import Gunicorn, Nginx, require_peer, worker_user
from .wsgi_app import pattern

pytestmark = pytest.mark.e2e

StartGunicorn = Callable[..., Gunicorn]
StartNginx = Callable[..., Nginx]

#: Proxy variables pointing at a dead port: a client that honoured them would fail.
DEAD_PROXIES = dict.fromkeys(
    ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"),
    "http://127.0.0.1:9",
)


def _nginx_user() -> str | None:
    """Run as root, nginx's workers drop to an unprivileged user, as in production."""
    return worker_user() if os.geteuid() == 0 else None


def test_udskit_http_talks_to_gunicorn_directly(site: Path, gunicorn: StartGunicorn) -> None:
    app = gunicorn(site / "gunicorn.sock")
    env = {**os.environ, **DEAD_PROXIES}
    shown = run_udskit(
        "http", "-i", "-d", "hello", "-H", "X-Test: 1", str(app.sock), "/echo?x=2", env=env
    )
    assert shown.returncode == 0, shown.stderr
    head, _, body = shown.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nserver: gunicorn" in head.lower()
    echoed = json.loads(body)
    assert (echoed["method"], echoed["query"], echoed["body"]) == ("POST", "x=2", "hello")
    assert echoed["x_test"] == "1"
    assert echoed["user_agent"].startswith("udskit/")
    big = run_udskit("http", str(app.sock), "/bytes?n=3000001", env=env)
    assert big.returncode == 0
    assert big.stdout == pattern(3_000_001)
    binary = json.loads(run_udskit("http", "--json", str(app.sock), "/bytes?n=300").stdout)
    assert base64.b64decode(binary["body_base64"]) == pattern(300)
    head = run_udskit("http", "-i", "-X", "HEAD", str(app.sock), "/bytes?n=300")
    assert head.stdout.endswith(b"content-length: 300\r\n\r\n")  # a head, and no body
    missing = run_udskit("http", "-f", str(app.sock), "/nowhere", env=env)
    assert (missing.returncode, missing.stdout) == (1, b"no such page\n")


def test_httpx_client_and_probe_against_gunicorn(
    site: Path, gunicorn: StartGunicorn, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = gunicorn(site / "gunicorn.sock")
    for name, value in DEAD_PROXIES.items():
        monkeypatch.setenv(name, value)
    with http.client(app.sock) as client:
        posted = client.post("/echo", content=b'{"a": 1}', headers={"X-Test": "httpx"})
        fetched = client.get("/bytes", params={"n": "100000"})
    assert posted.status_code == 200
    assert posted.json()["body"] == '{"a": 1}'
    assert posted.json()["x_test"] == "httpx"
    assert fetched.content == pattern(100_000)

    async def fetch() -> list[int]:
        async with http.async_client(app.sock) as client:
            responses = await asyncio.gather(*(client.get("/") for _ in range(4)))
        return [r.status_code for r in responses]

    assert asyncio.run(fetch()) == [200] * 4
    found = http.probe(app.sock)
    assert found.speaks_http
    assert (found.status, found.server) == (200, "gunicorn")


def test_nginx_proxies_to_gunicorn_over_the_socket(
    site: Path, gunicorn: StartGunicorn, nginx: StartNginx
) -> None:
    app = gunicorn(site / "gunicorn.sock", umask=0)  # gunicorn's default: srwxrwxrwx
    front = nginx(site / "nginx", f"unix:{app.sock}", user=_nginx_user())
    assert front.get("/") == (200, b"hello from gunicorn\n")
    status, body = front.get("/echo?via=nginx")
    assert status == 200
    assert json.loads(body)["query"] == "via=nginx"
    assert json.loads(body)["host"] == f"127.0.0.1:{front.port}"
    assert front.get("/bytes?n=2000000") == (200, pattern(2_000_000))
    # udskit http speaks to nginx's TCP side too.
    through = run_udskit("http", f"tcp:127.0.0.1:{front.port}", "/")
    assert through.stdout == b"hello from gunicorn\n"
    assert http.probe(f"tcp:127.0.0.1:{front.port}").server.startswith("nginx")  # type: ignore[union-attr]


def test_bridge_exposes_gunicorn_on_tcp_for_nginx(
    site: Path, gunicorn: StartGunicorn, nginx: StartNginx
) -> None:
    app = gunicorn(site / "gunicorn.sock")
    with bridge_process("tcp:127.0.0.1:0", str(app.sock)) as (bridge, where):
        front = nginx(site / "nginx", f"127.0.0.1:{where.port}", user=_nginx_user())
        assert front.get("/") == (200, b"hello from gunicorn\n")
        assert front.get("/bytes?n=5000000") == (200, pattern(5_000_000))
        direct = run_udskit("http", str(where), "/bytes?n=20000000")
        assert (
            hashlib.sha256(direct.stdout).digest() == hashlib.sha256(pattern(20_000_000)).digest()
        )
        code, err = bridge.stop()
    assert code == 0, err
    assert "Traceback" not in err


def test_doctor_predicts_the_502_and_its_fix(
    as_root: None, site: Path, gunicorn: StartGunicorn, nginx: StartNginx
) -> None:
    user = worker_user()
    group = grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name
    app = gunicorn(site / "gunicorn.sock", umask=0o177)  # srw------- root:root
    assert app.sock.stat().st_mode & 0o777 == 0o600
    front = nginx(site / "nginx", f"unix:{app.sock}", user=user)

    # Prediction: www-data cannot connect, because of the socket's mode; here is the fix.
    before = run_udskit("doctor", str(app.sock), "--as", user)
    report = before.stdout.decode()
    assert before.returncode == 1, report
    assert f"[problem] permission: {user} lacks write (w) permission on socket {app.sock}" in report
    fixes = [line.strip().removeprefix("fix: ") for line in report.splitlines() if "fix: " in line]
    assert fixes[0] == f"chgrp {group} {app.sock} && chmod 660 {app.sock}", report
    assert connect_as(user, app.sock) == "permission denied"
    # Reality: nginx's worker gets EACCES and answers 502.
    status, _ = front.get("/")
    assert status == 502
    assert f"connect() to unix:{app.sock} failed (13: Permission denied)" in front.errors()

    # The fix the doctor printed, applied as printed.
    subprocess.run(fixes[0], shell=True, check=True, timeout=30)
    after = run_udskit("doctor", str(app.sock), "--as", user)
    assert after.returncode == 0, after.stdout.decode()
    assert f"=> {user} can connect to {app.sock}" in after.stdout.decode()
    assert connect_as(user, app.sock) == "connected"
    assert front.get("/") == (200, b"hello from gunicorn\n")


def test_crashed_gunicorn_leaves_a_stale_socket_that_udskit_reclaims(
    site: Path, gunicorn: StartGunicorn, nginx: StartNginx
) -> None:
    sock = site / "gunicorn.sock"
    app = gunicorn(sock, umask=0)
    front = nginx(site / "nginx", f"unix:{sock}", user=_nginx_user())
    assert front.get("/")[0] == 200

    app.crash()  # SIGKILL: gunicorn cannot remove its socket file
    assert sock.is_socket()
    assert front.get("/")[0] == 502
    assert f"connect() to unix:{sock} failed (111: Connection refused)" in front.errors()
    listed = run_udskit("ls", "--stale", str(site))
    assert str(sock) in listed.stdout.decode(), listed.stdout.decode()
    diagnosis = run_udskit("doctor", str(sock))
    assert diagnosis.returncode == 1
    assert "a stale socket file, left by a server that exited" in diagnosis.stdout.decode()
    with socket.socket(socket.AF_UNIX) as probe, pytest.raises(ConnectionRefusedError):
        probe.connect(str(sock))

    # A restart through udskit reclaims the stale path: here a bridge on it, in front of a
    # new gunicorn on another socket. nginx's configuration does not change.
    fresh = gunicorn(site / "gunicorn2.sock")
    group = (
        ["--group", grp.getgrgid(pwd.getpwnam(worker_user()).pw_gid).gr_name]
        if os.geteuid() == 0
        else []
    )
    with bridge_process("--mode", "660", *group, str(sock), str(fresh.sock)) as (bridge, where):
        assert where == udskit.Address.parse(str(sock))
        assert front.get("/") == (200, b"hello from gunicorn\n")
        assert str(sock) not in run_udskit("ls", "--stale", str(site)).stdout.decode()
        code, err = bridge.stop()
    assert code == 0, err
    assert not sock.exists()  # released on a clean stop: nothing stale left behind


def test_a_missing_peer_fails_where_peers_are_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UDSKIT_REQUIRE_PEERS", "1")
    with pytest.raises(pytest.fail.Exception, match="UDSKIT_REQUIRE_PEERS is set"):
        require_peer("nginx", found=False)
    monkeypatch.delenv("UDSKIT_REQUIRE_PEERS")
    with pytest.raises(pytest.skip.Exception, match="not installed"):
        require_peer("nginx", found=False)
