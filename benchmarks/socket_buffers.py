"""One-way AF_UNIX stream throughput for several SO_SNDBUF/SO_RCVBUF sizes, side by side.

This is the measurement behind udskit's DEFAULT_STREAM_BUFFER. The writer and the reader are
separate processes pinned to different CPUs (when there are two); each cell moves the same
number of bytes. Run: python benchmarks/socket_buffers.py [--total-mib 256]
"""

from __future__ import annotations

import argparse
import os
import socket
import time

SIZES = (4096, 65536, 1 << 20)
BUFFERS = (0, 256 << 10, 1 << 20, 4 << 20)  # 0: the kernel's default


CPUS = sorted(os.sched_getaffinity(0))  # read once: pinning narrows it for this process


def pin(index: int) -> str:
    """Pin this process to the index-th CPU we may use; say which."""
    if len(CPUS) < 2:
        return "unpinned (one CPU)"
    os.sched_setaffinity(0, {CPUS[index]})
    return f"cpu {CPUS[index]}"


def one_way(message_size: int, buffer: int, total: int) -> float:
    """MB/s of ``total`` bytes written in ``message_size`` pieces through a socketpair."""
    writer, reader = socket.socketpair()
    if buffer:
        for sock in (writer, reader):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
    pid = os.fork()
    if pid == 0:  # the reader
        writer.close()
        pin(0)
        view = memoryview(bytearray(1 << 20))
        received = 0
        while received < total:
            count = reader.recv_into(view)
            if count == 0:
                break
            received += count
        os._exit(0)
    reader.close()
    pin(1)
    message = b"x" * message_size
    start = time.perf_counter()
    for _ in range(total // message_size):
        writer.sendall(message)
    writer.close()
    os.waitpid(pid, 0)
    return total / (time.perf_counter() - start) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--total-mib", type=int, default=256, help="bytes per cell (MiB)")
    args = parser.parse_args()
    total = args.total_mib << 20
    where = f"reader cpu {CPUS[0]}, writer cpu {CPUS[1]}" if len(CPUS) > 1 else "unpinned"
    print(f"pinning: {where}; {args.total_mib} MiB per cell")
    print(
        "message  " + "  ".join(f"{'default' if b == 0 else f'{b >> 10} KiB':>10}" for b in BUFFERS)
    )
    for size in SIZES:
        cells = [one_way(size, buffer, total) for buffer in BUFFERS]
        base = cells[0]
        print(
            f"{size:>7}  "
            + "  ".join(f"{c / base:>9.2f}x" for c in cells)
            + f"  ({base:.0f} MB/s default)"
        )


if __name__ == "__main__":
    main()
