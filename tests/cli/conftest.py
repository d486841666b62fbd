"""Helpers for driving the ``udskit`` command as a user does: child processes, real sockets,
real peer programs (nc, socat)."""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import READY_TIMEOUT

UDSKIT = (sys.executable, "-m", "udskit")

#: sun_path's 108 bytes, less the terminating NUL.
MAX_DIRECT_PATH = 107

#: Bound on any one command of a test: generous for a loaded CI machine; the commands
#: themselves take milliseconds.
COMMAND_TIMEOUT = 20.0


@dataclass
class Result:
    code: int
    out: bytes
    err: str

    @property
    def text(self) -> str:
        return self.out.decode(errors="replace")


def udskit(
    *args: str | os.PathLike[str],
    stdin: bytes = b"",
    cwd: str | os.PathLike[str] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = COMMAND_TIMEOUT,
) -> Result:
    """Run one udskit command to its end. Never a traceback, whatever happened."""
    done = subprocess.run(
        [*UDSKIT, *map(os.fspath, args)],
        input=stdin,
        capture_output=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
        check=False,
    )
    err = done.stderr.decode(errors="replace")
    assert "Traceback" not in err, err
    return Result(done.returncode, done.stdout, err)


def one_line_error(result: Result, code: int) -> str:
    """Assert an expected failure: exit ``code``, one line on stderr, nothing on stdout."""
    assert result.code == code, (result.code, result.err)
    lines = result.err.splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("udskit"), result.err
    return lines[0]


def bound_names() -> list[tuple[str, str]]:
    """(path, state) of every named Unix socket, from /proc/net/unix, read directly."""
    names = []
    with open("/proc/net/unix", "rb") as f:
        for line in f.read().splitlines()[1:]:
            fields = line.split(None, 7)
            if len(fields) == 8:
                listening = int(fields[3], 16) & 0x10000
                names.append((os.fsdecode(fields[7]), "listening" if listening else "other"))
    return names


def wait_listening(
    path: Path, process: subprocess.Popen[bytes] | None = None, *, dgram: bool = False
) -> None:
    """Wait until a socket listens (or, with ``dgram``, a socket is bound) at ``path``,
    without connecting to it (a server would count that as a client: --once, -v)."""
    if len(os.fsencode(path)) > MAX_DIRECT_PATH:
        _wait_long(path, process)
        return
    deadline = time.monotonic() + READY_TIMEOUT
    delay = 0.001
    while True:
        if path.exists():
            for name, state in bound_names():
                # udskit binds in DIR/.udskit-XXXXXXXX/NAME and links to DIR/NAME
                same = name == str(path) or (
                    os.path.dirname(os.path.dirname(name)) == str(path.parent)
                    and os.path.basename(os.path.dirname(name)).startswith(".udskit-")
                    and os.path.basename(name) == path.name
                )
                if same and (dgram or state == "listening"):
                    return
        if process is not None and process.poll() is not None:
            _, err = process.communicate()
            raise AssertionError(f"the server exited with {process.returncode}: {err!r}")
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing listens at {path} after {READY_TIMEOUT} s")
        time.sleep(delay)  # back-off between readiness checks, not synchronisation
        delay = min(delay * 2, 0.05)


def _wait_long(path: Path, process: subprocess.Popen[bytes] | None) -> None:
    """A path over sun_path's limit is bound as /proc/self/fd/N/NAME, a name /proc/net/unix
    cannot tie to it: connect through the directory instead, as udskit does."""
    deadline = time.monotonic() + READY_TIMEOUT
    delay = 0.001
    while True:
        if path.exists():
            directory = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
            try:
                with socket.socket(socket.AF_UNIX) as probe:
                    if probe.connect_ex(f"/proc/self/fd/{directory}/{path.name}") == 0:
                        return
            finally:
                os.close(directory)
        if process is not None and process.poll() is not None:
            _, err = process.communicate()
            raise AssertionError(f"the server exited with {process.returncode}: {err!r}")
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing listens at {path} after {READY_TIMEOUT} s")
        time.sleep(delay)  # back-off between readiness checks, not synchronisation
        delay = min(delay * 2, 0.05)


class Background:
    """A command running in the background (a server, a peer), stopped by its pid."""

    def __init__(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        cwd: str | os.PathLike[str] | None = None,
        stdin: int = subprocess.PIPE,
        user: int | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.argv = [os.fspath(a) for a in argv]
        self.process = subprocess.Popen(
            self.argv,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=env,
            # another user for real: its uid, its primary group, no supplementary groups
            user=user,
            group=user,
            extra_groups=None if user is None else [],
        )
        self.out = b""
        self.err = ""

    @property
    def pid(self) -> int:
        return self.process.pid

    def write(self, data: bytes) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(data)
        self.process.stdin.flush()

    def close_stdin(self) -> None:
        if self.process.stdin is not None and not self.process.stdin.closed:
            self.process.stdin.close()

    def read_until(self, wanted: bytes, *, stream: str = "stdout") -> bytes:
        """Read the process's stdout (or stderr) until ``wanted`` has appeared; bounded."""
        pipe = self.process.stdout if stream == "stdout" else self.process.stderr
        assert pipe is not None
        fd = pipe.fileno()
        got = b""
        deadline = time.monotonic() + COMMAND_TIMEOUT
        while wanted not in got:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(0.0, remaining))
            if not ready:
                raise AssertionError(f"{self.argv}: no {wanted!r} in {stream}, got {got!r}")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError(f"{self.argv}: {stream} ended before {wanted!r}: {got!r}")
            got += chunk
        return got

    def wait(self, timeout: float = COMMAND_TIMEOUT) -> int:
        """Wait for the process to end by itself; keep its output."""
        self.close_stdin()
        self.process.stdin = None
        try:
            out, err = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self.out += out or b""
        self.err += (err or b"").decode(errors="replace")
        assert "Traceback" not in self.err, self.err
        return self.process.returncode

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` (as Ctrl-C or a service manager would) and wait for the exit."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.wait()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        try:
            self.process.communicate(timeout=COMMAND_TIMEOUT)
        except subprocess.TimeoutExpired:
            # A command it ran outlives it (SIGKILL ends no children) and holds the pipes.
            for pipe in (self.process.stdout, self.process.stderr):
                if pipe is not None:
                    pipe.close()
            self.process.wait()


@pytest.fixture
def background() -> Iterator[list[Background]]:
    """Every Background started through this list is killed (by pid) at the end."""
    started: list[Background] = []
    yield started
    for item in started:
        item.kill()


def serve(started: list[Background], path: Path, *args: str, cwd: Path | None = None) -> Background:
    """Start ``udskit serve ... path`` and wait until it listens."""
    server = Background([*UDSKIT, "serve", *args, os.fspath(path)], cwd=cwd)
    started.append(server)
    wait_listening(path, server.process, dgram="dgram" in args)
    return server


def require(program: str) -> str:
    """The path of a peer program. Missing: a failure where peers are required (CI sets
    UDSKIT_REQUIRE_PEERS), else a skip."""
    found = shutil.which(program)
    if found is None:
        message = f"{program} is not installed (Debian: socat, netcat-openbsd)"
        if os.environ.get("UDSKIT_REQUIRE_PEERS"):
            pytest.fail(message)
        pytest.skip(message)
    return found
