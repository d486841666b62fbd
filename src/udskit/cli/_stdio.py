"""Standard descriptors 0, 1 and 2, held open for the whole command.

A command started with one of them closed (``udskit connect PATH <&-``, a daemon that
closed its stdin) would otherwise give that number to the first socket it opens: ``connect``
then read its own socket as its input and hung, and ``send --reply PATH MSG >&-`` wrote the
reply back into the socket and exited 0. Each closed one is opened on /dev/null, read-only:
a closed stdin reads as empty (end of input, as ``nc -U`` sees it), and a write to a closed
stdout or stderr fails (EBADF) as it would have, instead of going to a socket.
"""

from __future__ import annotations

import errno
import os
from typing import Final

__all__ = ["hold_standard_fds"]

#: stdin, stdout and stderr.
_STANDARD: Final = (0, 1, 2)


def hold_standard_fds() -> None:
    """Open /dev/null (read-only) on every one of descriptors 0, 1 and 2 that is closed."""
    for fd in _STANDARD:
        try:
            os.fstat(fd)
        except OSError as exc:
            if exc.errno != errno.EBADF:
                raise
            # open() takes the lowest free number, this one (the lower ones are open now);
            # inheritable, as a standard descriptor is, for the programs --exec and pair run.
            held = os.open(os.devnull, os.O_RDONLY)
            os.set_inheritable(held, True)
