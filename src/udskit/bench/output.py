"""Writing a report file (``--json``, ``--plot``) whole or not at all."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import BinaryIO, Final

__all__ = ["write_whole"]

#: The mode of a report: readable by all, as a file written with the usual umask would be.
REPORT_MODE: Final = 0o644


def write_whole(path: str, write: Callable[[BinaryIO], object], suffix: str) -> None:
    """Write ``path`` through a temporary file beside it, renamed into place once complete:
    a reader never sees half a file.

    The mode is set through the descriptor: in a directory others may write (/tmp, or one
    without the sticky bit), the temporary name may be a symlink by then, and chmod by
    name would make its target world-readable.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, partial = tempfile.mkstemp(prefix=".bench-", suffix=suffix, dir=directory)
    try:
        with os.fdopen(fd, "wb") as out:
            write(out)
            os.fchmod(out.fileno(), REPORT_MODE)
        os.replace(partial, path)
    except BaseException:
        os.unlink(partial)
        raise
