"""What a passed descriptor is, told from /proc/self/fd and fstat (memfd name and size,
pipe, socket, file path), for display; the descriptor itself is relayed untouched."""

from __future__ import annotations

import os
import stat
from typing import Final

from .events import PassedFd

__all__ = ["describe"]

#: What readlink(/proc/self/fd/N) starts with for a memfd, and the suffix every unlinked
#: file gets there.
_MEMFD: Final = "/memfd:"
_DELETED: Final = " (deleted)"


def describe(fd: int) -> PassedFd:
    """The descriptor ``fd`` of this process, described (never raises)."""
    try:
        info = os.fstat(fd)
        link = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return PassedFd(fd, "unknown", "?", None)
    mode = info.st_mode
    if link.startswith(_MEMFD):
        name = link[1:].removesuffix(_DELETED)
        return PassedFd(fd, "memfd", name, info.st_size)
    if stat.S_ISFIFO(mode):
        return PassedFd(fd, "pipe", "pipe", None)
    if stat.S_ISSOCK(mode):
        return PassedFd(fd, "socket", "socket", None)
    if stat.S_ISREG(mode):
        return PassedFd(fd, "file", link, info.st_size)
    if stat.S_ISDIR(mode):
        return PassedFd(fd, "directory", link, None)
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return PassedFd(fd, "device", link, None)
    if link.startswith("anon_inode:"):
        return PassedFd(fd, "anon", link, None)
    return PassedFd(fd, "other", link, None)
