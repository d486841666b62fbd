"""Connect to a socket as another user, for real: a forked child drops to that user's uid,
gid and groups, connects, and reports through its exit status. No exec, so it needs no
read access to the interpreter or the source tree."""

from __future__ import annotations

import os
import pwd
import select
import signal
import socket
import warnings
from pathlib import Path

from ..conftest import READY_TIMEOUT


def connect_as(user: str, path: Path) -> str:
    """'connected', or the reason the kernel gave ('permission denied', ...)."""
    entry = pwd.getpwnam(user)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads: see below
        pid = os.fork()
    if pid == 0:  # the child only makes these few calls and leaves with _exit
        code = 255
        try:
            os.initgroups(user, entry.pw_gid)
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)
            with socket.socket(socket.AF_UNIX) as sock:
                code = sock.connect_ex(str(path))
        finally:
            os._exit(code)
    pidfd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], READY_TIMEOUT)
        if not ready:
            os.kill(pid, signal.SIGKILL)
    finally:
        os.close(pidfd)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    assert 0 <= code < 255, f"the child connecting as {user} failed (status {code})"
    return "connected" if code == 0 else os.strerror(code).lower()
