"""Where the shared-memory path starts to win: one-way MB/s through a udskit pair, socket
against shared memory (copy-out with recv(), in place with recv_view()), per message size.

This is the measurement behind udskit.proto.shm.SHARED_THRESHOLD. To measure below the
threshold, the script lowers it in this process only (the constant the blocking Channel
reads); the receiver and the sender are forked processes pinned to different CPUs (when
there are two). Each cell is the median of ``--repeats`` runs.
Run: python benchmarks/shm_threshold.py [--total-mib 256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import udskit
import udskit.channel

SIZES = (16 << 10, 32 << 10, 64 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20)
POOL = 64 << 20

CPUS = sorted(os.sched_getaffinity(0))  # read once: pinning narrows it for this process


def pin(index: int) -> None:
    if len(CPUS) >= 2:
        os.sched_setaffinity(0, {CPUS[index]})


def one_way(size: int, shared: bool, in_place: bool, total: int) -> float:
    """MB/s of ``total`` bytes sent in ``size``-byte messages from a forked sender."""
    count = max(20, total // size)
    a, b = udskit.pair(shared_memory=POOL if shared else False, max_frame=max(size, 16 << 20))
    pid = os.fork()
    if pid == 0:  # the sender
        status = 1
        try:
            b.close()
            pin(1)
            payload = bytes(size)
            for _ in range(count):
                a.send(payload)
            a.recv()  # the receiver is done
            status = 0
        finally:
            os._exit(status)
    a.close()
    pin(0)
    with b:
        started = time.perf_counter()
        for _ in range(count):
            if in_place:
                b.recv_view().release()
            else:
                b.recv()
        seconds = time.perf_counter() - started
        b.send(b"done")
    os.waitpid(pid, 0)
    return count * size / seconds / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--total-mib", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    udskit.channel.SHARED_THRESHOLD = min(SIZES)  # type: ignore[misc]  # measure below it
    total = args.total_mib << 20
    print(f"{'size':>8} {'socket':>8} {'copy-out':>15} {'in place':>15}   (MB/s, x socket)")
    for size in SIZES:
        runs: dict[str, list[float]] = {"socket": [], "copy": [], "view": []}
        for _ in range(args.repeats):
            runs["socket"].append(one_way(size, False, False, total))
            runs["copy"].append(one_way(size, True, False, total))
            runs["view"].append(one_way(size, True, True, total))
        socket_mb, copy_mb, view_mb = (
            statistics.median(runs[k]) for k in ("socket", "copy", "view")
        )
        print(
            f"{size >> 10:>5} KiB {socket_mb:8.0f} {copy_mb:8.0f} {copy_mb / socket_mb:5.2f}x"
            f" {view_mb:8.0f} {view_mb / socket_mb:5.2f}x"
        )


if __name__ == "__main__":
    main()
