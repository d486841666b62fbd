"""Real gunicorn and nginx for the end-to-end tests: configured in a temporary directory,
listening only on Unix sockets there and on 127.0.0.1, started and stopped by pid.

Every wait is bounded and polls a condition (connectable, exited, stale); none sleeps to
synchronise. A server that dies while we wait fails the test with its own log.
"""

from __future__ import annotations

import errno
import http.client
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..conftest import READY_TIMEOUT

#: The WSGI application gunicorn serves (tests/e2e/wsgi_app.py).
APP_DIR = Path(__file__).resolve().parent
APP = "wsgi_app:app"

#: Where Debian installs nginx, for a PATH without /usr/sbin (a non-root shell).
_NGINX_FALLBACK = "/usr/sbin/nginx"

#: Attempts at starting nginx on a free port: another process may take the port between our
#: probe and nginx's bind.
_PORT_ATTEMPTS = 5


def require_peer(name: str, found: bool) -> None:
    """Skip without the peer, or fail where UDSKIT_REQUIRE_PEERS says CI installed them."""
    if found:
        return
    message = f"{name} is not installed (scripts/test.sh installs it)"
    if os.environ.get("UDSKIT_REQUIRE_PEERS"):
        pytest.fail(f"{message}, and UDSKIT_REQUIRE_PEERS is set")
    pytest.skip(message)


def nginx_binary() -> str:
    found = shutil.which("nginx") or (
        _NGINX_FALLBACK if os.access(_NGINX_FALLBACK, os.X_OK) else None
    )
    require_peer("nginx", found is not None)
    assert found is not None
    return found


def require_gunicorn() -> None:
    require_peer("gunicorn", importlib.util.find_spec("gunicorn") is not None)


def worker_user() -> str:
    """The unprivileged user nginx's workers run as when the tests run as root."""
    for name in ("www-data", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    pytest.skip("neither www-data nor nobody exists to run nginx's workers as")


def _wait(condition: object, what: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    delay = 0.005
    while not condition():  # type: ignore[operator]
        if process.poll() is not None:
            raise AssertionError(
                f"{what}: pid {process.pid} exited with {process.returncode}:\n{_tail(log)}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not ready after {READY_TIMEOUT} s:\n{_tail(log)}")
        time.sleep(delay)  # back-off between readiness polls
        delay = min(delay * 2, 0.05)


def _tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-4000:]
    except OSError as exc:
        return f"(no log: {exc})"


def _connectable_unix(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        return probe.connect_ex(str(path)) == 0


def _connectable_tcp(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _stop(process: subprocess.Popen[bytes], signum: int) -> None:
    if process.poll() is None:
        os.kill(process.pid, signum)
        try:
            process.wait(READY_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(READY_TIMEOUT)


class Gunicorn:
    """gunicorn serving tests/e2e/wsgi_app.py on a Unix socket, one sync worker."""

    def __init__(self, sock: Path, *, umask: int | None = None) -> None:
        require_gunicorn()
        self.sock = sock
        self.log = sock.with_suffix(".log")
        command = [
            sys.executable, "-m", "gunicorn",
            "--bind", f"unix:{sock}",
            "--workers", "1",
            "--chdir", str(APP_DIR),
            "--error-logfile", str(self.log),
            "--log-level", "info",
        ]  # fmt: skip
        if umask is not None:
            # The socket file's mode: gunicorn binds with this umask in force (default 0).
            command += ["--umask", oct(umask)]
        command.append(APP)
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        self.pid = self.process.pid
        try:
            _wait(lambda: _connectable_unix(sock), f"gunicorn on {sock}", self.process, self.log)
        except BaseException:
            self.stop()
            raise

    def workers(self) -> list[int]:
        """Pids of the master's children (its workers), from /proc."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.pid:  # field 4 of stat(5), the parent pid
                found.append(int(entry))
        return found

    def crash(self) -> None:
        """SIGKILL the master, then its workers: no cleanup runs, the socket file stays."""
        workers = self.workers()
        os.kill(self.pid, signal.SIGKILL)  # the master first, so it cannot respawn a worker
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait(READY_TIMEOUT)
        # The workers' copies of the listening socket close when they die.
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            with socket.socket(socket.AF_UNIX) as probe:
                code = probe.connect_ex(str(self.sock))
            if code == errno.ECONNREFUSED:
                return
            assert time.monotonic() < deadline, f"{self.sock} still answers after the kill"
            time.sleep(0.01)

    def stop(self) -> None:
        _stop(self.process, signal.SIGTERM)


class Nginx:
    """nginx proxying every request to one upstream, as in seed 004:

    ``upstream app_server { server unix:/tmp/gunicorn.sock fail_timeout=0; }``.
    Listens on 127.0.0.1 only, on a free port; pid, logs and temp files in ``prefix``. Run
    as root, its workers run as ``user``.
    """

    def __init__(self, prefix: Path, upstream: str, *, user: str | None = None) -> None:
        self.binary = nginx_binary()
        self.prefix = prefix
        self.error_log = prefix / "error.log"
        self.upstream = upstream
        prefix.mkdir(exist_ok=True)
        for attempt in range(_PORT_ATTEMPTS):
            self.port = _free_port()
            conf = prefix / "nginx.conf"
            conf.write_text(self._conf(user))
            self.process = subprocess.Popen(
                [self.binary, "-p", str(prefix), "-c", str(conf), "-e", str(self.error_log)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
            )
            self.pid = self.process.pid
            try:
                _wait(lambda: _connectable_tcp(self.port), "nginx", self.process, self.error_log)
                return
            except AssertionError:
                self.stop()
                if "Address already in use" not in _tail(self.error_log):
                    raise
                if attempt == _PORT_ATTEMPTS - 1:
                    raise

    def _conf(self, user: str | None) -> str:
        prefix = self.prefix
        user_line = f"user {user};" if user is not None else ""
        temp = "\n".join(
            f"    {kind}_temp_path {prefix}/{kind}_temp;"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        return f"""
daemon off;
master_process on;
worker_processes 1;
{user_line}
pid {prefix}/nginx.pid;
error_log {self.error_log} info;
events {{
    worker_connections 64;
}}
http {{
    access_log {prefix}/access.log;
{temp}
    upstream app_server {{
        # fail_timeout=0 means we always retry an upstream even if it failed
        server {self.upstream} fail_timeout=0;
    }}
    server {{
        listen 127.0.0.1:{self.port};
        server_name localhost;
        location / {{
            proxy_set_header Host $http_host;
            proxy_redirect off;
            proxy_pass http://app_server;
        }}
    }}
}}
"""

    def get(self, path: str) -> tuple[int, bytes]:
        """GET ``path`` through nginx: (status, body)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=READY_TIMEOUT)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def errors(self) -> str:
        return _tail(self.error_log)

    def stop(self) -> None:
        _stop(self.process, signal.SIGTERM)  # fast shutdown; the workers go with the master


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
