"""Socket files nobody listens on any more."""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
import time
from dataclasses import dataclass, field

from ..sockfile import PRIVATE_PREFIX
from .probe import try_connect

__all__ = ["StaleSocket", "find_stale"]


@dataclass(frozen=True, slots=True)
class StaleSocket:
    """A socket file nobody listens on: connecting to it is refused."""

    path: str
    uid: int
    gid: int
    mtime: float
    age: float = field(default=0.0)  # seconds since it was last modified (created)

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def find_stale(directory: str | os.PathLike[str]) -> list[StaleSocket]:
    """Socket files under ``directory`` (recursively) that nobody listens on.

    A socket counts as stale when connecting with every socket type is refused
    (ECONNREFUSED): no process holds a socket bound there. Files we may not connect to
    (EACCES) are left out: we cannot tell. udskit's private claim directories are skipped.
    """
    top = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(top):
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", top)
    now = time.time()
    found: list[StaleSocket] = []
    for here, dirs, files in os.walk(top):
        dirs[:] = sorted(d for d in dirs if not os.fsencode(d).startswith(PRIVATE_PREFIX))
        for name in sorted(files):
            path = os.path.join(here, name)
            try:
                info = os.lstat(path)
            except OSError:
                continue
            if not stat.S_ISSOCK(info.st_mode):
                continue
            attempt = try_connect(path)
            if not attempt.ok and attempt.errno == errno.ECONNREFUSED:
                found.append(
                    StaleSocket(
                        path, info.st_uid, info.st_gid, info.st_mtime, max(0.0, now - info.st_mtime)
                    )
                )
    return found
