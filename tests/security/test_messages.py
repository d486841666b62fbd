"""What a user who may not do something is told: one line naming the path (as text, never a
bytes repr) and what to do, from the library and from the command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import udskit

from ..cli.conftest import COMMAND_TIMEOUT
from ..integration.children import NOBODY, needs_root
from .conftest import Arena, as_nobody

pytestmark = [pytest.mark.root, needs_root, pytest.mark.usefixtures("no_fd_leak")]

#: Where the udskit under test lives, for a Python started as nobody.
SOURCE = Path(udskit.__file__).parent.parent


def _leftovers(arena: Arena) -> list[str]:
    return sorted(os.listdir(arena.directory))


@pytest.mark.parametrize("kind", ["stream", "dgram"])
@pytest.mark.parametrize(("owner", "group"), [("root", None), (None, "root")])
def test_library_refuses_an_owner_or_group_nobody_may_not_give(
    arena: Arena, kind: str, owner: str | None, group: str | None
) -> None:
    def listen() -> str:
        udskit.listen(arena.path, type=kind, owner=owner, group=group).close()
        return "listening"

    report = as_nobody(listen)
    assert report.startswith("SocketFileError: "), report
    assert f"cannot give socket {arena.path} the requested owner or group" in report
    assert "operation not permitted" in report
    assert "run as root" in report
    assert "b'" not in report
    assert _leftovers(arena) == [], "the failed claim left files behind"


def _python_for_nobody() -> str:
    """An interpreter nobody may run (ours may sit under root's 0700 home)."""
    for candidate in (sys.executable, "/usr/bin/python3"):
        if candidate and as_nobody(lambda c=candidate: str(os.access(c, os.X_OK))) == "True":
            return candidate
    if os.environ.get("CI"):
        pytest.fail("no Python interpreter that nobody may run")
    pytest.skip("no Python interpreter that nobody may run")


@pytest.mark.parametrize("kind", ["stream", "dgram"])
def test_cli_refuses_an_owner_nobody_may_not_give(arena: Arena, kind: str) -> None:
    args = ["serve", os.fspath(arena.path), "--type", kind, "--echo", "--owner", "root"]
    done = _udskit_as_nobody(args, arena)
    assert done.returncode == 1, done
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert str(arena.path) in lines[0]
    assert "operation not permitted" in lines[0]
    assert "b'" not in lines[0]
    assert _leftovers(arena) == []


def test_cli_names_a_relative_path_as_given(arena: Arena) -> None:
    """The reported case: `udskit serve x.sock --owner root` in the current directory."""
    done = _udskit_as_nobody(["serve", "x.sock", "--echo", "--owner", "root"], arena)
    assert done.returncode == 1, done
    assert "b'x.sock'" not in done.stderr
    assert "x.sock" in done.stderr
    assert "run as root" in done.stderr


def _udskit_as_nobody(args: list[str], arena: Arena) -> subprocess.CompletedProcess[str]:
    """``udskit ARGS`` run as nobody, in the arena's directory."""
    return subprocess.run(
        [_python_for_nobody(), "-m", "udskit", *args],
        capture_output=True,
        text=True,
        env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": os.fspath(SOURCE)},
        cwd=arena.directory,
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
