"""A server's memory per connected client: its resident set size (RSS) read from /proc when
it is ready with no client, and again with all N clients connected, the growth over N.

The runner reads ``/proc/PID/smaps_rollup`` (Linux 4.14 and later), which sums the page
tables as they are at the moment of reading. ``VmRSS`` in ``/proc/PID/status`` is the
fallback only: it comes from counters the kernel updates lazily (before Linux 6.2 each thread
kept its own count and folded it in every 64 page faults; since, per-CPU counters are folded
in batches), so for a server with a thread per client it can lag behind.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ServerMemory", "rss_kib"]


@dataclass(frozen=True, slots=True)
class ServerMemory:
    """The server's RSS when ready (no client) and with ``clients`` connected, in KiB."""

    ready_kib: int
    connected_kib: int
    clients: int

    @property
    def kib_per_client(self) -> float:
        """RSS growth per connected client, in KiB (negative if the RSS shrank)."""
        return (self.connected_kib - self.ready_kib) / self.clients


def rss_kib(pid: int) -> int | None:
    """Resident set size of process ``pid`` in KiB; None if /proc cannot tell (the process
    has exited: ENOENT or ESRCH; another user's process: EACCES)."""
    for path, key in ((f"/proc/{pid}/smaps_rollup", "Rss:"), (f"/proc/{pid}/status", "VmRSS:")):
        try:
            with open(path, encoding="ascii", errors="replace") as lines:
                for line in lines:
                    if line.startswith(key):
                        return int(line.split()[1])  # "Rss:   12345 kB"
        except (OSError, ValueError, IndexError):
            continue
    return None
