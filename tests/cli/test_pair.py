"""``udskit pair -- CMD``: CMD gets the other end of a socket pair (S4)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from tests.cli.conftest import UDSKIT, Background, one_line_error, udskit


def test_relays_stdin_and_stdout_through_the_pair() -> None:
    result = udskit(
        "pair", "--", "sh", "-c", 'tr a-z A-Z <&"$UDSKIT_FD" >&"$UDSKIT_FD"', stdin=b"hello\n"
    )
    assert (result.code, result.out) == (0, b"HELLO\n")


def test_the_descriptor_is_an_address_for_udskit_itself() -> None:
    # The child is udskit too: `connect fd:N` adopts the inherited end. Its stdin is empty,
    # so it half-closes at once and prints what we send.
    child = f'exec "{sys.executable}" -m udskit connect "fd:$UDSKIT_FD"'
    result = udskit("pair", "--", "sh", "-c", child, stdin=b"through the pair\n")
    assert (result.code, result.out) == (0, b"through the pair\n")


def test_library_child(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(
        "import os, udskit\n"
        "with udskit.connect('fd:' + os.environ['UDSKIT_FD'], framing='lines') as end:\n"
        "    for line in end:\n"
        "        end.send(line[::-1])\n"
    )
    result = udskit("pair", "--", sys.executable, script, stdin=b"abc\nxyz\n")
    assert (result.code, result.out) == (0, b"cba\nzyx\n")


def test_seqpacket_pair() -> None:
    child = 'read line <&"$UDSKIT_FD"; printf "got %s" "$line" >&"$UDSKIT_FD"'
    result = udskit("pair", "--type", "seqpacket", "--", "sh", "-c", child, stdin=b"x\n")
    assert result.code == 0, result.err
    assert result.out == b"got x\n"


def test_exit_code_is_the_commands() -> None:
    assert udskit("pair", "--", "sh", "-c", "exit 7").code == 7


def test_killed_command_exits_128_plus_the_signal() -> None:
    assert udskit("pair", "--", "sh", "-c", "kill -TERM $$").code == 128 + 15


def test_missing_command() -> None:
    line = one_line_error(udskit("pair", "--", "no-such-program-here"), 1)
    assert line == "udskit pair: command not found: no-such-program-here"


def test_no_command_is_a_usage_error() -> None:
    line = one_line_error(udskit("pair"), 2)
    assert "give the program to run after --" in line


def test_terminated_pair_stops_its_command(background: list[Background]) -> None:
    pair = Background([*UDSKIT, "pair", "--", "sh", "-c", "echo $$ >&$UDSKIT_FD; exec sleep 60"])
    background.append(pair)
    child = int(pair.read_until(b"\n"))
    assert pair.stop(signal.SIGTERM) == 128 + signal.SIGTERM
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # reaped, not left running


def test_the_childs_own_stdin_is_empty() -> None:
    # as docs/cli.md says: our stdin feeds the pair, never the child's stdin
    result = udskit("pair", "--", "sh", "-c", "cat; echo end", stdin=b"for the pair\n")
    assert (result.code, result.out) == (0, b"end\n")
