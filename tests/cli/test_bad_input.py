"""Bad input to every subcommand: exit 2 (usage) or 1 (failure), one line, no traceback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.cli.conftest import Background, one_line_error, serve, udskit

S = "{dir}/x.sock"

USAGE = [
    # (arguments, a phrase the one line must contain)
    (["bogus-command"], "invalid choice: 'bogus-command'"),
    (["serve", "--bogus", "--echo", S], "unrecognized arguments: --bogus"),
    (["serve", S], "one of the arguments --echo --upper --print --reply --exec is required"),
    (["serve", "--echo", "--upper", S], "not allowed with argument --echo"),
    (["serve", "--echo", "--mode", "99x", S], "'99x' is not an octal permission number"),
    (["serve", "--echo", "--mode", "17777", S], "over 7777"),
    (
        ["serve", "--echo", "--mode", "4755", S],
        (
            "argument --mode: '4755' has setuid/setgid/sticky bits, which make no sense on "
            "a socket; use 755"
        ),
    ),
    (["serve", "--echo", "--mode", "1777", S], "sticky bits, which make no sense on a socket"),
    (["bridge", "--mode", "2770", "unix:" + S, "tcp:127.0.0.1:1"], "use 770"),
    (["serve", "--echo", "gopher:x"], "unknown address scheme 'gopher'"),
    (["serve", "--echo", ""], "empty address"),
    (["serve", "--echo", "--type", "dgram", "--framing", "lines", S], "stream sockets only"),
    (["serve", "--exec", "no-such-program-here", S], "command 'no-such-program-here' not found"),
    (["serve", "--exec", "", S], "--exec needs a command"),
    (["serve", "--exec", "tr 'a", S], "No closing quotation"),
    (
        ["serve", "--echo", "--owner", "no-such-user-here", S],
        "argument --owner: unknown user 'no-such-user-here'",
    ),
    (
        ["bridge", "--group", "no-such-group-here", S, "tcp:127.0.0.1:1"],
        "argument --group: unknown group 'no-such-group-here'",
    ),
    (["serve", "--echo", "--allow-uid", "no-such-user-here", S], "unknown user"),
    (["serve", "--echo", "--allow-gid", "no-such-group-here", S], "unknown group"),
    (["serve", "--echo", "--backlog", "0", S], "'0' must be at least 1"),
    (["serve", "--echo", "--max-clients", "many", S], "'many' is not a whole number"),
    (["serve", "--echo", "--type", "raw", S], "invalid choice: 'raw'"),
    (["connect", "--bogus", S], "unrecognized arguments: --bogus"),
    (["connect", S, "extra"], "unrecognized arguments: extra"),
    (["connect", "tcp:localhost"], "malformed tcp address 'tcp:localhost'"),
    (["connect", "--timeout", "-1", S], "'-1' must be a finite number of seconds"),
    (["connect", "--timeout", "soon", S], "'soon' is not a number of seconds"),
    (["tap", "--drain-timeout", "-1", S], "'-1' must be a finite number of seconds, more than 0"),
    (["tap", "--drain-timeout", "nan", S], "'nan' must be a finite number of seconds, more than 0"),
    (
        ["tap", "--drain-timeout", "0", S],
        "argument --drain-timeout: '0' must be more than 0 seconds",
    ),
    (["connect", "--type", "seqpacket", "--framing", "length", S], "stream sockets only"),
    (["connect", "--type", "dgram", "--no-shutdown", S], "--no-shutdown applies to stream and"),
    (["connect", "--bind", "tcp:127.0.0.1:1", S], "--bind takes a Unix path or @name"),
    (["connect", "fd:x"], "malformed fd address 'fd:x'"),
    (["send", S], "the following arguments are required: MSG"),
    (["send", "@", "hi"], "empty abstract name"),
    (["pair", "--type", "dgram", "--", "cat"], "invalid choice: 'dgram'"),
    (["pair"], "give the program to run after --"),
    (["pair", "--max-frame", "8", "--", "cat"], "a raw stream has none: use it with --type"),
    (
        ["send", "--max-frame", "64K", S, "x"],
        (
            "--max-frame bounds a message, and a raw stream has none: use it with --framing "
            "length or lines, or --type seqpacket or dgram (or drop --max-frame)"
        ),
    ),
    (["serve", "--echo", "--max-frame", "0", S], "argument --max-frame: '0' must be from 1"),
    (["connect", "--max-frame", "4G", S], "'4G' must be from 1 to 4294967295 bytes"),
    (["send", "--max-frame", "1.5M", S, "x"], "'1.5M' is not a number of bytes such as"),
    (["wait", "--timeout", "inf", S], "must be a finite number of seconds"),
    (["wait", "tcp:host"], "malformed tcp address"),
    # the address of every command is a usage mistake, as that of connect is
    (["bridge", "tcp:127.0.0.1", S], "argument LISTEN: malformed tcp address"),
    (["bridge", S, "gopher:x"], "argument TARGET: unknown address scheme 'gopher'"),
    (["http", "tcp:localhost", "/"], "argument ADDR: malformed tcp address"),
    (["http", "", "/"], "argument ADDR: empty address"),
    # durations read as everywhere else (it was argparse's "invalid float value")
    (["http", "--timeout", "abc", S, "/"], "argument --timeout: 'abc' is not a number of"),
    (["http", "--max-time", "0", S, "/"], "argument --max-time: '0' must be more than 0 seconds"),
    (["http", "--timeout", "inf", S, "/"], "argument --timeout: 'inf' must be a finite number"),
    (["doctor", "--type", "raw", S], "invalid choice: 'raw'"),
    (["doctor", "--as", "no-such-user-here", S], "unknown user 'no-such-user-here'"),
    (["ls", "--stale"], "--stale needs the directory"),
    (["ls", "--bogus"], "unrecognized arguments: --bogus"),
    (["demo", "--fast"], "unrecognized arguments: --fast"),
    (["send", "--type", "dgram", "tcp:127.0.0.1:1", "x"], "TCP addresses take --type stream"),
    (["connect", "--type", "seqpacket", "tcp:127.0.0.1:1"], "TCP addresses take --type stream"),
    (["connect", "--bind", S, "tcp:127.0.0.1:1"], "--bind names our end of a Unix socket"),
    # A message that starts with '-' is taken for an option: say how to pass it.
    (["send", S, "-hello"], "such as -hello, goes after '--'"),
    (["send", S, "--what"], "required: MSG; see 'udskit send --help'; an argument that"),
]

FAILURE = [
    (["serve", "--echo", "{dir}/missing/x.sock"], "does not exist"),
    (["connect", S], "no such file"),
    (["send", S, "hi"], "no such file"),
    (["send", S, "--", "-hello"], "no such file"),  # taken as the message
    (["pair", "--", "no-such-program-here"], "command not found"),
    (["wait", "--timeout", "0", S], "did not accept a connection"),
    (["ls", "--stale", "{dir}/missing"], "udskit ls: no such directory: {dir}/missing; check"),
    (["ls", "{dir}/missing"], "udskit ls: no such directory: {dir}/missing; check the path"),
    (["ls", ""], "udskit ls: no such directory: ''; check the path"),
    (["ls", "/dev/null"], "udskit ls: /dev/null is not a directory; give the directory to list"),
    (["ls", "--stale", "/dev/null"], "/dev/null is not a directory; give the directory"),
]


def expand(args: list[str], directory: Path) -> list[str]:
    return [a.replace("{dir}", str(directory)) for a in args]


@pytest.mark.parametrize(("args", "phrase"), USAGE)
def test_usage_mistakes(sockdir: Path, args: list[str], phrase: str) -> None:
    result = udskit(*expand(args, sockdir))
    line = one_line_error(result, 2)
    assert phrase in line
    assert result.out == b""


@pytest.mark.parametrize(("args", "phrase"), FAILURE)
def test_runtime_failures(sockdir: Path, args: list[str], phrase: str) -> None:
    result = udskit(*expand(args, sockdir))
    line = one_line_error(result, 1)
    assert phrase.replace("{dir}", str(sockdir)) in line
    assert result.out == b""


def test_every_subcommand_help_shows_an_example() -> None:
    top = udskit("--help")
    assert top.code == 0
    assert "examples:" in top.text
    for name in ("serve", "connect", "send", "pair", "wait", "doctor", "ls", "demo"):
        assert name in top.text
        help_text = udskit(name, "--help").text
        assert "examples:" in help_text, name
        assert f"udskit {name}" in help_text.split("examples:")[1], name


def test_a_file_on_the_way_is_named_as_not_a_directory(sockdir: Path) -> None:
    """A regular file where a directory should be: creating "it" would not help, so the
    error names the file, for the server and for a client alike."""
    (sockdir / "notes.txt").write_text("not a directory\n")
    path = sockdir / "notes.txt" / "x.sock"
    line = one_line_error(udskit("serve", "--echo", path), 1)
    assert line == (
        f"udskit serve: cannot create socket {path}: {sockdir}/notes.txt is a regular file, "
        "not a directory; check the path"
    )
    line = one_line_error(udskit("send", path, "hi"), 1)
    assert line == (
        f"udskit send: cannot connect to {path}: {sockdir}/notes.txt is a regular file, not "
        "a directory; check the path"
    )


def test_a_missing_directory_comes_with_the_command_that_creates_it(sockdir: Path) -> None:
    path = sockdir / "run" / "app" / "x.sock"
    line = one_line_error(udskit("serve", "--echo", path), 1)
    assert line == (
        f"udskit serve: cannot create socket {path}: directory {sockdir}/run/app does not "
        f"exist; create it first (mkdir -p {sockdir}/run/app)"
    )


@pytest.mark.parametrize(
    ("server", "client", "told"),
    [
        ("seqpacket", "stream", "(seqpacket, not stream); pass --type seqpacket"),
        ("stream", "seqpacket", "(stream, not seqpacket); pass --type stream"),
        ("dgram", "stream", "(dgram, not stream); pass --type dgram"),
        (
            "stream",
            "dgram",
            "(stream or seqpacket, not dgram); pass --type stream or --type seqpacket",
        ),
    ],
)
def test_a_server_of_another_type_is_named_in_the_options_words(
    sockdir: Path, background: list[Background], server: str, client: str, told: str
) -> None:
    path = sockdir / "typed.sock"
    serve(background, path, "--type", server, "--echo")
    line = one_line_error(udskit("send", "--type", client, path, "hi"), 1)
    assert line == f"udskit send: cannot connect to {path}: it is a socket of another type {told}"


def test_a_tilde_no_shell_expanded_is_named_not_created(sockdir: Path) -> None:
    # '~/x.sock' in quotes reaches udskit as it is; the advice was "mkdir -p DIR/~".
    home = sockdir / "home"
    env = {**os.environ, "HOME": str(home)}
    tilde = f"there is no directory {sockdir}/~: '~' is expanded only by a shell, not within "
    tilde += f"quotes nor in Python (os.path.expanduser()): write {home} in place of ~"
    line = one_line_error(udskit("serve", "--echo", "~/x.sock", cwd=sockdir, env=env), 1)
    assert line == f"udskit serve: cannot create socket {sockdir}/~/x.sock: {tilde}"
    line = one_line_error(udskit("send", "~/x.sock", "hi", cwd=sockdir, env=env), 1)
    assert line == f"udskit send: cannot connect to ~/x.sock: {tilde}"
    result = udskit("doctor", "~/x.sock", cwd=sockdir, env=env)
    assert result.code == 1
    assert "    fix: '~' is expanded only by a shell" in result.text
    assert "mkdir" not in result.text
    # a directory ~USER of no such user is only a missing directory
    line = one_line_error(udskit("serve", "--echo", "~no-such-user-here/x.sock", cwd=sockdir), 1)
    assert "create it first" in line
