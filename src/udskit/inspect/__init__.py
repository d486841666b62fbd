"""Diagnostics: why a connect fails, which Unix sockets exist, which socket files are stale.

Three questions, each answered with typed values (frozen dataclasses), never text to parse:

* :func:`diagnose` ("why can't I connect?", ``udskit doctor``): walks the path as a given
  user would, tries to connect, and returns a :class:`Diagnosis` whose ``findings`` say what
  is wrong and the exact fix, one :class:`Finding` per cause;
* :func:`list_sockets` (``udskit ls``): the host's Unix sockets from sock_diag (or
  ``/proc/net/unix``), with their owning processes from ``/proc/*/fd``;
* :func:`find_stale` (``udskit ls --stale``): socket files nobody listens on any more.

:func:`try_connect` is the probe under all three (and under ``udskit wait``): one
non-blocking connect that reports what happened.

How permission is judged (path_resolution(7)): to reach ``/a/b/app.sock`` a process needs
search (x) permission on ``/``, ``/a`` and ``/a/b``, and write (w) permission on the socket
itself. For each file the kernel uses exactly one class of bits: the owner's if the process
runs as the owner, else the group's if the file's group is among the process's groups, else
the others'. Root (CAP_DAC_OVERRIDE) passes every such check. POSIX ACLs and security
modules (AppArmor, SELinux) can refuse what the bits allow; where a file carries an ACL we
say so, and a refusal the bits do not explain is reported as such.
"""

from __future__ import annotations

from .doctor import diagnose
from .findings import Diagnosis, FileInfo, Finding, ServerInfo, Status, UserInfo
from .probe import Attempt, try_connect
from .sockets import SocketEntry, list_sockets
from .stale import StaleSocket, find_stale

__all__ = [
    "Attempt",
    "Diagnosis",
    "FileInfo",
    "Finding",
    "ServerInfo",
    "SocketEntry",
    "StaleSocket",
    "Status",
    "UserInfo",
    "diagnose",
    "find_stale",
    "list_sockets",
    "try_connect",
]
