"""The open-file limit of a command that holds many connections (``serve``, ``bridge``,
``tap``): its soft limit raised to the hard limit, as Go programs and systemd's own
daemons do for themselves.

Each client takes a descriptor (a relayed one two), and the soft limit that a login shell
or a systemd service starts with is 1,024, for the sake of old programs that use
``select()``; the hard limit, which only root can raise, is typically 524,288 or more.
Without this, a server under ``ulimit -n`` 1,024 holds about a thousand clients and keeps
the rest waiting in the backlog. udskit never uses ``select()`` on these descriptors.
Programs started for ``--exec`` inherit the raised limit.
"""

from __future__ import annotations

import logging
import resource

__all__ = ["use_every_open_file"]

log = logging.getLogger(__name__)


def use_every_open_file() -> None:
    """Raise RLIMIT_NOFILE's soft limit to its hard limit (nothing to do if it is there)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or (hard != resource.RLIM_INFINITY and soft >= hard):
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:  # an infinite hard limit: the kernel's nr_open caps it
        log.debug("open-file limit left at %d: %s", soft, exc)
        return
    log.debug("open-file limit raised from %d to %d", soft, hard)
