"""How the CLI cuts what it reads (its stdin for ``connect``/``pair``, a command's output for
``serve --exec``) into messages: one function for both, fed here through a real pipe."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from typing import IO, cast

import pytest

import udskit
from udskit.cli._exec import _output_of
from udskit.cli._messages import MAX_LINE, READ_CHUNK, line_limit, messages
from udskit.cli._relay import stdin_messages


def _pipe_of(*writes: bytes) -> Iterator[int]:
    """The read end of a pipe a thread writes ``writes`` into, then closes."""
    read_fd, write_fd = os.pipe()

    def writer() -> None:
        try:
            for data in writes:
                os.write(write_fd, data)
        except BrokenPipeError:
            pass  # the reader stopped early, as it does on a line too long
        finally:
            os.close(write_fd)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        yield read_fd
    finally:
        os.close(read_fd)
        thread.join(10)


@pytest.fixture
def lines_in() -> Iterator[int]:
    yield from _pipe_of(b"one\ntw", b"o\n\nthree")


def test_lines_lose_their_newline_and_a_last_line_without_one_counts(lines_in: int) -> None:
    got = list(messages(lines_in, lines=True, what="a line", hint="hint"))
    assert got == [b"one", b"two", b"", b"three"]


def test_raw_chunks_pass_untouched() -> None:
    for fd in _pipe_of(b"no\nsplitting\n"):
        got = b"".join(messages(fd, lines=False, what="a line", hint="hint"))
        assert got == b"no\nsplitting\n"


def test_a_line_over_the_limit_is_refused_with_the_callers_words() -> None:
    endless = b"x" * READ_CHUNK
    for fd in _pipe_of(*[endless] * (MAX_LINE // READ_CHUNK + 2)):
        with pytest.raises(udskit.FrameTooLarge, match=f"^a line is over {MAX_LINE} bytes"):
            list(messages(fd, lines=True, what="a line", hint="split it"))


def _stdout(fd: int) -> IO[bytes]:
    """What _output_of() is given: a process's stdout; it only asks for the descriptor."""

    class Stdout:
        def fileno(self) -> int:
            return fd

    return cast(IO[bytes], Stdout())


@pytest.mark.parametrize(
    ("read", "words"),
    [
        (lambda fd: stdin_messages(fd, lines=True), "a stdin line is over"),
        # A command's output had no bound: a command printing without newlines grew the
        # server's buffer until memory ran out.
        (lambda fd: _output_of(_stdout(fd), lines=True), "command's"),
    ],
)
def test_stdin_and_a_commands_output_are_cut_alike(
    read: Callable[[int], Iterator[bytes]], words: str
) -> None:
    for fd in _pipe_of(b"a\nb"):
        assert list(read(fd)) == [b"a", b"b"]
    endless = b"x" * READ_CHUNK
    for fd in _pipe_of(*[endless] * (MAX_LINE // READ_CHUNK + 2)):
        with pytest.raises(udskit.FrameTooLarge, match=words):
            list(read(fd))


def test_a_max_frame_over_the_line_limit_raises_it() -> None:
    # --max-frame 2M let the socket carry 2 MiB lines, but stdin's were cut at 1 MiB.
    assert line_limit(None) == line_limit(1000) == MAX_LINE
    long_line = b"x" * (MAX_LINE + 1)
    for fd in _pipe_of(long_line, b"\n"):
        got = list(stdin_messages(fd, lines=True, limit=line_limit(2 * MAX_LINE)))
        assert got == [long_line]
    for fd in _pipe_of(long_line, b"\n"):
        assert list(_output_of(_stdout(fd), lines=True, limit=line_limit(2 * MAX_LINE))) == [
            long_line
        ]
