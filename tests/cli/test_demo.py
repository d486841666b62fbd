"""``udskit demo``: the tour of the eight scenarios runs, reads well, and cleans up after itself."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from tests.cli.conftest import udskit

DEMO_TIMEOUT = 120.0  # a tour of a few seconds; generous for a loaded CI machine


def directory_of(text: str) -> Path:
    match = re.search(r"run for real in (\S+)", text)
    assert match, text
    return Path(match.group(1))


@pytest.mark.long
def test_the_tour_runs_every_scenario() -> None:
    result = udskit("demo", "--keep", timeout=DEMO_TIMEOUT)
    assert result.code == 0, result.text + result.err
    text = result.text
    kept = directory_of(text)
    try:
        headings = [line.split()[0] for line in text.splitlines() if re.match(r"\d  ", line)]
        assert headings == [str(n) for n in range(1, 9)]
        assert not re.search(r"\bS\d\b|seed", text)  # no internal scenario ids
        assert text.count("\n    ok: ") == 8
        assert "FAILED" not in text
        assert re.search(r"all 8 scenarios worked \(\d+\.\d s\)", text)
        assert "$ udskit serve --type dgram --print --until DONE s1.sock &" in text
        assert result.err == ""
        assert text.rstrip().endswith(f"the directory is kept: {kept}")
        assert (kept / "notes.txt").read_text() == "not a socket\n"
        assert not list(kept.glob("*.sock"))  # every server removed its socket file
    finally:
        shutil.rmtree(kept, ignore_errors=True)


@pytest.mark.long
def test_a_failing_scenario_is_reported() -> None:
    # Without sh on PATH the socket-pair scenario (the fourth) cannot run its child; the others
    # only need the Python running the tour.
    env = {**os.environ, "PATH": "/nonexistent"}
    result = udskit("demo", env=env, timeout=DEMO_TIMEOUT)
    assert result.code == 1
    assert "    FAILED: 'udskit pair -- sh -c" in result.text
    assert "command not found: sh" in result.text
    assert "1 of 8 scenarios FAILED" in result.text
    assert not directory_of(result.text).exists()  # removed, without --keep
