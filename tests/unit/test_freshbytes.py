"""``fresh``: a bytes object filled through a view of its storage, never faulted in ahead of
the data (a peer's announced size costs nothing); ``copied``: one holding a copy of memory
at hand, made a huge page at a time."""

from __future__ import annotations

import ctypes
import mmap

import pytest

from udskit.freshbytes import FRESH_MIN, copied, fresh

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


@pytest.mark.parametrize("length", [0, 1, 5, 2 * 1024 * 1024 + 3, FRESH_MIN + 4097])
def test_a_copy_holds_the_bytes_at_the_address_whatever_the_pieces(length: int) -> None:
    """The pieces follow the object's huge pages, which start wherever malloc put it: every
    length, whole pieces or not, comes out byte for byte."""
    pattern = bytes(range(251))  # a prime period: a piece copied to the wrong place shows
    source = (pattern * (length // len(pattern) + 1))[:length]
    buffer = ctypes.create_string_buffer(source, length or 1)
    data = copied(ctypes.addressof(buffer), length)
    assert data is not None
    assert type(data) is bytes
    assert data == source
    assert hash(data) == hash(source)
