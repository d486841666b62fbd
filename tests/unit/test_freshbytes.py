"""``fresh``: a bytes object filled through a view of its storage; faulted in all at once only
when asked (a copy of data at hand), never for a message a peer has only announced."""

from __future__ import annotations

import mmap
import os

import pytest

from udskit.freshbytes import FRESH_MIN, fresh

SIZE = 2 * FRESH_MIN


def resident() -> int:
    """This process's resident set, in bytes."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * mmap.PAGESIZE


def test_the_object_holds_what_was_written_through_its_view() -> None:
    prepared = fresh(5, huge=False)
    assert prepared is not None
    data, view = prepared
    with view:
        view[:] = b"hello"
    assert data == b"hello"
    assert hash(data) == hash(b"hello")


@pytest.mark.parametrize("huge", [False, True])
def test_without_populate_only_what_is_written_is_held(huge: bool) -> None:
    before = resident()
    prepared = fresh(SIZE, huge=huge)
    assert prepared is not None
    data, view = prepared
    held = resident() - before
    with view:
        view[: mmap.PAGESIZE] = b"x" * mmap.PAGESIZE
    assert held < SIZE // 8  # a peer's announced size costs nothing until bytes arrive
    del data


def _kernel() -> tuple[int, int]:
    major, minor = os.uname().release.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


@pytest.mark.skipif(_kernel() < (5, 14), reason="MADV_POPULATE_WRITE came in Linux 5.14")
def test_populate_faults_it_all_in_now() -> None:
    before = resident()
    prepared = fresh(SIZE, huge=True, populate=True)
    assert prepared is not None
    data, view = prepared
    view.release()
    assert resident() - before >= SIZE * 3 // 4
    del data
