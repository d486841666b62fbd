"""Restarts under load: N consecutive listener handovers of a live ``udskit serve --handover``.

While the server is upgraded N times in a row (``udskit.handover.request_upgrade``, what
``udskit upgrade PATH`` does: the server starts a copy of itself, which takes the listening
socket over; the old one finishes its clients within ``--drain-timeout`` and exits), a load
generator:

* opens a new connection every millisecond (connect, one 64-byte request, its reply, close)
  and records how long each took from connect() to the reply: the window in which a new
  connection waits during a handover shows in the tail;
* keeps CLIENTS connections exchanging numbered requests one at a time (each every 10 ms);
  a connection that
  the old server closes when its drain time is up reconnects (to the new one) and sends the
  unanswered request again, so every request must get exactly one reply.

Before the handovers, the same load runs for ``--baseline`` seconds against the same server
with no handover: the latency of new connections then is the yardstick for the tail during
the handovers.

Reported: handovers done, connects that failed (refused, missing socket, reset), requests
without a reply, replies duplicated or wrong, whether the socket file kept its inode after
every handover, the descriptors of the serving process before and after, and the new
connections' latency (median, p99, max) overall.

Pinning: with two CPUs or more, the servers run on the first CPU, the load generator on the
second; the report says so.

Run: python benchmarks/handover.py [--handovers 100] [--clients 50] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field

from udskit.handover import request_upgrade

#: How long the first server has to come up.
START_TIMEOUT = 20.0
#: Socket timeout of every client operation: far above any wait a handover causes, so a
#: client that hits it has found a real stall, counted as a failure.
CLIENT_TIMEOUT = 10.0
#: The load generator's pace: one new connection per this many seconds.
CONNECT_EVERY = 0.001
#: Each persistent client's pace: one exchange per this many seconds (50 clients: 5,000
#: messages a second). Unpaced, they would take all of the load generator's CPU and leave
#: the new connections behind their schedule.
EXCHANGE_EVERY = 0.01
#: Length-framed messages, as ``udskit serve`` speaks by default: 4-byte big-endian length.
HEADER = struct.Struct(">I")
PAYLOAD = 64


@dataclass
class Report:
    handovers: int = 0
    handover_failures: list[str] = field(default_factory=list)
    inode_changes: int = 0
    new_connections: int = 0
    connect_failures: int = 0
    failure_kinds: dict[str, int] = field(default_factory=dict)
    exchanges: int = 0
    reconnects: int = 0
    unanswered: int = 0
    wrong_replies: int = 0
    fds_first: int = 0
    fds_last: int = 0
    old_servers_left: int = 0
    drains_cut: int = 0
    failure_offsets: list[float] = field(default_factory=list)
    latency_us: dict[str, float] = field(default_factory=dict)
    baseline_us: dict[str, float] = field(default_factory=dict)
    during_us: dict[str, float] = field(default_factory=dict)
    during_count: int = 0
    pinning: str = ""
    seconds: float = 0.0


def _frame(data: bytes) -> bytes:
    return HEADER.pack(len(data)) + data


def _read_exact(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionResetError("closed")
        data += chunk
    return bytes(data)


def _exchange(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(_frame(payload))
    (size,) = HEADER.unpack(_read_exact(sock, HEADER.size))
    return _read_exact(sock, size)


class Load:
    """The load generator's threads and what they counted."""

    def __init__(self, path: str, clients: int, report: Report) -> None:
        self.path = path
        self.report = report
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.started: list[float] = []  # when each of those connections began (monotonic)
        self.failed_at: list[float] = []
        self.threads = [threading.Thread(target=self._new_connections, daemon=True)] + [
            threading.Thread(target=self._persistent, args=(n,), daemon=True)
            for n in range(clients)
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(CLIENT_TIMEOUT * 2)

    def _failed(self, exc: BaseException) -> None:
        kind = type(exc).__name__
        self.failed_at.append(time.monotonic())
        with self.lock:
            self.report.connect_failures += 1
            self.report.failure_kinds[kind] = self.report.failure_kinds.get(kind, 0) + 1

    def _new_connections(self) -> None:
        next_at = time.monotonic()
        number = 0
        while not self.stop.is_set():
            number += 1
            payload = b"n%d-" % number
            payload += b"x" * (PAYLOAD - len(payload))
            began = time.perf_counter()
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(CLIENT_TIMEOUT)
                    sock.connect(self.path)
                    reply = _exchange(sock, payload)
            except OSError as exc:
                self._failed(exc)
            else:
                took = time.perf_counter() - began
                with self.lock:
                    self.report.new_connections += 1
                    self.latencies.append(took)
                    self.started.append(time.monotonic() - took)
                    if reply != payload:
                        self.report.wrong_replies += 1
            next_at += CONNECT_EVERY
            pause = next_at - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            else:
                next_at = time.monotonic()  # behind: do not burst to catch up

    def _persistent(self, client: int) -> None:
        sock: socket.socket | None = None
        number = 0
        pending: bytes | None = None
        try:
            while not self.stop.is_set() or pending is not None:
                if pending is None:
                    number += 1
                    pending = b"c%d-%d-" % (client, number)
                    pending += b"y" * (PAYLOAD - len(pending))
                if sock is None:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    sock.settimeout(CLIENT_TIMEOUT)
                    try:
                        sock.connect(self.path)
                    except OSError as exc:
                        self._failed(exc)
                        sock.close()
                        sock = None
                        if self.stop.is_set():
                            break
                        continue
                try:
                    reply = _exchange(sock, pending)
                except (ConnectionResetError, BrokenPipeError):
                    # The old server's drain time ran out: ask the new one.
                    sock.close()
                    sock = None
                    with self.lock:
                        self.report.reconnects += 1
                    continue
                except OSError:
                    with self.lock:
                        self.report.unanswered += 1
                    pending = None
                    sock.close()
                    sock = None
                    continue
                with self.lock:
                    self.report.exchanges += 1
                    if reply != pending:
                        self.report.wrong_replies += 1
                pending = None
                self.stop.wait(EXCHANGE_EVERY)
        finally:
            if sock is not None:
                sock.close()


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_connectable(path: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            if probe.connect_ex(path) == 0:
                return
        time.sleep(0.01)
    raise SystemExit(f"the server did not start at {path} within {START_TIMEOUT:g} s")


def _spread(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    if not ordered:
        return {}
    return {
        "median": statistics.median(ordered) * 1e6,
        "p99": ordered[max(0, int(len(ordered) * 0.99) - 1)] * 1e6,
        "max": ordered[-1] * 1e6,
    }


def run(handovers: int, clients: int, drain: float, baseline: float) -> Report:
    report = Report()
    cpus = sorted(os.sched_getaffinity(0))
    server_cpus = {cpus[0]}
    load_cpus = set(cpus[1:]) or server_cpus
    report.pinning = (
        f"servers on CPU {cpus[0]}, load generator on CPU {','.join(map(str, sorted(load_cpus)))}"
        if len(cpus) > 1
        else "one CPU: not pinned"
    )
    directory = tempfile.mkdtemp(prefix="udskit-handover-")
    path = os.path.join(directory, "app.sock")
    command = [sys.executable, "-m", "udskit", "serve", "--echo", "--handover"]
    command += ["--drain-timeout", str(drain), "--max-clients", "1000", path]
    log = open(os.path.join(directory, "servers.log"), "wb")  # noqa: SIM115 - closed below
    # Their warnings (clients closed when the drain time ran out) go to the log, counted.
    first = subprocess.Popen(command, stdin=subprocess.DEVNULL, stderr=log)
    if len(cpus) > 1:
        os.sched_setaffinity(first.pid, server_cpus)  # its successors inherit it
        os.sched_setaffinity(0, load_cpus)
    pids = [first.pid]
    try:
        _wait_connectable(path, time.monotonic() + START_TIMEOUT)
        inode = os.stat(path).st_ino
        report.fds_first = _fds(first.pid)
        if baseline > 0:
            quiet = Load(path, clients, Report())
            quiet.start()
            time.sleep(baseline)  # the load runs meanwhile: that is the measurement
            quiet.finish()
            report.baseline_us = _spread(quiet.latencies)
        load = Load(path, clients, report)
        began = time.monotonic()
        load.start()
        handed: list[tuple[float, float]] = []
        for _ in range(handovers):
            try:
                asked = time.monotonic()
                _, new = request_upgrade(path)
                handed.append((asked, time.monotonic()))
            except OSError as exc:
                report.handover_failures.append(str(exc))
                continue
            report.handovers += 1
            pids.append(new)
            if os.stat(path).st_ino != inode:
                report.inode_changes += 1
        load.finish()
        report.seconds = time.monotonic() - began
        last = pids[-1]
        # Once its clients' connections have closed (the load has just stopped): a client
        # socket still being closed is not a leak.
        settle = time.monotonic() + 2.0
        report.fds_last = _fds(last)
        while report.fds_last > report.fds_first and time.monotonic() < settle:
            time.sleep(0.05)
            report.fds_last = _fds(last)
        deadline = time.monotonic() + drain + 10
        while any(_alive(p) for p in pids[:-1]) and time.monotonic() < deadline:
            time.sleep(0.05)
        report.old_servers_left = sum(_alive(p) for p in pids[:-1] if p != first.pid)
        if first.poll() is None and first.pid != last:
            try:
                first.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                report.old_servers_left += 1
        report.latency_us = _spread(load.latencies)
        # The connections begun while a handover was under way (from the upgrade request to
        # the new process serving): the window in which a connection waits.
        windows = sorted(handed)
        during = [
            took
            for began, took in zip(load.started, load.latencies, strict=True)
            if any(asked <= began <= done for asked, done in windows)
        ]
        report.during_us = _spread(during)
        report.during_count = len(during)
        for at in load.failed_at:
            # When each failure came, from the end of the handover before it: drain expiry
            # shows as --drain-timeout.
            before = [done for _, done in handed if done <= at]
            report.failure_offsets.append(round(at - before[-1], 3) if before else -1.0)
    finally:
        for pid in reversed(pids):  # the chain this run started; the old ones exit alone
            if _alive(pid):
                os.kill(pid, signal.SIGTERM)
        first.wait(CLIENT_TIMEOUT)
        log.close()
        with open(os.path.join(directory, "servers.log"), "rb") as f:
            report.drains_cut = f.read().count(b"after the handover; closing them")
        deadline = time.monotonic() + CLIENT_TIMEOUT
        while os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.05)
        for name in os.listdir(directory):
            os.unlink(os.path.join(directory, name))
        os.rmdir(directory)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--handovers", type=int, default=100)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--drain-timeout", type=float, default=2.0)
    parser.add_argument("--baseline", type=float, default=5.0, metavar="S")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    report = run(args.handovers, args.clients, args.drain_timeout, args.baseline)
    lat = report.latency_us
    print(f"handovers:            {report.handovers} of {args.handovers} ({report.pinning})")
    for failure in report.handover_failures[:5]:
        print(f"  failed: {failure}")
    print(f"socket inode changed: {report.inode_changes} times")
    print(
        f"new connections:      {report.new_connections} served, {report.connect_failures} "
        f"failed {report.failure_kinds or ''}"
    )
    if report.failure_offsets:
        print(f"  seconds after the last handover: {report.failure_offsets}")
    print(
        f"persistent clients:   {report.exchanges} exchanges, {report.reconnects} reconnects "
        f"after a drain, {report.unanswered} unanswered, {report.wrong_replies} wrong replies"
    )
    print(f"server descriptors:   {report.fds_first} first, {report.fds_last} last")
    print(
        f"old servers:          {report.old_servers_left} left running; "
        f"{report.drains_cut} closed clients still connected after --drain-timeout"
    )
    base = report.baseline_us
    for name, spread, over in (
        ("no handover", base, f"{args.baseline:g} s"),
        ("handovers", lat, f"{report.seconds:.1f} s"),
        ("begun during a handover", report.during_us, f"{report.during_count} connections"),
    ):
        if spread:
            print(
                f"new connection, connect to reply, {name}: median {spread['median']:.0f} us, "
                f"p99 {spread['p99']:.0f} us, max {spread['max']:.0f} us over {over}"
            )
    if lat and base:
        print(f"p99 during handovers / p99 without: {lat['p99'] / base['p99']:.2f}x")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(asdict(report), f, indent=2)


if __name__ == "__main__":
    main()
