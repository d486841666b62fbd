"""Running ``udskit`` subcommands as real processes: start, wait for readiness, stop by pid."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence

import udskit

from ..conftest import READY_TIMEOUT


def udskit_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "udskit", *args]


def run_udskit(
    *args: str, env: dict[str, str] | None = None, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run ``udskit ARGS`` to completion (bounded) and return what it printed."""
    return subprocess.run(
        udskit_command(*args),
        input=stdin,
        capture_output=True,
        env=env,
        timeout=READY_TIMEOUT * 2,
        check=False,
    )


class Process:
    """A long-running ``udskit`` process (bridge, serve) owned by a test."""

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.popen = subprocess.Popen(
            list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        self.pid = self.popen.pid

    def readline(self) -> str:
        """The next line of stdout; fail if none comes within READY_TIMEOUT."""
        assert self.popen.stdout is not None
        ready, _, _ = select.select([self.popen.stdout], [], [], READY_TIMEOUT)
        if not ready:
            raise AssertionError(f"no output from pid {self.pid}: {self.stderr_so_far()}")
        line = self.popen.stdout.readline().decode()
        if not line:
            code = self.popen.wait(READY_TIMEOUT)
            raise AssertionError(f"pid {self.pid} exited {code}: {self.stderr_so_far()}")
        return line

    def stderr_so_far(self) -> str:
        assert self.popen.stderr is not None
        if self.popen.poll() is None:
            os.set_blocking(self.popen.stderr.fileno(), False)
        try:
            return (self.popen.stderr.read() or b"").decode(errors="replace")
        finally:
            os.set_blocking(self.popen.stderr.fileno(), True)

    def stop(self, signum: int = signal.SIGTERM) -> tuple[int, str]:
        """Signal the process by pid, wait for it (bounded) and return (exit code, stderr)."""
        if self.popen.poll() is None:
            os.kill(self.pid, signum)
        try:
            _, err = self.popen.communicate(timeout=READY_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.communicate(timeout=READY_TIMEOUT)
            raise
        return self.popen.returncode, err.decode(errors="replace")

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.communicate(timeout=READY_TIMEOUT)


@contextlib.contextmanager
def bridge_process(
    *args: str, env: dict[str, str] | None = None
) -> Iterator[tuple[Process, udskit.Address]]:
    """``udskit bridge ARGS``, once it is accepting; yields it and its listening address."""
    process = Process(udskit_command("bridge", *args), env=env)
    try:
        line = process.readline()
        assert line.startswith("listening on "), line
        listening = line.removeprefix("listening on ").split(" -> ")[0]
        yield process, udskit.Address.parse(listening)
    finally:
        process.kill()
