"""``udskit doctor --http`` says whether the server at a socket speaks HTTP (S9)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ..bridge.cli import run_udskit
from .test_nginx_gunicorn import StartGunicorn

pytestmark = pytest.mark.e2e


def test_doctor_says_gunicorn_speaks_http(site: Path, gunicorn: StartGunicorn) -> None:
    app = gunicorn(site / "gunicorn.sock")
    shown = run_udskit("doctor", "--http", str(app.sock))
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.decode().splitlines()
    http_line = next(line for line in lines if "http:" in line)
    assert http_line.startswith("[ok]")
    assert "speaks HTTP/1.1" in http_line
    assert "gunicorn" in http_line
    as_json = json.loads(run_udskit("doctor", "--http", "--json", str(app.sock)).stdout)
    assert [f["check"] for f in as_json["findings"]][-1] == "http"


def test_doctor_says_a_non_http_server_does_not_speak_it(site: Path) -> None:
    path = site / "echo.sock"
    server = subprocess.Popen(
        [sys.executable, "-m", "udskit", "serve", "--echo", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert run_udskit("wait", str(path), "--timeout", "20").returncode == 0
        shown = run_udskit("doctor", "--http", str(path))
        assert shown.returncode == 0, shown.stderr  # reachable: HTTP or not, that is no problem
        text = shown.stdout.decode()
        assert "[info]    http: the server gave no HTTP answer to 'HEAD /'" in text
        for skipping in ([], ["--no-http"]):  # HTTP only when asked
            skipped = run_udskit("doctor", *skipping, str(path)).stdout.decode()
            assert "http:" not in skipped
    finally:
        server.terminate()
        assert server.wait(timeout=20) == 0
        assert server.stderr is not None
        server.stderr.close()
