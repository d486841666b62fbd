"""udskit.aio against asyncio streams, on asyncio's loop and on uvloop, side by side.

The measurements behind docs/aio.md: a 64-byte round trip (p50, p99) and one-way throughput
at 64 B, 4 KiB, 64 KiB and 1 MiB, for udskit.aio and for StreamReader/StreamWriter, each on
both loops; then udskit.aio with its default 1 MiB socket buffers against the kernel's
default (sndbuf=0, rcvbuf=0). Both ends speak the same wire format (a 4-byte big-endian
length, then the payload) over a socketpair; the server (or reader) runs on the first CPU,
the client (or writer) on the second, in separate processes. Each side gets its endpoint the
way its users do: udskit.aio.pair() (udskit's default buffers), socket.socketpair() for the
streams (the kernel's). Contenders take turns, and each figure is the median of --repeat
runs.

Asyncio streams round trips measure faster in a process that has run for a while than in a
fresh one (about 80 against 90-115 us here; udskit.aio measures the same either way): with
--fresh, every round-trip run starts two new interpreters, as a short-lived client would.

Run: python benchmarks/aio_compare.py [--repeat 5] [--round-trips 5000] [--total-mib 256]
     [--fresh] [--round-trips-only]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

import uvloop

import udskit.aio

CPUS = sorted(os.sched_getaffinity(0))  # read once: pinning narrows it for this process
SIZES = (64, 4096, 65536, 1 << 20)
HEADER = struct.Struct(">I")
CONTENDERS = ("aio-asyncio", "aio-uvloop", "streams-asyncio", "streams-uvloop")

Side = Callable[[Any, dict[str, Any]], Coroutine[Any, Any, Any]]


def pin(index: int) -> None:
    if len(CPUS) > 1:
        os.sched_setaffinity(0, {CPUS[index]})


def run(contender: str, side: Side, end: Any, job: dict[str, Any]) -> Any:
    loop = uvloop.new_event_loop if contender.endswith("uvloop") else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=loop) as runner:
        return runner.run(side(end, job))


# -- udskit.aio ------------------------------------------------------------------------------
async def aio_echo(channel: udskit.aio.Channel, job: dict[str, Any]) -> None:
    async with channel:
        async for message in channel:
            await channel.send(message)


async def aio_ping(channel: udskit.aio.Channel, job: dict[str, Any]) -> list[int]:
    payload, times = bytes(64), []
    async with channel:
        for _ in range(job["count"]):
            start = time.perf_counter_ns()
            await channel.send(payload)
            await channel.recv()
            times.append(time.perf_counter_ns() - start)
    return times


async def aio_read(channel: udskit.aio.Channel, job: dict[str, Any]) -> None:
    async with channel:
        async for _ in channel:
            pass


async def aio_write(channel: udskit.aio.Channel, job: dict[str, Any]) -> None:
    payload = bytes(job["size"])
    async with channel:
        for _ in range(job["count"]):
            await channel.send(payload)


# -- asyncio streams -------------------------------------------------------------------------
async def streams_echo(sock: socket.socket, job: dict[str, Any]) -> None:
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    try:
        while True:
            header = await reader.readexactly(HEADER.size)
            writer.write(header + await reader.readexactly(HEADER.unpack(header)[0]))
            await writer.drain()
    except asyncio.IncompleteReadError:
        writer.close()


async def streams_ping(sock: socket.socket, job: dict[str, Any]) -> list[int]:
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    frame, times = HEADER.pack(64) + bytes(64), []
    for _ in range(job["count"]):
        start = time.perf_counter_ns()
        writer.write(frame)
        await writer.drain()
        await reader.readexactly(HEADER.unpack(await reader.readexactly(HEADER.size))[0])
        times.append(time.perf_counter_ns() - start)
    writer.close()
    return times


async def streams_read(sock: socket.socket, job: dict[str, Any]) -> None:
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    try:
        while True:
            await reader.readexactly(HEADER.unpack(await reader.readexactly(HEADER.size))[0])
    except asyncio.IncompleteReadError:
        writer.close()


async def streams_write(sock: socket.socket, job: dict[str, Any]) -> None:
    _, writer = await asyncio.open_unix_connection(sock=sock)
    frame = HEADER.pack(job["size"]) + bytes(job["size"])
    for _ in range(job["count"]):
        writer.write(frame)
        await writer.drain()
    writer.close()
    await writer.wait_closed()


SIDES: dict[str, tuple[Side, Side, Side, Side]] = {
    "aio": (aio_echo, aio_ping, aio_read, aio_write),
    "streams": (streams_echo, streams_ping, streams_read, streams_write),
}


def two_processes(contender: str, server: Side, client: Side, job: dict[str, Any]) -> Any:
    """``server`` in a child pinned to the first CPU, ``client`` here on the second."""
    ends: tuple[Any, Any]
    if contender.startswith("aio"):
        ends = udskit.aio.pair(**job.get("options", {}))
    else:
        ends = socket.socketpair()
    ours, theirs = ends
    pid = os.fork()
    if pid == 0:
        ours.close()
        pin(0)
        try:
            run(contender, server, theirs, job)
        finally:
            os._exit(0)
    theirs.close()
    pin(1)
    start = time.perf_counter()
    try:
        result = run(contender, client, ours, job)
    finally:
        ours.close()
        os.waitpid(pid, 0)
    return result, time.perf_counter() - start


def round_trip(contender: str, count: int, *, fresh: bool = False) -> tuple[float, float]:
    if fresh:
        out = subprocess.run(
            [sys.executable, __file__, "--one-round-trip", contender, str(count)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        return float(out[0]), float(out[1])
    kind = contender.split("-", maxsplit=1)[0]
    echo, ping, _, _ = SIDES[kind]
    times, _ = two_processes(contender, echo, ping, {"count": count})
    times = sorted(times[count // 10 :])  # the first tenth warms up
    return times[len(times) // 2] / 1000, times[int(len(times) * 0.99)] / 1000


def one_way(contender: str, size: int, total: int, options: dict[str, Any] | None = None) -> float:
    kind = contender.split("-", maxsplit=1)[0]
    _, _, read, write = SIDES[kind]
    count = max(total // size, 2000)
    job = {"size": size, "count": count, "options": options or {}}
    _, seconds = two_processes(contender, read, write, job)
    return count / seconds


def median(measure: Callable[[], float], repeat: int) -> float:
    return statistics.median(measure() for _ in range(repeat))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per figure (median)")
    parser.add_argument("--round-trips", type=int, default=5000, help="round trips per run")
    parser.add_argument("--total-mib", type=int, default=256, help="one-way bytes per run")
    parser.add_argument(
        "--fresh", action="store_true", help="each round-trip run in new interpreters"
    )
    parser.add_argument("--round-trips-only", action="store_true", help="skip the one-way runs")
    parser.add_argument("--one-round-trip", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_round_trip:  # a --fresh child
        p50, p99 = round_trip(args.one_round_trip[0], int(args.one_round_trip[1]))
        print(p50, p99)
        return
    total = args.total_mib << 20
    where = f"server/reader cpu {CPUS[0]}, client/writer cpu {CPUS[1]}" if len(CPUS) > 1 else ""
    fresh = ", each round-trip run in new interpreters" if args.fresh else ""
    print(f"pinning: {where or 'unpinned (one CPU)'}; median of {args.repeat} runs{fresh}")

    print(
        "\n64 B round trip, p50 / p99 (us); ratio of p50 to streams on the same loop; "
        "the p50 of every run"
    )
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in CONTENDERS}
    for _ in range(args.repeat):
        for name in CONTENDERS:  # taking turns, so drift hits every contender alike
            runs[name].append(round_trip(name, args.round_trips, fresh=args.fresh))
    p50 = {name: statistics.median(r[0] for r in runs[name]) for name in CONTENDERS}
    for name in CONTENDERS:
        p99 = statistics.median(r[1] for r in runs[name])
        base = p50["streams-" + name.split("-")[1]]
        spread = " ".join(f"{r[0]:.0f}" for r in sorted(runs[name]))
        print(f"  {name:16} {p50[name]:7.1f} / {p99:7.1f}   {p50[name] / base:.2f}x   ({spread})")

    if args.round_trips_only:
        return
    print("\none-way, messages/s; ratio to streams on the same loop")
    print("  " + " " * 16 + "".join(f"{_size_name(size):>16}" for size in SIZES))
    rates = {
        name: [median(lambda n=name, s=size: one_way(n, s, total), args.repeat) for size in SIZES]
        for name in CONTENDERS
    }
    for name in CONTENDERS:
        base = rates["streams-" + name.split("-")[1]]
        cells = "".join(
            f"{rate / 1000:9.1f}k {rate / ref:4.1f}x"
            for rate, ref in zip(rates[name], base, strict=True)
        )
        print(f"  {name:16}{cells}")

    print("\nudskit.aio one-way, messages/s: 1 MiB socket buffers (default) vs the kernel's")
    for name in ("aio-asyncio", "aio-uvloop"):
        for size in (65536, 1 << 20):
            ours = median(lambda n=name, s=size: one_way(n, s, total), args.repeat)
            kernel = median(
                lambda n=name, s=size: one_way(n, s, total, {"sndbuf": 0, "rcvbuf": 0}),
                args.repeat,
            )
            print(
                f"  {name:16}{_size_name(size):>8}: {ours / 1000:7.1f}k vs {kernel / 1000:7.1f}k"
                f"  ({ours / kernel:.2f}x)"
            )


def _size_name(size: int) -> str:
    if size >= 1 << 20:
        return f"{size >> 20} MiB"
    return f"{size >> 10} KiB" if size >= 1024 else f"{size} B"


if __name__ == "__main__":
    main()
