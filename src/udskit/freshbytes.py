"""Large ``bytes`` objects filled in place: a message of tens of MiB becomes its own
``bytes`` with one copy, into memory prepared for it.

A ``bytes`` above glibc's largest mmap threshold (32 MiB) is always fresh memory from the
kernel, and filling it takes one page fault per 4 KiB, each clearing its page: at 256 MiB,
65,536 faults cost more than the copy itself. :func:`fresh` makes the object uninitialised
through the C API (as C extensions make theirs), asks the kernel to back it with huge pages
where the system allows them (a fault per 2 MiB), and hands back a writable view of its
storage, to be filled before anyone else can see the object.

Faulting the whole object in at once (``populate``) is for a copy of data already at hand.
A message still arriving from a peer is not: its size is only the peer's word, and a peer
that announces 256 MiB and sends a byte must not make us hold 256 MiB.
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Callable
from typing import Final

__all__ = ["FRESH_MIN", "fresh"]

#: From this size up, a message is received into memory prepared by :func:`fresh`: 32 MiB
#: is glibc's largest mmap threshold. A smaller ``bytes`` reuses freed heap memory, already
#: faulted in, and preparing it measured slower (1 and 16 MiB copies).
FRESH_MIN: Final = 32 * 1024 * 1024

#: madvise() advice (Linux): back with transparent huge pages where the system allows it
#: ("madvise" mode), and fault the whole range in with one call (5.14+; ignored before).
_MADV_HUGEPAGE: Final = 14
_MADV_POPULATE_WRITE: Final = 23
_PAGE: Final = mmap.PAGESIZE

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


def fresh(length: int, *, huge: bool, populate: bool = False) -> tuple[bytes, memoryview] | None:
    """A new ``bytes`` of ``length`` bytes, uninitialised, and a writable view of its
    storage to fill it through; None where there is no C API to make one, or no room for
    it (the caller makes its ``bytes`` the usual way). ``huge``: back it with huge pages
    where the system allows them (for FRESH_MIN and more); ``populate``: fault it all in
    now, for a copy of data at hand (see the module's doc). The view must be released, and
    the object filled, before the object is handed to anyone: until then nobody else
    holds it."""
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
    start = -(-address // _PAGE) * _PAGE
    end = (address + length) // _PAGE * _PAGE
    if end > start:  # advice only: a kernel without it still gets a correct object
        if huge:
            _madvise(start, end - start, _MADV_HUGEPAGE)
        if populate:
            _madvise(start, end - start, _MADV_POPULATE_WRITE)
    return data, memoryview((ctypes.c_char * length).from_address(address)).cast("B")
