"""Ctrl-C at any moment of a command ends it as a shell expects: exit 130, no traceback;
also while the command is still loading udskit, before any of its own code runs.

The Ctrl-C comes at a chosen point, not after a guessed delay: a ``sitecustomize`` on the
child's PYTHONPATH raises SIGINT in the process itself when the named module starts to
load. (A SIGINT sent right after the child starts lands before Python has installed its
handler, and kills the process by the default action: that proves nothing about udskit.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.conftest import COMMAND_TIMEOUT, UDSKIT

CTRL_C_AT = '''
import os, signal, sys


class _CtrlC:
    """SIGINT, from within, when the module named in $CTRL_C_AT starts to load."""

    def find_spec(self, name, path=None, target=None):
        if name == os.environ.get("CTRL_C_AT"):
            sys.meta_path.remove(self)
            signal.raise_signal(signal.SIGINT)
        return None


sys.meta_path.insert(0, _CtrlC())
'''

#: The installed ``udskit`` command, beside this interpreter.
SCRIPT = Path(sys.executable).parent / "udskit"


@pytest.mark.parametrize(
    ("command", "module"),
    [
        # while `import udskit` loads the library, before udskit.cli exists
        ((str(SCRIPT),), "udskit.address"),
        # while the parser is built from the subcommands' modules
        ((str(SCRIPT),), "udskit.cli.cmd_bench"),
        (UDSKIT, "udskit.cli.cmd_bench"),
    ],
    ids=["script-loading-udskit", "script-building-the-parser", "python-m-building-the-parser"],
)
def test_ctrl_c_while_starting_exits_130_quietly(
    tmp_path: Path, command: tuple[str, ...], module: str
) -> None:
    if not os.access(command[0], os.X_OK):
        pytest.skip(f"{command[0]} is not installed (pip install -e .)")
    (tmp_path / "sitecustomize.py").write_text(CTRL_C_AT)
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    done = subprocess.run(
        [*command, "--version"],
        env={**os.environ, "PYTHONPATH": path, "CTRL_C_AT": module},
        capture_output=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    assert b"Traceback" not in done.stderr, done.stderr.decode()
    assert done.returncode == 130, done.stderr.decode()
    assert done.stdout == b""  # interrupted before it printed its version
