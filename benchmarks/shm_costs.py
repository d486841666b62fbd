"""What one shared-memory message costs, apart from the wake-ups between two processes.

Two measurements behind the figures in docs/shared-memory.md:

* **per message, one thread on one CPU**: a udskit pair passes messages back and forth in
  one thread, so no process ever waits for another: what is left is the CPU time of the
  handoff itself (records, checks, views, releases) and of the copies. Beside it, the
  hand-written handoff ``udskit bench`` compares against (a multiprocessing.shared_memory
  block, the slot number and the acknowledgement through two pipes), also in one thread.
  Modes: ``loan`` (nothing copied: the handoff alone), ``view`` (one copy, in) and ``copy``
  (two copies, in and out).
* **one copy, by size**: ``send()`` of one message into pool pages used before, alone (no
  receiver wakes): the one copy of the in-place path, which runs at cache speed only while
  the payload and its slot fit in the processor's cache.
* **one copy, by threads**: one ``memmove`` of 16 and 128 MiB into shared pages used before,
  by one thread, then split between two threads on two CPUs (``ctypes.memmove`` lets go of
  the GIL): how far the copy of the in-place path could go if it took both processors.
* **a fresh pool against a used one**: one 256 MiB message into pool pages never used
  before (the kernel clears and maps each page first), then the same into pages used
  before, and a ``bytes`` of 256 MiB made for a copy-out (fresh pages every time).

The process pins itself to one CPU. Each figure is the median of ``--repeats`` runs.
Run: python benchmarks/shm_costs.py [--repeats 5] [--messages 2000]
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import statistics
import struct
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.shared_memory import SharedMemory

import udskit
from udskit.channel import Channel

SIZES = (256 << 10, 1 << 20)
COPY_SIZES = (1 << 20, 4 << 20, 8 << 20, 16 << 20, 64 << 20)
LARGE = 256 << 20
THREAD_SIZES = (16 << 20, 128 << 20)


def per_message(step: Callable[[], None], messages: int) -> float:
    """Microseconds per call of ``step``."""
    started = time.perf_counter()
    for _ in range(messages):
        step()
    return (time.perf_counter() - started) / messages * 1e6


def udskit_step(a: Channel, b: Channel, mode: str, payload: bytes) -> Callable[[], None]:
    size = len(payload)

    def loan() -> None:
        a.send(a.loan(size))
        b.recv_view().release()

    def view() -> None:
        a.send(payload)
        b.recv_view().release()

    def copy() -> None:
        a.send(payload)
        b.recv()

    return {"loan": loan, "view": view, "copy": copy}[mode]


def handoff_step(buffer: memoryview, payload: bytes, pipes: tuple[int, ...]) -> Callable[[], None]:
    """The hand-written handoff, sender and receiver in turn: copy in, slot number down one
    pipe, copy out, acknowledgement up the other."""
    to_receiver, from_sender, to_sender, from_receiver = pipes
    size = len(payload)
    index = struct.Struct("<I")

    def step() -> None:
        buffer[:size] = payload
        os.write(to_receiver, index.pack(0))
        start = index.unpack(os.read(from_sender, 4))[0] * size
        bytes(buffer[start : start + size])
        os.write(to_sender, b"\x01")
        os.read(from_receiver, 1)

    return step


def measure_per_message(repeats: int, messages: int) -> None:
    print("per message, one thread on one CPU (us, median)")
    print(f"{'size':>9}  {'loan':>7}  {'view':>7}  {'copy':>7}  {'handoff':>8}")
    for size in SIZES:
        payload = bytes(size)
        a, b = udskit.pair(shared_memory=4 * size, max_frame=max(size, 16 << 20))
        block = SharedMemory(create=True, size=size)
        read_1, write_1 = os.pipe()
        read_2, write_2 = os.pipe()
        try:
            assert block.buf is not None
            handoff = handoff_step(block.buf, payload, (write_1, read_1, write_2, read_2))
            row = []
            for mode in ("loan", "view", "copy"):
                step = udskit_step(a, b, mode, payload)
                step()  # the pool's pages faulted in, the peer's pool attached
                row.append(statistics.median(per_message(step, messages) for _ in range(repeats)))
            handoff()
            row.append(statistics.median(per_message(handoff, messages) for _ in range(repeats)))
            del handoff
            print(f"{size >> 10:>6} KiB  " + "  ".join(f"{us:7.1f}" for us in row))
        finally:
            a.close()
            b.close()
            for fd in (read_1, write_1, read_2, write_2):
                os.close(fd)
            block.close()
            block.unlink()


def measure_fresh_pages(repeats: int) -> None:
    payload = os.urandom(1 << 20) * (LARGE >> 20)
    fresh: list[float] = []
    used: list[float] = []
    copied: list[float] = []
    for _ in range(repeats):
        a, b = udskit.pair(shared_memory=LARGE, max_frame=LARGE)
        with a, b:
            for times in (fresh, used):
                started = time.perf_counter()
                a.send(payload)
                times.append(time.perf_counter() - started)
                b.recv_view().release()
            a.send(payload)
            started = time.perf_counter()
            b.recv()
            copied.append(time.perf_counter() - started)
    print(f"\n{LARGE >> 20} MiB, one send() into the pool (ms, median; GB/s of payload)")
    for label, times in (
        ("pages never used before", fresh),
        ("pages used before", used),
        ("recv() into a new bytes", copied),
    ):
        seconds = statistics.median(times)
        print(f"  {label:<25} {seconds * 1e3:7.1f} ms  {LARGE / seconds / 1e9:5.1f} GB/s")


def measure_copy_by_size(repeats: int) -> None:
    print("\none send() into pool pages used before, by size (GB/s of payload, median)")
    for size in COPY_SIZES:
        payload = os.urandom(size)
        speeds: list[float] = []
        a, b = udskit.pair(shared_memory=2 * size, max_frame=size)
        with a, b:
            for _ in range(2):  # both slots used once: no fresh page is timed
                a.send(payload)
                b.recv_view().release()
            for _ in range(repeats):
                started = time.perf_counter()
                a.send(payload)
                speeds.append(size / (time.perf_counter() - started) / 1e9)
                b.recv_view().release()
        print(f"  {size >> 20:>5} MiB  {statistics.median(speeds):5.1f} GB/s")


def timed_copy(to: int, frm: int, size: int, helper: ThreadPoolExecutor | None) -> float:
    """GB/s of one memmove of ``size`` bytes, half of it by ``helper`` if given."""
    started = time.perf_counter()
    if helper is None:
        ctypes.memmove(to, frm, size)
    else:
        half = size // 2
        other = helper.submit(ctypes.memmove, to, frm, half)
        ctypes.memmove(to + half, frm + half, size - half)
        other.result()
    return size / (time.perf_counter() - started) / 1e9


def measure_copy_by_threads(repeats: int) -> None:
    print("\none memmove into shared pages used before, by threads (GB/s, median)")
    print(f"{'size':>9}  {'1 thread':>9}  {'2 threads':>9}")
    with ThreadPoolExecutor(1) as helper:
        for size in THREAD_SIZES:
            source = bytearray(os.urandom(size))
            fd = os.memfd_create("shm-costs")
            try:
                os.ftruncate(fd, size)
                target = mmap.mmap(fd, size)
            finally:
                os.close(fd)
            with target:
                target[:] = source  # every page used once: no fresh page is timed
                to = ctypes.addressof(ctypes.c_char.from_buffer(target))
                frm = ctypes.addressof(ctypes.c_char.from_buffer(source))
                one, two = [], []
                for _ in range(repeats):
                    one.append(timed_copy(to, frm, size, None))
                    two.append(timed_copy(to, frm, size, helper))
            one_thread, two_threads = statistics.median(one), statistics.median(two)
            print(f"  {size >> 20:>5} MiB  {one_thread:9.1f}  {two_threads:9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--messages", type=int, default=2000)
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) > 1:  # before pinning: the two threads need a CPU each
        measure_copy_by_threads(max(args.repeats, 9))
    os.sched_setaffinity(0, {cpus[-1]})
    print(f"\npinned to CPU {cpus[-1]}")
    measure_per_message(args.repeats, args.messages)
    measure_copy_by_size(max(args.repeats, 9))
    measure_fresh_pages(args.repeats)


if __name__ == "__main__":
    main()
