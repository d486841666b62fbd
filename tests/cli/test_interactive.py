"""``udskit connect`` on a real terminal (a pty): each line goes out as it is typed and its
reply is shown at once, long before the end of input (S2, S5)."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli.conftest import COMMAND_TIMEOUT, UDSKIT, Background, serve

CTRL_D = b"\x04"


class Terminal:
    """A command attached to a pseudo-terminal, typed into and read like a user would."""

    def __init__(self, *args: str | os.PathLike[str]) -> None:
        self.master, slave = pty.openpty()
        self.process = subprocess.Popen(
            [*UDSKIT, *map(os.fspath, args)], stdin=slave, stdout=slave, stderr=slave
        )
        os.close(slave)
        self.screen = b""

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def expect(self, wanted: bytes) -> None:
        """Read the screen until ``wanted`` shows; bounded by COMMAND_TIMEOUT."""
        deadline = time.monotonic() + COMMAND_TIMEOUT
        while wanted not in self.screen:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([self.master], [], [], max(0.0, remaining))
            if not ready:
                raise AssertionError(f"{wanted!r} never showed; the screen: {self.screen!r}")
            try:
                chunk = os.read(self.master, 4096)
            except OSError:  # EIO: the command exited and closed the terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"terminal closed before {wanted!r}: {self.screen!r}")
            self.screen += chunk

    def running(self) -> bool:
        return self.process.poll() is None

    def close(self) -> None:
        if self.running():
            self.process.kill()
        self.process.wait()
        os.close(self.master)


@pytest.fixture
def terminals() -> Iterator[list[Terminal]]:
    opened: list[Terminal] = []
    yield opened
    for terminal in opened:
        terminal.close()


def test_stream_line_by_line(
    sockdir: Path, background: list[Background], terminals: list[Terminal]
) -> None:
    path = sockdir / "s5.sock"
    serve(background, path, "--reply", "thank you!", "--backlog", "128")
    term = Terminal("connect", path)
    terminals.append(term)
    term.expect(b"Ctrl-D ends")  # the greeting, on a terminal only
    term.type(b"1\n")
    term.expect(b"thank you!")
    assert term.running()  # answered while we are still typing
    term.type(b"second line\n")
    term.expect(b"second line\r\nthank you!")  # our typing echoed, then the reply
    term.type(CTRL_D)  # end of input: half-close, the server closes, we are done
    assert term.process.wait(COMMAND_TIMEOUT) == 0


def test_datagrams_typed_one_by_one(
    sockdir: Path, background: list[Background], terminals: list[Terminal]
) -> None:
    path = sockdir / "s2.sock"
    server = serve(background, path, "--type", "dgram", "--upper", "--until", "DONE")
    term = Terminal("connect", "--type", "dgram", path)
    terminals.append(term)
    term.expect(b"each line is one datagram")
    term.type(b"hello\n")
    term.expect(b"HELLO")
    assert term.running()
    term.type(b"DONE\n")
    term.expect(b"DONE\r\nDONE")  # the echo of our typing, then the server's answer
    assert server.wait() == 0  # DONE stopped the server...
    assert not path.exists()  # ...and it removed its socket file
    term.type(CTRL_D)
    assert term.process.wait(COMMAND_TIMEOUT) == 0
