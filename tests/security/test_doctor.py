"""nobody against root's ``udskit doctor``: a symlink nobody planted at the socket's name
in a shared directory, leading to a server of its own, is named as such, with its maker."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import pytest

from udskit.inspect import diagnose

from ..integration.children import NOBODY, Held, needs_root
from .conftest import Arena

pytestmark = [pytest.mark.root, needs_root, pytest.mark.usefixtures("no_fd_leak")]


def _serve_behind_a_symlink(arena: Arena) -> tuple[str, Callable[[], object]]:
    """nobody's server, at a name of its own, and a symlink to it at the socket's path."""
    real = arena.directory / "nobodys.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(os.fspath(real))
    sock.listen(1)
    os.symlink(real, arena.path)
    return "ready", sock.close


def test_doctor_names_a_symlink_nobody_planted(sticky_arena: Arena) -> None:
    with Held(lambda: _serve_behind_a_symlink(sticky_arena), as_user=NOBODY) as nobody:
        assert nobody.report == "ready"
        found = diagnose(sticky_arena.path)
    (warning,) = (f for f in found.findings if f.status == "warning")
    assert warning.summary == (
        f"{sticky_arena.path} is a symlink to {sticky_arena.directory / 'nobodys.sock'}, made "
        f"by nobody (uid {NOBODY}): a connect reaches whatever it points to"
    )
    assert warning.fixes == (
        f"if that is not the server you expect, remove the symlink: rm {sticky_arena.path}",
    )
    assert found.server is not None
    assert found.server.uid == NOBODY


def test_doctor_notes_a_symlink_of_roots_own(sticky_arena: Arena) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(os.fspath(sticky_arena.directory / "real.sock"))
        server.listen(1)
        os.symlink("real.sock", sticky_arena.path)
        found = diagnose(sticky_arena.path)
    assert [f.status for f in found.findings if f.check == "path"] == ["info"]
    assert not any(f.status in ("warning", "problem") for f in found.findings)


#: A directory name that, shown as is, would end the warning's line and forge an "[ok]" one.
FORGED = "d\n[ok]      path: nothing to see here"


def _serve_behind_a_forging_symlink(arena: Arena) -> tuple[str, Callable[[], object]]:
    """nobody's server in a directory whose name holds a line of its own, and a symlink
    to it at the socket's path."""
    (arena.directory / FORGED).mkdir()
    real = arena.directory / FORGED / "nobodys.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(os.fspath(real))
    sock.listen(1)
    os.symlink(real, arena.path)
    return "ready", sock.close


def test_a_symlinks_target_is_shown_on_one_line(sticky_arena: Arena) -> None:
    with Held(lambda: _serve_behind_a_forging_symlink(sticky_arena), as_user=NOBODY) as nobody:
        assert nobody.report == "ready"
        found = diagnose(sticky_arena.path)
    (warning,) = (f for f in found.findings if f.status == "warning")
    assert "\n" not in warning.summary
    assert "d\\n[ok]      path: nothing to see here/nobodys.sock, made by nobody" in (
        warning.summary
    )


def test_a_dangling_symlinks_target_is_shown_on_one_line(sticky_arena: Arena) -> None:
    os.symlink(sticky_arena.directory / FORGED / "gone.sock", sticky_arena.path)
    found = diagnose(sticky_arena.path)
    facts = [fact for f in found.findings for fact in f.facts if "is a symlink to" in fact]
    assert len(facts) == 1
    assert "\n" not in facts[0]
    assert "d\\n[ok]      path: nothing to see here/gone.sock, which does not exist" in facts[0]
