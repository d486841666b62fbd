"""What a command loads to start: only its own subcommand's module, and no asyncio for a
blocking one. Starting is most of what a short command (``send``, ``wait``, ``ls``) costs,
and loading every subcommand doubled it. A fresh interpreter each, as a user's command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.cli.conftest import COMMAND_TIMEOUT
from udskit.cli.main import COMMANDS

_LOADED = """
import contextlib, io, json, sys
from udskit.cli.main import main
with contextlib.redirect_stdout(io.StringIO()) as out:
    try:
        main(sys.argv[1:])
    except SystemExit:
        pass
loaded = sorted(n for n in sys.modules if n.startswith("udskit.cli.cmd_") or n == "asyncio")
print(json.dumps({"loaded": loaded, "out": out.getvalue()}))
"""


def _start(*argv: str) -> tuple[list[str], str]:
    """The modules of interest loaded by ``udskit ARGV``, and its stdout."""
    done = subprocess.run(
        [sys.executable, "-c", _LOADED, *argv],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=True,
    )
    seen = json.loads(done.stdout)
    return seen["loaded"], seen["out"]


@pytest.mark.parametrize(
    "argv",
    [
        ("send", "--help"),
        ("--log-level", "debug", "send", "-h"),
        ("--log-level=info", "send", "-h"),
        ("--log", "debug", "send", "-h"),
        ("--log=debug", "send", "-h"),
    ],
)
def test_a_command_loads_only_its_own_module_and_no_asyncio(argv: tuple[str, ...]) -> None:
    loaded, out = _start(*argv)
    assert loaded == ["udskit.cli.cmd_send"]
    assert out.startswith("usage: udskit send ")


@pytest.mark.parametrize("argv", [("--help",), ("-h", "send"), ("--log-level", "info", "-h")])
def test_the_overall_help_lists_every_command(argv: tuple[str, ...]) -> None:
    loaded, out = _start(*argv)
    assert out.startswith("usage: udskit [-h]")
    listed = [name for name in COMMANDS if f"\n    {name} " in out]
    assert listed == list(COMMANDS)
    assert f"udskit.cli.cmd_{COMMANDS[0]}" in loaded
