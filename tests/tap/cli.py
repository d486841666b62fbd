"""``udskit tap`` as a real process: started, waited for (it says 'tapping' on stderr),
signalled and collected by pid."""

from __future__ import annotations

import os
import select
import signal as signals
import subprocess
import sys
from pathlib import Path

from ..conftest import READY_TIMEOUT


class TapProcess:
    """``udskit tap ARGS`` running; ``finish()`` returns (exit code, stdout, stderr)."""

    def __init__(self, *args: str | Path, stdout: int = subprocess.PIPE) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "udskit", "tap", *map(str, args)],
            stdout=stdout,
            stderr=subprocess.PIPE,
        )
        self.pid = self.popen.pid
        self._stderr = b""
        self._wait_started()

    def _wait_started(self) -> None:
        self.wait_stderr("Ctrl-C to stop")

    def wait_stderr(self, text: str) -> None:
        """Return once ``text`` has appeared on the tap's stderr (bounded)."""
        assert self.popen.stderr is not None
        fd = self.popen.stderr.fileno()
        while text.encode() not in self._stderr:
            ready, _, _ = select.select([fd], [], [], READY_TIMEOUT)
            chunk = os.read(fd, 65536) if ready else b""
            if not chunk:
                self.popen.kill()
                self.popen.wait(READY_TIMEOUT)
                raise AssertionError(f"udskit tap did not start: {self._stderr.decode()}")
            self._stderr += chunk

    def signal(self, signum: int = signals.SIGINT) -> None:
        self.popen.send_signal(signum)

    def finish(self, signum: int | None = signals.SIGINT) -> tuple[int, str, str]:
        if signum is not None and self.popen.poll() is None:
            self.popen.send_signal(signum)
        out, err = self.popen.communicate(timeout=READY_TIMEOUT)
        return self.popen.returncode, (out or b"").decode(), (self._stderr + err).decode()

    def kill(self) -> None:
        self.popen.kill()
        self.popen.communicate(timeout=READY_TIMEOUT)


def run_tap(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """``udskit tap ARGS`` run to completion (bad input, --restore)."""
    return subprocess.run(
        [sys.executable, "-m", "udskit", "tap", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=READY_TIMEOUT,
        check=False,
    )
