"""nobody against the files root's ``udskit bench`` writes into a directory nobody may
write: a name swapped for a symlink is never followed into a file that then changes."""

from __future__ import annotations

import json
import os
import stat
from typing import Any, TextIO

import pytest

from udskit.cli import cmd_bench

from ..integration.children import needs_root
from .conftest import Arena, as_nobody

pytestmark = [pytest.mark.root, needs_root]


def test_bench_json_never_chmods_what_nobody_put_at_its_temporary_name(
    open_arena: Arena, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While root writes ``udskit bench --json`` into a directory nobody may write, nobody
    swaps the temporary file for a symlink to root's secret: the mode is set on the file
    root wrote, never on the secret."""
    real_dump = json.dump

    def dump(document: object, out: TextIO, **options: Any) -> None:
        real_dump(document, out, **options)
        (partial,) = (p for p in open_arena.directory.iterdir() if p.name.startswith(".bench-"))

        def swap() -> str:
            partial.rename(partial.with_name("taken"))
            partial.symlink_to(open_arena.secret)
            return "swapped"

        assert as_nobody(swap) == "swapped"

    monkeypatch.setattr(cmd_bench.json, "dump", dump)
    cmd_bench._write_json(str(open_arena.directory / "bench.json"), {"runs": []})
    open_arena.secret_untouched()
    assert stat.S_IMODE(os.stat(open_arena.directory / "taken").st_mode) == 0o644
