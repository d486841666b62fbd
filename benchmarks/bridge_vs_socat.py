"""``udskit bridge`` against ``socat TCP-LISTEN,fork,reuseaddr UNIX-CONNECT:...``, same run.

Both relays expose the same Unix socket server on a TCP port, as in front of gunicorn. The
client (this process) talks TCP to the relay, the relay talks to the backend over the Unix
socket. Measured, alternating the relays round by round:

* upload: the client sends SIZE bytes (default 1 GiB) and half-closes; the backend counts
  them and answers with the count: MB/s from the first byte to the answer;
* download: the backend sends SIZE bytes and closes: MB/s until the client has them all;
* latency: 64-byte messages echoed one at a time: median and p99 round trip;
* the relay's CPU time (user + system) for each transfer, from /proc.

The same figures without any relay (the client on the Unix socket directly) show the cost of
the hop itself. Where there are CPUs to spare the processes are pinned: the relay on one CPU,
the client and backend on another (they take turns in the latency test).

Run: python benchmarks/bridge_vs_socat.py [--size-mib 1024] [--rounds 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

CPUS = sorted(os.sched_getaffinity(0))  # read once: pinning narrows it for this process
CHUNK = 1 << 20
PING = 64
READY_TIMEOUT = 20.0
#: CPU clock ticks per second, for /proc/PID/stat times.
TICKS = os.sysconf("SC_CLK_TCK")


# -- the backend: a blocking Unix socket server, one connection at a time ---------------------
def backend(path: str) -> None:
    """Serve forever: 'U' = count an upload, 'D<size>' = send a download, 'P' = echo pings."""
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        server.listen(16)
        buffer = memoryview(bytearray(CHUNK))
        while True:
            conn, _ = server.accept()
            with conn:
                mode = conn.recv(1)
                if mode == b"U":
                    total = 0
                    while count := conn.recv_into(buffer):
                        total += count
                    conn.sendall(total.to_bytes(8, "big"))
                elif mode == b"D":
                    size = int.from_bytes(_exactly(conn, 8), "big")
                    while size > 0:
                        size -= conn.send(buffer[: min(size, CHUNK)])
                elif mode == b"P":
                    while data := conn.recv(PING):
                        conn.sendall(data)


def _exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        more = sock.recv(size - len(data))
        if not more:
            raise ConnectionError("peer closed early")
        data += more
    return data


# -- relays ------------------------------------------------------------------------------------
@dataclass
class Relay:
    name: str
    process: subprocess.Popen[bytes] | None
    connect: tuple[int, object]  # (family, address)

    def cpu_seconds(self) -> float:
        """User + system time of the relay and its reaped children (socat forks one per
        connection and waits for it, so its CPU time lands in the parent's cutime/cstime)."""
        if self.process is None:
            return 0.0
        with open(f"/proc/{self.process.pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
        return (utime + stime + cutime + cstime) / TICKS

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(READY_TIMEOUT)


def start_udskit(backend_path: str, *, uvloop: bool = True) -> Relay:
    """``udskit bridge`` as a process: on uvloop when installed (what ``run`` picks), or on
    asyncio's own loop, as for users without the ``fast`` extra."""
    hide = "" if uvloop else "sys.modules['uvloop'] = None; "
    script = (
        f"import sys; {hide}from udskit.cli.main import main; "
        f"sys.exit(main(['bridge', 'tcp:127.0.0.1:0', {backend_path!r}]))"
    )
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert process.stdout is not None
    line = process.stdout.readline().decode()
    if not line.startswith("listening on tcp:"):
        raise SystemExit(f"udskit bridge did not start: {line!r}")
    port = int(line.split(" -> ")[0].rsplit(":", 1)[1])
    name = "udskit bridge" if uvloop else "udskit bridge (asyncio)"
    return Relay(name, process, (socket.AF_INET, ("127.0.0.1", port)))


def start_socat(backend_path: str, buffer: int | None) -> Relay:
    port = _free_port()
    options = ["-b", str(buffer)] if buffer else []
    process = subprocess.Popen(
        [
            "socat",
            *options,
            f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr",
            f"UNIX-CONNECT:{backend_path}",
        ]
    )
    name = f"socat -b {buffer}" if buffer else "socat"
    relay = Relay(name, process, (socket.AF_INET, ("127.0.0.1", port)))
    _wait_connectable(relay)
    return relay


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_connectable(relay: Relay) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            _connect(relay).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _connect(relay: Relay) -> socket.socket:
    family, address = relay.connect
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.connect(address)  # type: ignore[arg-type]
    if family == socket.AF_INET:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


# -- measurements --------------------------------------------------------------------------------
@dataclass
class Figures:
    upload_mbps: list[float] = field(default_factory=list)
    download_mbps: list[float] = field(default_factory=list)
    cpu_per_gib: list[float] = field(default_factory=list)
    rtt_median_us: list[float] = field(default_factory=list)
    rtt_p99_us: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        return {name: statistics.median(values) for name, values in asdict(self).items() if values}


def upload(relay: Relay, size: int) -> tuple[float, float]:
    payload = memoryview(bytes(CHUNK))
    cpu = relay.cpu_seconds()
    with _connect(relay) as sock:
        start = time.perf_counter()
        sock.sendall(b"U")
        left = size
        while left > 0:
            piece = payload[: min(left, CHUNK)]
            sock.sendall(piece)
            left -= len(piece)
        sock.shutdown(socket.SHUT_WR)
        counted = int.from_bytes(_exactly(sock, 8), "big")
        elapsed = time.perf_counter() - start
    assert counted == size, f"{relay.name}: backend counted {counted} of {size} bytes"
    return size / elapsed / 1e6, _cpu_since(relay, cpu) * (1 << 30) / size


def download(relay: Relay, size: int) -> tuple[float, float]:
    buffer = memoryview(bytearray(CHUNK))
    cpu = relay.cpu_seconds()
    with _connect(relay) as sock:
        start = time.perf_counter()
        sock.sendall(b"D" + size.to_bytes(8, "big"))
        received = 0
        while count := sock.recv_into(buffer):
            received += count
        elapsed = time.perf_counter() - start
    assert received == size, f"{relay.name}: received {received} of {size} bytes"
    return size / elapsed / 1e6, _cpu_since(relay, cpu) * (1 << 30) / size


def _cpu_since(relay: Relay, before: float) -> float:
    # socat's per-connection child is reaped (and its time counted) just after it exits.
    deadline = time.monotonic() + 2.0
    now = relay.cpu_seconds()
    while relay.process is not None and relay.name.startswith("socat") and now == before:
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
        now = relay.cpu_seconds()
    return now - before


def latency(relay: Relay, count: int) -> tuple[float, float]:
    message = b"x" * PING
    times = []
    with _connect(relay) as sock:
        sock.sendall(b"P")
        for i in range(count + count // 10):
            start = time.perf_counter_ns()
            sock.sendall(message)
            got = 0
            while got < PING:
                got += len(sock.recv(PING - got))
            if i >= count // 10:  # the first tenth warms up caches and the relay
                times.append(time.perf_counter_ns() - start)
    times.sort()
    return statistics.median(times) / 1000, times[int(len(times) * 0.99)] / 1000


# -- the run --------------------------------------------------------------------------------------
def pin(pid: int, index: int) -> str:
    if len(CPUS) < 2:
        return "unpinned (one CPU)"
    cpu = CPUS[index % len(CPUS)]
    os.sched_setaffinity(pid, {cpu})
    return f"cpu {cpu}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="bytes per transfer (MiB)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; medians are reported")
    parser.add_argument("--pings", type=int, default=20000, help="round trips per latency run")
    parser.add_argument(
        "--socat-buffer", type=int, default=0, help="also run socat -b N (0: only the default)"
    )
    parser.add_argument(
        "--asyncio", action="store_true", help="also run udskit bridge without uvloop"
    )
    parser.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    parser.add_argument("--serve-backend", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_backend:
        backend(args.serve_backend)
        return
    if shutil.which("socat") is None:
        raise SystemExit("socat is not installed (apt-get install socat)")
    size = args.size_mib << 20
    workdir = tempfile.mkdtemp(prefix="bridge-bench-")
    backend_path = os.path.join(workdir, "backend.sock")
    server = subprocess.Popen([sys.executable, __file__, "--serve-backend", backend_path])
    relays: list[Relay] = []
    try:
        direct = Relay("direct (no relay)", None, (socket.AF_UNIX, backend_path))
        _wait_connectable(direct)
        relays = [start_socat(backend_path, None), start_udskit(backend_path)]
        if args.asyncio:
            relays.append(start_udskit(backend_path, uvloop=False))
        if args.socat_buffer:
            relays.insert(1, start_socat(backend_path, args.socat_buffer))
        placement = {
            "client": pin(0, 0),
            "backend": pin(server.pid, 0),
            "relays": ", ".join(pin(r.process.pid, 1) for r in relays if r.process),
        }
        print(
            f"transfer {args.size_mib} MiB, {args.pings} pings of {PING} B, {args.rounds} "
            f"rounds; pinning: {placement}"
        )
        results = {relay.name: Figures() for relay in [direct, *relays]}
        for round_number in range(args.rounds):
            for relay in [direct, *relays]:
                figures = results[relay.name]
                mbps, cpu = upload(relay, size)
                figures.upload_mbps.append(mbps)
                cpu_up = cpu
                mbps, cpu = download(relay, size)
                figures.download_mbps.append(mbps)
                if relay.process is not None:
                    figures.cpu_per_gib.append((cpu_up + cpu) / 2)
                median, p99 = latency(relay, args.pings)
                figures.rtt_median_us.append(median)
                figures.rtt_p99_us.append(p99)
            print(f"round {round_number + 1} done", file=sys.stderr)
        report(results, direct.name)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(
                    {
                        "size_bytes": size,
                        "pings": args.pings,
                        "rounds": args.rounds,
                        "pinning": placement,
                        "python": sys.version.split()[0],
                        "results": {name: f.summary() for name, f in results.items()},
                        "raw": {name: asdict(f) for name, f in results.items()},
                    },
                    f,
                    indent=2,
                )
    finally:
        for relay in relays:
            relay.stop()
        server.terminate()
        server.wait(READY_TIMEOUT)
        shutil.rmtree(workdir, ignore_errors=True)


def report(results: dict[str, Figures], direct: str) -> None:
    rows = [
        ("relay", "upload MB/s", "download MB/s", "relay CPU s/GiB", "RTT median us", "RTT p99 us")
    ]
    for name, figures in results.items():
        s = figures.summary()
        rows.append(
            (
                name,
                f"{s['upload_mbps']:.0f}",
                f"{s['download_mbps']:.0f}",
                f"{s['cpu_per_gib']:.2f}" if "cpu_per_gib" in s else "-",
                f"{s['rtt_median_us']:.1f}",
                f"{s['rtt_p99_us']:.1f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(
                cell.rjust(w) if i else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    ours = results["udskit bridge"].summary()
    socat = results["socat"].summary()
    base = results[direct].summary()
    print()
    print(
        f"udskit bridge / socat: upload x{ours['upload_mbps'] / socat['upload_mbps']:.2f}, "
        f"download x{ours['download_mbps'] / socat['download_mbps']:.2f} (higher is better); "
        f"CPU per GiB x{ours['cpu_per_gib'] / socat['cpu_per_gib']:.2f}, "
        f"RTT median x{ours['rtt_median_us'] / socat['rtt_median_us']:.2f} (lower is better)"
    )
    added_ours = ours["rtt_median_us"] - base["rtt_median_us"]
    added_socat = socat["rtt_median_us"] - base["rtt_median_us"]
    print(
        f"round trip added by the relay hop (median, over direct): udskit bridge "
        f"{added_ours:.1f} us, socat {added_socat:.1f} us "
        f"(x{added_ours / added_socat:.2f})"
    )


if __name__ == "__main__":
    main()
