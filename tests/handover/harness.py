"""Server processes and clients for the handover tests: start a child, read what it says,
connect to it in a tight loop, count what failed. Every wait is bounded."""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import udskit
from udskit.handover import CONTROL_SUFFIX

from ..conftest import READY_TIMEOUT

SCRIPT = Path(__file__).with_name("server_child.py")

#: The four servers that take ``handover=True``.
FLAVOURS = ("server", "messageserver", "aioserver", "aiomessageserver")
TYPES = ("stream", "seqpacket", "dgram")

#: A client's bound on each connect, send and receive: far above any real wait.
PATIENCE = 10.0


def control_path(path: Path) -> Path:
    return path.with_name("." + path.name + CONTROL_SUFFIX.decode())


class Child:
    """A server_child.py process; ``expect()`` reads its stdout up to a line."""

    def __init__(self, flavour: str, path: Path, kind: str, *extra: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(SCRIPT), flavour, str(path), kind, *extra],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.pid = self.process.pid
        self.lines: list[str] = []
        self._buffer = b""
        self._eof = False

    def _next_line(self, deadline: float) -> str | None:
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            if self._eof:
                return None
            left = deadline - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(0.0, left))
            if not ready:
                raise AssertionError(
                    f"pid {self.pid} said nothing more within {READY_TIMEOUT} s: {self.lines}"
                )
            chunk = os.read(fd, 65536)
            if not chunk:
                self._eof = True
                if not self._buffer:
                    return None
                self._buffer += b"\n"
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        text = line.decode("utf-8", "replace")
        self.lines.append(text)
        return text

    def expect(self, text: str, timeout: float = READY_TIMEOUT) -> str:
        """The first line from now on that says ``text``: a report that starts with it, or
        a log line that contains it (not a report's word: ``nothing was listening`` is no
        ``listening``)."""
        deadline = time.monotonic() + timeout
        while True:
            line = self._next_line(deadline)
            if line is None:
                raise AssertionError(f"pid {self.pid} ended without saying {text!r}: {self.lines}")
            if _says(line, text):
                return line

    def expect_one(self, *texts: str, timeout: float = READY_TIMEOUT) -> str:
        """The first line from now on that contains one of ``texts``."""
        deadline = time.monotonic() + timeout
        while True:
            line = self._next_line(deadline)
            if line is None:
                raise AssertionError(f"pid {self.pid} ended without saying {texts}: {self.lines}")
            if any(_says(line, text) for text in texts):
                return line

    def said(self, text: str) -> bool:
        return any(_says(line, text) for line in self.lines)

    def tell(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command.encode() + b"\n")
        self.process.stdin.flush()

    def finish(self, timeout: float = READY_TIMEOUT) -> int:
        """Read everything it says until it exits; its exit code. (Its last line is the
        one on leaks: a successor it started may hold its stdout open for longer.)"""
        deadline = time.monotonic() + timeout
        while True:
            line = self._next_line(deadline)
            if line is None or line.startswith("leaked "):
                break
        code = self.process.wait(max(0.0, deadline - time.monotonic()))
        self._close_pipes()
        return code

    def leaked(self) -> str:
        return next((line for line in self.lines if line.startswith("leaked ")), "")

    def terminate(self) -> int:
        """SIGTERM, then everything until it exits."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.finish()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(READY_TIMEOUT)
        self._close_pipes()

    def _close_pipes(self) -> None:
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()


#: What server_child.py reports on its own lines (the rest of its output is its log).
_REPORT = re.compile(r"(listening|ready|error|returned|leaked|handed over to \d)")


def _says(line: str, text: str) -> bool:
    if line.startswith("log: "):
        return text in line and not _REPORT.match(text)
    return line.startswith(text)


def wait_for(path: Path, timeout: float = READY_TIMEOUT) -> None:
    """Return once ``path`` exists (a bounded poll: nothing else says a file appeared)."""
    deadline = time.monotonic() + timeout
    while not os.path.lexists(path):
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.002)


def start_serving(flavour: str, path: Path, kind: str, *extra: str) -> Child:
    """A child serving ``path`` with handover offered (its control socket is there)."""
    child = Child(flavour, path, kind, *extra)
    try:
        child.expect("listening")
        wait_for(control_path(path))
    except BaseException:
        child.kill()
        raise
    return child


def ask(path: Path, kind: str, message: bytes) -> bytes:
    """One request and its reply, on a new connection."""
    with udskit.connect(path, type=kind, timeout=PATIENCE) as client:
        client.send(message)
        return client.recv()


@dataclass
class Load:
    """A thread connecting (and asking) in a tight loop until stopped: what it saw."""

    path: Path
    kind: str
    limit: int = 20_000
    served_by: list[int] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _progress: threading.Condition = field(default_factory=threading.Condition)

    def run(self) -> None:
        for n in range(self.limit):
            if self._stop.is_set():
                return
            try:
                reply = ask(self.path, self.kind, b"%d" % n)
            except (OSError, udskit.UdsError) as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
                continue
            pid, _, echoed = reply.partition(b":")
            if echoed != b"%d" % n:
                self.failures.append(f"reply {reply!r} to {n}")
            with self._progress:
                self.served_by.append(int(pid))
                self._progress.notify_all()
        with self._progress:
            self._progress.notify_all()

    def wait_served_by(self, pid: int, timeout: float = READY_TIMEOUT) -> None:
        """Return once a request has been served by ``pid``."""
        with self._progress:
            if not self._progress.wait_for(lambda: pid in self.served_by[-50:], timeout):
                raise AssertionError(
                    f"no request served by {pid} within {timeout} s: {self.failures[-3:]}"
                )


@contextlib.contextmanager
def load(path: Path, kind: str) -> Iterator[Load]:
    """A Load running in a thread for the duration of the block."""
    running = Load(path, kind)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    try:
        yield running
    finally:
        running._stop.set()
        thread.join(READY_TIMEOUT)
        assert not thread.is_alive(), "the client thread is stuck"


def proc_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def raw_control(path: Path) -> socket.socket:
    """A seqpacket connection to the control socket of the server at ``path``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    # Blocking: with a timeout, a connect that finds the backlog full fails (EAGAIN) at
    # once rather than waiting for room.
    sock.connect(str(control_path(path)))
    sock.settimeout(PATIENCE)
    return sock


def start_upgrader(path: Path, kind: str = "stream", *extra: str) -> Child:
    """A bare-Upgrader child (server_child.py ``upgrader``) that has said ready."""
    child = Child("upgrader", path, kind, *extra)
    try:
        child.expect("listening")
        child.tell("ready")
        child.expect("ready")
        wait_for(control_path(path))
    except BaseException:
        child.kill()
        raise
    return child
