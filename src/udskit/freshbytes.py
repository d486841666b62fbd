"""Large ``bytes`` objects filled in place: a message of tens of MiB becomes its own
``bytes`` with one copy, into memory prepared for it.

A ``bytes`` above glibc's largest mmap threshold (32 MiB) is always fresh memory from the
kernel, and filling it takes one page fault per 4 KiB, each clearing its page: at 256 MiB,
65,536 faults cost more than the copy itself. :func:`fresh` makes the object uninitialised
through the C API (as C extensions make theirs), asks the kernel to back it with huge pages
where the system allows them (a fault per 2 MiB), and hands back a writable view of its
storage, to be filled before anyone else can see the object. :func:`copied` does the same
for a copy of memory at hand, in pieces of a huge page (see ``_PIECE``).

Nothing is faulted in ahead of the data: for a message still arriving from a peer, its size
is only the peer's word, and a peer that announces 256 MiB and sends a byte must not make
us hold 256 MiB.
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Callable
from typing import Final

__all__ = ["FRESH_MIN", "copied", "fresh"]

#: From this size up, a message is received into memory prepared by :func:`fresh`: 32 MiB
#: is glibc's largest mmap threshold. A smaller ``bytes`` reuses freed heap memory, already
#: faulted in, and preparing it measured slower (1 and 16 MiB copies).
FRESH_MIN: Final = 32 * 1024 * 1024

#: madvise() advice (Linux): back with transparent huge pages where the system allows it
#: ("madvise" mode).
_MADV_HUGEPAGE: Final = 14
_PAGE: Final = mmap.PAGESIZE

#: A copy into fresh memory goes a huge page at a time: each piece's fault clears its page,
#: and the copy writes it while it is still in the cache. Clearing all of it first and then
#: copying (one MADV_POPULATE_WRITE, one memmove) writes every byte to memory twice, and
#: measured 126-180 ms at 256 MiB against 77-95 ms this way (one process, median of five).
_PIECE: Final = 2 * 1024 * 1024

_libc = ctypes.CDLL(None, use_errno=True)
_madvise = _libc.madvise
_madvise.restype = ctypes.c_int
_madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def _new_bytes_api() -> Callable[[None, int], bytes] | None:
    """CPython's PyBytes_FromStringAndSize (None elsewhere)."""
    api = getattr(ctypes, "pythonapi", None)
    if api is None:
        return None
    make = api.PyBytes_FromStringAndSize
    make.restype = ctypes.py_object
    make.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
    return make  # type: ignore[no-any-return]


_new_bytes: Final = _new_bytes_api()


def _make(length: int, huge: bool) -> tuple[bytes, int] | None:
    """A new, uninitialised ``bytes`` of ``length`` bytes and the address of its storage
    (see :func:`fresh`)."""
    if _new_bytes is None:
        return None
    try:
        data = _new_bytes(None, length)
    except MemoryError:
        # The size may be only a peer's word (a limit on address space, or strict
        # overcommit, refuses it at once): the usual way holds only what has arrived.
        return None
    address = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value
    assert address is not None
    if huge:  # advice only: a kernel without it still gets a correct object
        start = -(-address // _PAGE) * _PAGE
        end = (address + length) // _PAGE * _PAGE
        if end > start:
            _madvise(start, end - start, _MADV_HUGEPAGE)
    return data, address


def fresh(length: int, *, huge: bool) -> tuple[bytes, memoryview] | None:
    """A new ``bytes`` of ``length`` bytes, uninitialised, and a writable view of its
    storage to fill it through; None where there is no C API to make one, or no room for
    it (the caller makes its ``bytes`` the usual way). ``huge``: back it with huge pages
    where the system allows them (for FRESH_MIN and more). The view must be released, and
    the object filled, before the object is handed to anyone: until then nobody else
    holds it."""
    made = _make(length, huge)
    if made is None:
        return None
    data, address = made
    return data, memoryview((ctypes.c_char * length).from_address(address)).cast("B")


def copied(source: int, length: int) -> bytes | None:
    """A new ``bytes`` holding the ``length`` bytes at address ``source`` (memory the caller
    keeps mapped meanwhile), backed by huge pages where the system allows them and copied
    a huge page at a time (see ``_PIECE``); None as for :func:`fresh`."""
    made = _make(length, huge=True)
    if made is None:
        return None
    data, address = made
    # The pieces end where the object's huge pages do: each is one fault, then its copy.
    done = min(length, -address % _PIECE or _PIECE)
    ctypes.memmove(address, source, done)
    while done < length:
        piece = min(_PIECE, length - done)
        ctypes.memmove(address + done, source + done, piece)
        done += piece
    return data
