"""``udskit tap``: what it costs, and that starting and stopping it loses nothing.

Three measurements, each against the same echo/sink server (a separate process):

* cycles: the tap is started and stopped ``--cycles`` times (library API, this process)
  while a load generator (another process) opens a connection every millisecond and 50
  connections exchange messages without pause; each connection checks every echo byte for
  byte. Reported: failed connects, lost/changed/reordered bytes, and whether the server's
  socket inode was back at PATH after every cycle. Target: all zero, inode always back.
* throughput: a client sends ``--size-mib`` MiB in 64 KiB writes to a sink that answers
  with the count: directly, through ``udskit bridge`` (unix to unix) and through ``udskit
  tap`` (its text output to /dev/null). Target: tap >= 0.8x bridge.
* round trip: 64-byte messages echoed one at a time (median of ``--pings``): directly, via
  the bridge, via the tap; the hop's added round trip is (via - direct). Target: the tap's
  added round trip <= 2x the bridge's (one relay hop).

Throughput and round trip are measured ``--rounds`` times, directly and through each
relay in each round (the bridge and the tap taking turns to go first); the ratios are of
the medians (and of the best figures, shown too). ``--pin CPU`` runs the server, the
client and the relay on that one CPU: each hop's cost in CPU time, without the cross-CPU
wake-ups that make round trips on a virtual machine vary by a factor of five; unpinned,
the three share the machine's CPUs.

Run: python benchmarks/tap.py [--cycles 100] [--size-mib 256] [--pings 20000] [--rounds 5]
     [--pin CPU] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from udskit import tap

READY_TIMEOUT = 20.0
CHUNK = 64 * 1024
PING = 64


# -- the server (a process of its own) ---------------------------------------------------
def _serve(path: str) -> None:
    """Echo every read back; a connection that starts with b'SINK' is drained and answered
    with the byte count instead."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(4096)

    def handle(conn: socket.socket) -> None:
        with conn:
            first = conn.recv(CHUNK)
            if first.startswith(b"SINK"):
                total = len(first) - 4
                while data := conn.recv(1 << 20):
                    total += len(data)
                conn.sendall(b"%d" % total)
                return
            data = first
            while data:
                conn.sendall(data)
                data = conn.recv(CHUNK)

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def _wait_connectable(path: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(path)
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
        time.sleep(0.01)


# -- cycles -----------------------------------------------------------------------------
def _steady(path: str, stop: Any, report: Any) -> None:
    """50 connections exchanging random messages without pause, each echo checked."""
    mismatches = exchanges = failed_connects = 0
    lock = threading.Lock()

    def one(seed: int) -> None:
        nonlocal mismatches, exchanges, failed_connects
        rng = random.Random(seed)
        try:
            conn = socket.socket(socket.AF_UNIX)
            conn.connect(path)
        except OSError:
            with lock:
                failed_connects += 1
            return
        with conn:
            while not stop.is_set():
                message = rng.randbytes(rng.randint(1, 4096))
                conn.sendall(message)
                got = b""
                while len(got) < len(message):
                    chunk = conn.recv(len(message) - len(got))
                    if not chunk:
                        break
                    got += chunk
                with lock:
                    exchanges += 1
                    mismatches += got != message

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    report.put(
        {
            "steady_failed_connects": failed_connects,
            "steady_mismatches": mismatches,
            "steady_exchanges": exchanges,
        }
    )


def _opener(path: str, stop: Any, report: Any) -> None:
    """A new connection every millisecond (one message each, its echo checked)."""
    failed = mismatches = opened = 0
    n = 0
    next_at = time.monotonic()
    while not stop.is_set():
        n += 1
        message = b"%d\n" % n
        try:
            with socket.socket(socket.AF_UNIX) as conn:
                conn.connect(path)
                opened += 1
                conn.sendall(message)
                got = b""
                while len(got) < len(message):
                    chunk = conn.recv(64)
                    if not chunk:
                        break
                    got += chunk
                mismatches += got != message
        except OSError:
            failed += 1
        next_at += 0.001
        time.sleep(max(0.0, next_at - time.monotonic()))
    report.put(
        {"opened": opened, "opener_failed_connects": failed, "opener_mismatches": mismatches}
    )


def cycles(path: str, count: int) -> dict[str, object]:
    server_inode = os.lstat(path).st_ino
    stop = multiprocessing.Event()
    report: Any = multiprocessing.Queue()
    loads = [
        multiprocessing.Process(target=target, args=(path, stop, report))
        for target in (_steady, _opener)
    ]
    for load in loads:
        load.start()
    time.sleep(0.5)  # let the load reach its pace before the first cycle
    inode_back = 0
    started = time.monotonic()
    for _ in range(count):
        running = tap.start(path, lambda event: None)
        time.sleep(0.02)  # relay for a moment
        running.stop(grace=None)
        inode_back += os.lstat(path).st_ino == server_inode
    elapsed = time.monotonic() - started
    stop.set()
    result: dict[str, object] = {}
    for _ in loads:
        result.update(report.get(timeout=READY_TIMEOUT * 3))
    for load in loads:
        load.join(READY_TIMEOUT)
    rate = float(result["opened"]) / (elapsed + 0.5)  # type: ignore[arg-type]
    return {
        "cycles": count,
        "inode_back_after": inode_back,
        "seconds": round(elapsed, 2),
        "connections_per_s": round(rate),
        **result,
    }


# -- throughput and round trip ------------------------------------------------------------
def throughput(path: str, size: int) -> float:
    """MB/s from the first byte to the sink's count."""
    block = b"x" * CHUNK
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(path)
        started = time.perf_counter()
        conn.sendall(b"SINK")
        for _ in range(size // CHUNK):
            conn.sendall(block)
        conn.shutdown(socket.SHUT_WR)
        answer = conn.recv(64)
        elapsed = time.perf_counter() - started
    assert int(answer) == size // CHUNK * CHUNK, answer
    return size / elapsed / 1e6


def round_trip(path: str, pings: int) -> float:
    """Median round trip of a 64-byte message, in microseconds."""
    message = b"p" * PING
    times = []
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(path)
        for _ in range(pings):
            started = time.perf_counter()
            conn.sendall(message)
            got = 0
            while got < PING:
                got += len(conn.recv(PING - got))
            times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def _front(kind: str, path: str, work: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A bridge or tap process in front of the server at ``path``; where clients go."""
    if kind == "bridge":
        front = str(work / "bridge.sock")
        process = subprocess.Popen(
            [sys.executable, "-m", "udskit", "bridge", front, path],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_connectable(front)
        return process, front
    aside = Path(path).with_name("." + Path(path).name + ".udskit-tapped")
    process = subprocess.Popen(
        [sys.executable, "-m", "udskit", "tap", path],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + READY_TIMEOUT
    while not (aside.exists() and os.lstat(path).st_ino != os.lstat(aside).st_ino):
        assert time.monotonic() < deadline, "the tap did not start"
        time.sleep(0.01)
    return process, path


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGINT)
    process.wait(READY_TIMEOUT)


def _ratios(which: str, figures: dict[str, dict[str, float]]) -> dict[str, float]:
    """The targets' ratios: tap over bridge throughput, and the round trip each adds to the
    direct one, tap over bridge."""
    added = {k: figures[k]["rtt_us"] - figures["direct"]["rtt_us"] for k in ("bridge", "tap")}
    return {
        f"{which}_tap_over_bridge_throughput": figures["tap"]["mb_per_s"]
        / figures["bridge"]["mb_per_s"],
        f"{which}_added_rtt_us_bridge": added["bridge"],
        f"{which}_added_rtt_us_tap": added["tap"],
        f"{which}_tap_over_bridge_added_rtt": added["tap"] / added["bridge"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=100)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--pings", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pin", type=int, metavar="CPU", help="run every process on this CPU")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tapbench-") as tmp:
        work = Path(tmp)
        path = str(work / "server.sock")
        server = multiprocessing.Process(target=_serve, args=(path,), daemon=True)
        server.start()
        _wait_connectable(path)
        results: dict[str, object] = {"cycles": cycles(path, args.cycles)}
        print(json.dumps(results["cycles"]), flush=True)
        figures: dict[str, dict[str, list[float]]] = {
            k: {"mb_per_s": [], "rtt_us": []} for k in ("direct", "bridge", "tap")
        }
        size = args.size_mib << 20
        if args.pin is not None:  # the relays started from now on inherit it
            os.sched_setaffinity(0, {args.pin})
            os.sched_setaffinity(server.pid or 0, {args.pin})
        for round_ in range(args.rounds):
            figures["direct"]["mb_per_s"].append(throughput(path, size))
            figures["direct"]["rtt_us"].append(round_trip(path, args.pings))
            # Each goes first in every other round: whichever follows another measurement
            # was measured slower here (by up to a third), whatever it was.
            for kind in ("bridge", "tap") if round_ % 2 == 0 else ("tap", "bridge"):
                process, target = _front(kind, path, work)
                try:
                    figures[kind]["mb_per_s"].append(throughput(target, size))
                    figures[kind]["rtt_us"].append(round_trip(target, args.pings))
                finally:
                    _stop(process)
        best = {
            k: {"mb_per_s": max(v["mb_per_s"]), "rtt_us": min(v["rtt_us"])}
            for k, v in figures.items()
        }
        median = {
            k: {
                "mb_per_s": statistics.median(v["mb_per_s"]),
                "rtt_us": statistics.median(v["rtt_us"]),
            }
            for k, v in figures.items()
        }
        results["relay"] = {
            "pinned_to_cpu": args.pin,
            "rounds": figures,
            "median": median,
            "best": best,
            **_ratios("median", median),
            **_ratios("best", best),
        }
        print(json.dumps(results["relay"], indent=2))
        server.terminate()
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
