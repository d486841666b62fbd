"""The blocking Channel's per-message cost in two versions of udskit, side by side.

For checking that a change to the channel's hot paths (locks, checks) costs nothing
measurable: each round runs every version once, in turn, in fresh processes (the measuring
side pinned to one CPU, its peer to the other), and the report gives medians and the ratio
of each version to the first. Run from a checkout, naming the ``src`` folders to compare:

    git worktree add /tmp/udskit-old HEAD~1
    python benchmarks/channel_versions.py /tmp/udskit-old/src src

Figures: 64 B round trip (mean of N, microseconds; also with ``timeout=5`` set on the
measuring side), and one-way 64 B and 64 KiB messages (messages per second, MB/s).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CPUS = sorted(os.sched_getaffinity(0))

#: The measurement, run in a fresh interpreter with one version on its path. It prints JSON.
CHILD = r"""
import json, os, sys, time
import udskit

cpus = sorted(os.sched_getaffinity(0))

def pin(i):
    if len(cpus) > 1:
        os.sched_setaffinity(0, {cpus[i]})

def run(peer, body, timeout=None):
    left, right = udskit.pair()
    left.settimeout(timeout)
    pid = os.fork()
    if pid == 0:
        left.close()
        pin(1)
        try:
            peer(right)
        finally:
            os._exit(0)
    right.close()
    pin(0)
    try:
        return body(left)
    finally:
        left.close()
        os.waitpid(pid, 0)

def echo(ch):
    for msg in ch:
        ch.send(msg)

def sink(ch):  # reads to the end, then says so
    for _ in ch:
        pass
    ch.send(b"done")

N = int(sys.argv[1])

def rtt(ch):
    msg = b"x" * 64
    for _ in range(1000):
        ch.send(msg)
        ch.recv()
    t = time.perf_counter()
    for _ in range(N):
        ch.send(msg)
        ch.recv()
    return (time.perf_counter() - t) / N * 1e6

def one_way(size, count):
    def body(ch):
        msg = b"x" * size
        t = time.perf_counter()
        for _ in range(count):
            ch.send(msg)
        ch.shutdown_write()
        ch.recv()
        return time.perf_counter() - t
    return body

out = {"rtt_64_us": run(echo, rtt), "rtt_64_timeout5_us": run(echo, rtt, timeout=5)}
out["oneway_64_msgs"] = N * 10 / run(sink, one_way(64, N * 10))
out["oneway_64k_MBps"] = 65536 * (N // 4) / run(sink, one_way(65536, N // 4)) / 1e6
print(json.dumps(out))
"""


def measure(src: str, n: int) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(src))
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(n)], env=env, capture_output=True, text=True, check=True
    )
    result: dict[str, float] = json.loads(done.stdout)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", nargs="+", help="src folders of the versions to compare")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("-n", type=int, default=20000, help="round trips per measurement")
    args = parser.parse_args()
    pinning = f"CPUs {CPUS[0]} and {CPUS[1]}" if len(CPUS) > 1 else "unpinned (one CPU)"
    print(f"{args.rounds} rounds, each version once per round, in turn; pinned to {pinning}")
    runs: dict[str, list[dict[str, float]]] = {src: [] for src in args.src}
    started = time.monotonic()
    for _ in range(args.rounds):
        for src in args.src:
            runs[src].append(measure(src, args.n))
    keys = list(runs[args.src[0]][0])
    base = {k: statistics.median(r[k] for r in runs[args.src[0]]) for k in keys}
    print(f"{'version':<40}" + "".join(f"{k:>22}" for k in keys))
    for src in args.src:
        row = f"{src:<40}"
        for k in keys:
            value = statistics.median(r[k] for r in runs[src])
            row += f"{value:>12.1f} ({value / base[k]:.2f}x)"
        print(row)
    print(f"({time.monotonic() - started:.0f} s; rtt: lower is better, the others higher)")


if __name__ == "__main__":
    main()
