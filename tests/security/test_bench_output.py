"""nobody against the report files root's ``udskit bench`` writes (``--json``, ``--plot``)
into a directory nobody may write: a name swapped for a symlink is never followed into a
file that then changes."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

import pytest

from udskit.bench.output import write_whole

from ..integration.children import needs_root
from .conftest import Arena, as_nobody

pytestmark = [pytest.mark.root, needs_root]


def test_a_report_never_chmods_what_nobody_put_at_its_temporary_name(
    open_arena: Arena,
) -> None:
    """While root writes the report, nobody swaps the temporary file for a symlink to
    root's secret: the mode is set on the file root wrote, never on the secret."""
    reports: list[str] = []

    def write(out: BinaryIO) -> None:
        out.write(b"{}\n")
        (partial,) = (p for p in open_arena.directory.iterdir() if p.name.startswith(".bench-"))

        def swap() -> str:
            partial.rename(partial.with_name("taken"))
            partial.symlink_to(open_arena.secret)
            return "swapped"

        reports.append(as_nobody(swap))

    write_whole(str(open_arena.directory / "bench.json"), write, ".json")
    assert reports == ["swapped"]
    open_arena.secret_untouched()
    taken = os.stat(open_arena.directory / "taken")
    assert (stat.S_IMODE(taken.st_mode), taken.st_size) == (0o644, 3)


def test_a_report_is_written_whole_with_its_mode(tmp_path: Path) -> None:
    path = str(tmp_path / "bench.json")
    write_whole(path, lambda out: out.write(b"[1]\n"), ".json")
    info = os.stat(path)
    assert stat.S_IMODE(info.st_mode) == 0o644
    with open(path, "rb") as written:
        assert written.read() == b"[1]\n"
    assert os.listdir(tmp_path) == ["bench.json"]
