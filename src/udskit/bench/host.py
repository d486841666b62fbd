"""Facts about this host and the few settings a run changes: CPU pinning, descriptor limit."""

from __future__ import annotations

import os
import resource
import sys
from dataclasses import dataclass
from typing import Final

__all__ = [
    "FD_HEADROOM",
    "Pinning",
    "choose_pinning",
    "describe_host",
    "pin",
    "raise_nofile",
    "somaxconn",
]

#: Descriptors a peer needs besides one per client: the interpreter, the listener, epoll,
#: pipes, shared libraries, and uvloop's internal handles. Both peers of a many-clients
#: measurement hold one descriptor per client (the load generator its clients' sockets, the
#: echo server their accepted ones), so each raises its own limit to clients + FD_HEADROOM.
FD_HEADROOM: Final = 256

#: Optional libraries whose versions a result file records.
_LIBRARIES: Final = ("pyzmq", "uvloop", "matplotlib")


@dataclass(frozen=True, slots=True)
class Pinning:
    """Where the server and the client run. ``None``: not pinned (the scheduler decides)."""

    server_cpu: int | None
    client_cpu: int | None
    note: str

    @property
    def pinned(self) -> bool:
        return self.server_cpu is not None


def choose_pinning(allowed: set[int] | None = None) -> Pinning:
    """Server and client on two different CPUs this process may use, when it may use two.

    The lowest-numbered two are chosen so that repeated runs on one machine compare.
    """
    cpus = sorted(os.sched_getaffinity(0) if allowed is None else allowed)
    if len(cpus) >= 2:
        server, client = cpus[0], cpus[1]
        return Pinning(
            server,
            client,
            f"server pinned to CPU {server}, client and load generator to CPU {client}",
        )
    only = f"CPU {cpus[0]}" if cpus else "no CPU"
    return Pinning(None, None, f"unpinned: this process may use only {only}")


def pin(cpu: int | None) -> None:
    """Pin the calling process (its main thread, and threads it starts later) to ``cpu``."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def raise_nofile(needed: int) -> str | None:
    """Raise RLIMIT_NOFILE's soft limit to at least ``needed`` (up to the hard limit).

    Returns None when ``needed`` descriptors are now allowed, else one line saying which
    limit, what it is, and how to raise it. Child processes inherit the raised limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if _allows(soft, needed):
        return None
    if _allows(hard, needed):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
        except (ValueError, OSError) as exc:
            # Not seen on Linux below the hard limit; a seccomp or LSM policy could do it.
            return (
                f"RLIMIT_NOFILE (open files) is {soft}, below the {needed} descriptors needed, "
                f"and setrlimit refused to raise it to {needed} ({exc}); "
                f"run `ulimit -n {needed}` in the shell first"
            )
        return None
    return (
        f"RLIMIT_NOFILE (open files) is {soft}, hard limit {_shown(hard)}, below the {needed} "
        f"descriptors needed, and only root can raise a hard limit; raise it (as root, "
        f"`ulimit -Hn {needed}`, or nofile in /etc/security/limits.conf), then "
        f"`ulimit -n {needed}`, and run again"
    )


def _allows(limit: int, needed: int) -> bool:
    return limit == resource.RLIM_INFINITY or limit >= needed


def _shown(limit: int) -> str:
    return "unlimited" if limit == resource.RLIM_INFINITY else str(limit)


def somaxconn() -> int | None:
    """net.core.somaxconn: the kernel's cap on any listen() backlog (4096 since Linux 5.4,
    128 before); None when /proc does not say."""
    try:
        with open("/proc/sys/net/core/somaxconn", encoding="ascii") as value:
            return int(value.read())
    except (OSError, ValueError):
        return None


def describe_host() -> dict[str, object]:
    """What a reader needs to compare results from two machines."""
    # Imported here: every peer process imports this module for pin(), and these cost
    # more to import than pin() does to run.
    import platform
    from importlib import metadata

    libraries: dict[str, str | None] = {}
    for name in _LIBRARIES:
        try:
            libraries[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            libraries[name] = None
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpus_online": os.cpu_count(),
        "cpus_allowed": len(os.sched_getaffinity(0)),
        "somaxconn": somaxconn(),
        "nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
        "libraries": libraries,
    }


def _cpu_model() -> str:
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
