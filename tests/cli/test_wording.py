"""The command line's errors in its own words: options instead of keywords, text instead
of Python's bytes notation."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli.conftest import Background, one_line_error, serve, udskit
from udskit.cli._wording import in_cli_words, without_reprs


@pytest.mark.parametrize(
    ("library", "command_line"),
    [
        ("pass type='seqpacket'", "pass --type seqpacket"),
        ("pass the server's type= (stream, seqpacket or dgram)", "pass the server's --type ("),
        ("bind= takes a Unix path", "--bind takes a Unix path"),
        ("use framing='length' for binary", "use --framing length for binary"),
        ("(pass allow= to restrict peers)", "(pass --allow-uid/--allow-gid to restrict peers)"),
        ("sock.type='x' and subtype='y' stay", "sock.type='x' and subtype='y' stay"),
        ("mode=0o4755 has setuid", "mode=0o4755 has setuid"),  # --mode is octal: no mapping
        # a path the user gave is never rewritten
        ("cannot connect to /srv/type=x/s.sock: no", "cannot connect to /srv/type=x/s.sock: no"),
        ("cannot connect to /srv/bind='a'.sock: no", "cannot connect to /srv/bind='a'.sock: no"),
        ("cannot connect to type=x: no such file", "cannot connect to type=x: no such file"),
    ],
)
def test_keywords_become_options(library: str, command_line: str) -> None:
    assert in_cli_words(library).startswith(command_line)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (
            "illegal status line: bytearray(b'HEAD / HTTP/1.1')",
            "illegal status line: 'HEAD / HTTP/1.1'",
        ),
        ("got b'x\\r\\n' and b\"it's\"", "got 'x\\r\\n' and 'it's'"),
        ("a verb(b) and b' alone", "a verb(b) and b' alone"),
        ("cannot connect to /srv/b'x'.sock: no", "cannot connect to /srv/b'x'.sock: no"),
        ("cannot connect to b'x'.sock: no", "cannot connect to b'x'.sock: no"),
    ],
)
def test_bytes_are_shown_as_text(text: str, shown: str) -> None:
    assert without_reprs(text) == shown


def test_an_http_error_shows_no_python_notation(
    sockdir: Path, background: list[Background]
) -> None:
    """h11 puts bytearray(b'...') in its messages; the command's one line shows the text."""
    pytest.importorskip("h11")
    path = sockdir / "echo.sock"
    serve(background, path, "--echo")  # sends the request back: not an HTTP response
    line = one_line_error(udskit("http", path, "/"), 1)
    assert "'GET / HTTP/1.1'" in line
    assert "bytearray" not in line
    assert "b'" not in line


@pytest.mark.parametrize("name", ["type=x", "bind='a'", "b'x'"])
def test_a_path_in_an_error_is_shown_as_given(sockdir: Path, name: str) -> None:
    path = sockdir / name / "s.sock"
    line = one_line_error(udskit("send", path, "hi"), 1)
    assert str(path) in line


@pytest.mark.parametrize(
    ("library", "command_line"),
    [
        (
            "over max_frame (64 bytes): another framing, or max_frame must be raised",
            "over --max-frame (64 bytes): another framing, or --max-frame must be raised",
        ),
        (
            "line of 9 bytes is over max_frame (8 bytes): send it in parts, or raise max_frame",
            "line of 9 bytes is over --max-frame (8 bytes): send it in parts, or raise --max-frame",
        ),
        ("newline (max_frame): it does not", "newline (--max-frame): it does not"),
        ("truncated; raise max_frame", "truncated; raise --max-frame"),
        ("cannot connect to /srv/max_frame: no", "cannot connect to /srv/max_frame: no"),
        ("self.max_frame and max_frames stay", "self.max_frame and max_frames stay"),
    ],
)
def test_limits_become_the_option_that_sets_them(library: str, command_line: str) -> None:
    # "max_frame must be raised" named a keyword the command line has no way to pass.
    assert in_cli_words(library).startswith(command_line)
