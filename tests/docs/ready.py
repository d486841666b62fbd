"""Wait until a background job of a documented session is ready to be talked to.

Usage: ``python ready.py PID``. Returns once the process PID, or one of its descendants,
holds a listening socket (Unix stream or seqpacket, TCP), or a named datagram socket, or
once PID has exited (a client sent to the background, such as a datagram sender, is then
done). A listener counts only once its socket file is in place: udskit binds in a private
directory and links the file to its path afterwards.

It only reads /proc: it never connects, so a server that serves one client (``--once``)
still has its one client left. Exit 1, with one line on stdout, if nothing happened within
READY_TIMEOUT.
"""

from __future__ import annotations

import os
import re
import sys
import time

#: Upper bound for a documented server to come up: generous, since CI machines stall.
READY_TIMEOUT = 20.0

#: /proc/net/unix's flag for a listening socket (__SO_ACCEPTCON).
_ACCEPTCON = 0x10000

#: /proc/net/unix's socket type of a datagram socket (SOCK_DGRAM).
_DGRAM = 2

#: /proc/net/tcp's state of a listening socket (TCP_LISTEN).
_TCP_LISTEN = "0A"

#: Where a udskit listener binds before its file is linked into place.
_PRIVATE = re.compile(r"^(?P<dir>.*)/\.udskit-[0-9a-z]+/(?P<name>[^/]+)$")


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _socket_inodes(root: int) -> set[int]:
    tree = _children()
    pids, inodes = [root], set()
    while pids:
        pid = pids.pop()
        pids += tree.get(pid, [])
        try:
            names = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for name in names:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{name}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


def _unix_ready(inodes: set[int]) -> bool:
    with open("/proc/net/unix", encoding="utf-8", errors="surrogateescape") as f:
        rows = f.read().splitlines()[1:]
    for row in rows:
        fields = row.split(None, 7)
        if len(fields) < 7 or int(fields[6]) not in inodes:
            continue
        path = fields[7] if len(fields) > 7 else ""
        listening = int(fields[3], 16) & _ACCEPTCON
        if not (listening or (int(fields[4], 16) == _DGRAM and path)):
            continue
        if not path or path.startswith("@"):
            return True
        private = _PRIVATE.match(path)
        if private:
            path = f"{private['dir']}/{private['name']}"
        if os.path.lexists(path):
            return True
    return False


def _tcp_ready(inodes: set[int]) -> bool:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 9 and fields[3] == _TCP_LISTEN and int(fields[9]) in inodes:
                return True
    return False


def _exited(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def main() -> int:
    pid = int(sys.argv[1])
    deadline = time.monotonic() + READY_TIMEOUT
    delay = 0.002
    while not _exited(pid):
        inodes = _socket_inodes(pid)
        if inodes and (_unix_ready(inodes) or _tcp_ready(inodes)):
            return 0
        if time.monotonic() > deadline:
            print(f"[doc check: the background job {pid} did not listen within {READY_TIMEOUT} s]")
            return 1
        time.sleep(delay)  # back-off between looks at /proc, not synchronisation
        delay = min(delay * 2, 0.05)
    return 0


if __name__ == "__main__":
    sys.exit(main())
