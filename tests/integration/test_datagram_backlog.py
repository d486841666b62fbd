"""A datagram MessageServer with workers reads no faster than they handle: while they are
busy, datagrams wait in the kernel's queue and senders see it full, as with one thread."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import udskit
from udskit.messageserver import WORKER_BACKLOG
from udskit.serving import DATAGRAMS_PER_WAKEUP

#: Far more datagrams than the server may hold: reaching it means it reads without bound.
FLOOD = 20_000


def test_busy_workers_leave_datagrams_in_the_kernels_queue(sockdir: Path) -> None:
    path = sockdir / "d.sock"
    release = threading.Event()
    handled: list[bytes] = []
    all_handled = threading.Event()
    expected = [FLOOD]

    def handler(conn: udskit.Connection, message: bytes) -> None:
        release.wait()
        handled.append(message)
        if len(handled) == expected[0]:
            all_handled.set()

    server = udskit.MessageServer(path, handler, type="dgram", workers=1)
    serving = threading.Thread(target=server.serve_forever)
    serving.start()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            # Blocking, bounded: a send waits while the server's queue is full.
            sender.settimeout(0.5)
            sent = 0
            while sent < FLOOD:
                try:
                    sender.sendto(b"%d" % sent, os.fspath(path))
                except TimeoutError:
                    break
                sent += 1
        with open("/proc/sys/net/unix/max_dgram_qlen") as f:
            kernel_queue = int(f.read())
        # Held by the server: the workers' backlog, the batch that filled it, plus the
        # kernel's queue (and one it lets past its limit).
        assert sent <= WORKER_BACKLOG + DATAGRAMS_PER_WAKEUP + kernel_queue + 1
        expected[0] = sent
        release.set()
        assert all_handled.wait(10)
        assert handled == [b"%d" % n for n in range(sent)]  # every one, in order
    finally:
        release.set()
        server.stop()
        serving.join()
