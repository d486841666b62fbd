"""Process orchestration: start each measurement's two peers, pinned apart, and collect
what they measured.

Every measurement is a fresh pair of processes: the server (pinned to one CPU) announces its
address, the client (pinned to another) connects and runs the test, the side that measured
prints the result. Each peer has a deadline; one that misses it is killed, by its pid, and
the measurement is reported as failed with the peer's last line of stderr.

Many clients: the runner reads the server's RSS once the server is ready, and again when the
load generator says all its clients are connected (it then waits for the runner's go), so
the server's memory per client is measured at a point both sides agree on, with no sleep.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import IO, Final

import udskit

from . import stats
from .contenders.base import Contender
from .contenders.native import command as native_command
from .contenders.registry import BASELINE, native_build
from .host import FD_HEADROOM, Pinning, describe_host, raise_nofile
from .memory import ServerMemory, rss_kib
from .plan import ECHO_SIZE, Figure, Plan
from .results import ContenderInfo, Outcome, Run
from .wire import Job, Option, decode_line, parse_load, parse_rtt, parse_send, parse_stream

__all__ = [
    "NotMeasured",
    "PeerFailed",
    "Progress",
    "Trial",
    "availability",
    "run",
    "socket_path",
    "summarize",
]

#: How long a server may take to start listening: an interpreter starting, importing pyzmq
#: or uvloop, on a machine busy with the previous measurement's teardown.
READY_TIMEOUT: Final = 30.0

#: Time a client may take beyond its test's time cap: connecting (ten thousand clients, each
#: echoed once), warming up, and draining what is in flight.
CLIENT_SLACK: Final = 60.0

#: Bytes per second below which a large-message contender is considered stuck: its time
#: allowance grows by one message's transfer at this rate (a 256 MiB message: 2.7 s).
LARGE_SLOWEST: Final = 100e6

#: How long a server may take to exit once its client is done (udskit.Server waits up to
#: five seconds for its handler threads)...
SERVER_EXIT_TIMEOUT: Final = 10.0

#: ...and, after a many-clients test, this much more per client: the handler threads of a
#: thread-per-client server all wake at once when the clients leave, and end in turns for
#: the GIL (5 ms per turn at worst: 10,000 threads took from 0.2 to 47 s to end on 2 CPUs).
SERVER_EXIT_PER_CLIENT: Final = 0.005

#: Extra characters in the socket path on each turn of the repeated runs (see _address).
LAYOUT_PADS: Final = (0, 5, 11)

#: Room a socket path needs after the work directory's name (sun_path holds 107 bytes).
_PATH_ROOM: Final = 30

Progress = Callable[[int, int, str], None]


class PeerFailed(Exception):
    """A peer exited with an error, printed nonsense, or missed its deadline."""


class NotMeasured(Exception):
    """A peer said this host does not allow the figure (``{"not_measured": REASON}``)."""


class _Peer:
    """One peer process: its stdout is the protocol, its stderr a file kept for errors."""

    def __init__(
        self, what: str, argv: Sequence[str], fds: Sequence[int], *, go: bool = False
    ) -> None:
        """``go``: the peer waits for a line on stdin at some point (see ``say_go``)."""
        self.what = what
        # Kept open for the life of the peer, closed by stop().
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if go else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
                pass_fds=tuple(fds),
                bufsize=0,  # unbuffered: a readline never takes bytes past the ready line
            )
        except OSError:
            self._stderr.close()
            raise

    def wait_ready(self, timeout: float) -> str:
        """The address the server announced."""
        stdout = self.proc.stdout
        assert stdout is not None
        ready, _, _ = select.select([stdout], [], [], timeout)
        if not ready:
            raise PeerFailed(f"{self.what} did not start listening within {timeout:.0f} s")
        line = stdout.readline().decode(errors="replace")
        if not line:
            self.proc.wait()
            raise PeerFailed(self._why("exited before it was ready"))
        message = decode_line(line)
        _check_measurable(message)
        address = message.get("ready")
        if not isinstance(address, str):
            raise PeerFailed(f"{self.what} sent {line.strip()!r} instead of its address")
        return address

    def next_message(self, timeout: float) -> dict[str, object] | None:
        """The peer's next protocol line, or None if it ended its output first."""
        stdout = self.proc.stdout
        assert stdout is not None
        ready, _, _ = select.select([stdout], [], [], timeout)
        if not ready:
            raise PeerFailed(f"{self.what} said nothing within {timeout:.0f} s")
        line = stdout.readline().decode(errors="replace")
        return decode_line(line) if line else None

    def say_go(self) -> None:
        """Write the line the peer waits for; a peer that has exited is no error here."""
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.write(b"go\n")
            except BrokenPipeError:
                pass  # it exited: finish() reports how

    def finish(
        self,
        timeout: float,
        *,
        signalled: bool = False,
        earlier: Sequence[dict[str, object]] = (),
    ) -> dict[str, object] | None:
        """Wait for the peer to exit; its result, if it printed one (``earlier``: lines
        already read with next_message)."""
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise PeerFailed(f"{self.what} did not finish within {timeout:.0f} s") from None
        code = self.proc.returncode
        messages = [*earlier]
        lines = out.decode(errors="replace").splitlines()
        messages += [decode_line(line) for line in lines if line.strip()]
        for message in messages:
            _check_measurable(message)
        if code != 0 and not (signalled and code == -signal.SIGTERM):
            raise PeerFailed(self._why(f"exited with status {code}"))
        result = None
        for message in messages:
            if "result" in message:
                result = message["result"]
        if result is not None and not isinstance(result, dict):
            raise PeerFailed(f"{self.what} printed a result that is not an object")
        return result

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        """Kill the peer if it still runs, and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
        self._stderr.close()

    def _why(self, what: str) -> str:
        self._stderr.seek(0)
        lines = [line.strip() for line in self._stderr.read().decode(errors="replace").splitlines()]
        last = next((line for line in reversed(lines) if line), "")
        if len(last) > 200:
            last = last[:197] + "..."
        return f"{self.what} {what}" + (f": {last}" if last else "")


def _check_measurable(message: dict[str, object]) -> None:
    reason = message.get("not_measured")
    if reason is not None:
        raise NotMeasured(str(reason))


def availability(contenders: Sequence[Contender]) -> list[ContenderInfo]:
    """Which contenders can run here, and why the others cannot."""
    infos = []
    for contender in contenders:
        reason = contender.requires()
        infos.append(
            ContenderInfo(
                contender.name,
                contender.label,
                contender.description,
                reason is None,
                reason or "",
            )
        )
    return infos


class _Runner:
    def __init__(self, plan: Plan, pinning: Pinning, workdir: str, c_loader: str | None) -> None:
        self.plan = plan
        self.pinning = pinning
        self.workdir = workdir
        self.c_loader = c_loader
        self.turn = 0
        self._serial = 0

    def measure(self, contender: Contender, figure: Figure) -> Trial | Outcome:
        """One run of one measurement, or the Outcome saying why there is none."""
        if not contender.runs(figure.test):
            return Outcome(contender.name, figure, "skipped", contender.skips[figure.test])
        if figure.test == "many":
            problem = raise_nofile(figure.param + FD_HEADROOM)
            if problem:
                return Outcome(contender.name, figure, "not_measured", problem)
        try:
            return self._pair(contender, figure)
        except NotMeasured as exc:
            return Outcome(contender.name, figure, "not_measured", str(exc))
        except (PeerFailed, ValueError, OSError) as exc:
            return Outcome(contender.name, figure, "failed", str(exc))

    def _pair(self, contender: Contender, figure: Figure) -> Trial | Outcome:
        server_job, client_job = self._jobs(contender, figure)
        with _Pipes(contender.transport == "pipe") as pipes:
            server_job = dataclasses.replace(server_job, fds=pipes.server)
            client_job = dataclasses.replace(client_job, fds=pipes.client)
            server = _Peer(
                f"{contender.name} server", self._argv(contender, server_job), pipes.server
            )
            many = figure.test == "many"
            memory = None
            try:
                address = server.wait_ready(READY_TIMEOUT)
                ready_kib = rss_kib(server.proc.pid) if many else None
                client_job = dataclasses.replace(client_job, address=address)
                client = _Peer(
                    f"{contender.name} client",
                    self._argv(contender, client_job),
                    pipes.client,
                    go=many,
                )
                try:
                    pipes.close()  # the peers hold theirs: EOF must reach them
                    deadline = time.monotonic() + _client_timeout(self.plan, figure)
                    earlier = []
                    if many:
                        # The load generator says when every client is connected and has
                        # had one echo, then waits for our go: the server's RSS now is
                        # its RSS with N clients.
                        said = client.next_message(deadline - time.monotonic())
                        if said is not None and "connected" in said:
                            connected_kib = rss_kib(server.proc.pid)
                            if ready_kib is not None and connected_kib is not None:
                                memory = ServerMemory(ready_kib, connected_kib, figure.param)
                        elif said is not None:
                            earlier.append(said)
                        client.say_go()
                    client_result = client.finish(
                        max(0.0, deadline - time.monotonic()), earlier=earlier
                    )
                finally:
                    client.stop()
                if figure.test == "many":
                    server.terminate()
                exit_timeout = SERVER_EXIT_TIMEOUT + SERVER_EXIT_PER_CLIENT * server_job.clients
                server_result = server.finish(exit_timeout, signalled=many)
            finally:
                server.stop()
        trial = _trial(contender, figure, client_result, server_result)
        if isinstance(trial, Trial) and memory is not None:
            return dataclasses.replace(trial, memory=memory)
        return trial

    def _jobs(self, contender: Contender, figure: Figure) -> tuple[Job, Job]:
        """The server's job and the client's (the client learns the address later)."""
        plan = self.plan
        options = dict(contender.options)
        if contender.native:
            options["binary"] = str(native_build().binary)
        server = Job(
            contender.name,
            contender.module,
            "rtt_server",
            self._address(contender),
            size=figure.param,
            cpu=self.pinning.server_cpu,
            options=options,
        )
        client = dataclasses.replace(server, role="rtt_client", cpu=self.pinning.client_cpu)
        if figure.test == "rtt":
            return server, dataclasses.replace(
                client, count=plan.rtt_count, warmup=plan.rtt_warmup, seconds=plan.rtt_seconds
            )
        if figure.test == "stream":
            return dataclasses.replace(server, role="stream_receiver"), dataclasses.replace(
                client,
                role="stream_sender",
                count=plan.stream_count(figure.param),
                seconds=plan.stream_seconds,
            )
        if figure.test == "large":
            return dataclasses.replace(server, role="stream_receiver"), dataclasses.replace(
                client,
                role="stream_sender",
                count=plan.large_count(figure.param),
                warmup=plan.large_warmup,
                seconds=plan.large_seconds,
            )
        # Many clients: the contender's echo server against the one load generator.
        loader_options: dict[str, Option] = {"transport": contender.transport}
        if self.c_loader:
            loader_options["binary"] = self.c_loader
        loader = Job(
            contender.name,
            "udskit.bench.loader",
            "load",
            server.address,
            size=ECHO_SIZE,
            count=plan.many_messages,
            seconds=plan.many_seconds,
            clients=figure.param,
            cpu=self.pinning.client_cpu,
            options=loader_options,
        )
        echo = dataclasses.replace(server, role="echo_server", size=ECHO_SIZE, clients=figure.param)
        return echo, loader

    def _address(self, contender: Contender) -> str:
        self._serial += 1
        if contender.transport == "tcp":
            return "127.0.0.1:0"
        if contender.transport == "pipe":
            return "pipes"
        return socket_path(self.workdir, self._serial, self.turn)

    def _argv(self, contender: Contender, job: Job) -> list[str]:
        native = self.c_loader is not None if job.role == "load" else contender.native
        if native:
            return native_command(job)
        return [sys.executable, "-m", "udskit.bench.peer", job.to_json()]


def socket_path(workdir: str, serial: int, turn: int) -> str:
    """The socket path of a measurement: one length for every contender in a turn, another
    length each turn.

    The path (also part of a Python peer's argv) shifts where later objects land in the
    peer's memory, and copies of large messages depend on where their buffers sit (see
    docs/bench.md): a path length that grew with the measurement count once halved one
    contender's 64 KiB figure from the tenth measurement on. The median run is thus a median
    over a few memory layouts, and no contender is favoured by its place in the order.
    """
    pad = "_" * LAYOUT_PADS[turn % len(LAYOUT_PADS)]
    return os.path.join(workdir, f"{serial:06d}{pad}.sock")


class _Pipes:
    """For the pipe transport: two pipes, given to the peers as (read end, write end) each.

    ``close()`` drops the runner's copies once both peers hold theirs (so that EOF reaches
    them); it is idempotent, so a descriptor number is never closed twice.
    """

    def __init__(self, wanted: bool) -> None:
        self._fds: list[int] = []
        if wanted:
            to_server_r, to_server_w = os.pipe()
            self._fds += (to_server_r, to_server_w)
            to_client_r, to_client_w = os.pipe()
            self._fds += (to_client_r, to_client_w)
        self.server = tuple(self._fds[i] for i in (0, 3)) if wanted else ()
        self.client = tuple(self._fds[i] for i in (2, 1)) if wanted else ()

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.pop())

    def __enter__(self) -> _Pipes:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _client_timeout(plan: Plan, figure: Figure) -> float:
    caps = {
        "rtt": plan.rtt_seconds,
        "stream": plan.stream_seconds,
        "large": plan.large_seconds,
        "many": plan.many_seconds,
    }
    # A large message may take a while on its own: the cap is checked between messages.
    alone = figure.param / LARGE_SLOWEST if figure.test == "large" else 0.0
    return caps[figure.test] + alone + CLIENT_SLACK


@dataclass(frozen=True, slots=True)
class Trial:
    """One run of one measurement, as the peers reported it."""

    #: Round-trip or echo latencies (none for one-way streams).
    samples_ns: list[int]
    #: Messages moved, and in how long (round trips: the count measured, and 0).
    messages: int
    seconds: float
    #: Many clients: the server's RSS when ready and with every client connected.
    memory: ServerMemory | None = None


def _trial(
    contender: Contender,
    figure: Figure,
    client: dict[str, object] | None,
    server: dict[str, object] | None,
) -> Trial | Outcome:
    name = contender.name
    if figure.test == "rtt":
        if client is None:
            raise PeerFailed(f"{name} client printed no result")
        samples = parse_rtt(client).samples_ns
        if not samples:
            raise PeerFailed(f"{name} client measured no round trip")
        return Trial(samples, len(samples), 0.0)
    if figure.test in ("stream", "large"):
        if server is None or client is None:
            side = "receiver" if server is None else "sender"
            raise PeerFailed(f"{name}: the {side} printed no result")
        received, sent = parse_stream(server), parse_send(client)
        if received.messages != sent.messages + sent.warmup:
            reason = f"{sent.messages + sent.warmup} messages sent, {received.messages} received"
            return Outcome(name, figure, "failed", reason)
        seconds = (received.last_ns - sent.started_ns) / 1e9
        if seconds <= 0 or not sent.messages:
            return Outcome(name, figure, "failed", "nothing was sent, or in no time at all")
        return Trial([], sent.messages, seconds)
    if client is None:
        raise PeerFailed(f"{name} load generator printed no result")
    load = parse_load(client)
    if load.errors or not load.samples_ns or load.seconds <= 0:
        reason = load.first_error or "no echo came back"
        if load.errors > 1:
            reason = f"{load.errors} errors, the first: {reason}"
        latency = stats.latency(load.samples_ns) if load.samples_ns else None
        rate = (
            stats.throughput(load.messages, ECHO_SIZE, load.seconds) if load.seconds > 0 else None
        )
        return Outcome(name, figure, "failed", reason, latency, rate, load.errors)
    return Trial(load.samples_ns, load.messages, load.seconds)


def summarize(contender: str, figure: Figure, trials: Sequence[Trial]) -> Outcome:
    """One figure from its repeated runs: latencies pooled over all runs; the rate of the
    median run; and every run's headline figure, for the reader who wants the spread."""
    size = ECHO_SIZE if figure.test == "many" else figure.param
    if figure.test == "rtt":
        per_run = [stats.latency(t.samples_ns).p50_us for t in trials]
        pooled = [sample for t in trials for sample in t.samples_ns]
        return Outcome(contender, figure, "ok", latency=stats.latency(pooled), runs=tuple(per_run))
    rates = [stats.throughput(t.messages, size, t.seconds) for t in trials]
    runs = tuple(rate.msgs_per_s for rate in rates)
    median = rates[stats.median_index(runs)]
    if figure.test in ("stream", "large"):
        return Outcome(contender, figure, "ok", rate=median, runs=runs)
    pooled = [sample for t in trials for sample in t.samples_ns]
    return Outcome(
        contender,
        figure,
        "ok",
        latency=stats.latency(pooled),
        rate=median,
        runs=runs,
        memory=_median_memory([t.memory for t in trials]),
    )


def _median_memory(measured: Sequence[ServerMemory | None]) -> ServerMemory | None:
    """The median run's memory, by growth per client (runs that could not read it left out)."""
    known = [m for m in measured if m is not None]
    if not known:
        return None
    return known[stats.median_index([m.kib_per_client for m in known])]


def _workdir() -> str:
    path = tempfile.mkdtemp(prefix="udskit-bench-")
    if len(os.fsencode(path)) + _PATH_ROOM > 107:
        os.rmdir(path)
        path = tempfile.mkdtemp(prefix="udskit-bench-", dir="/tmp")
    return path


def run(
    plan: Plan,
    contenders: Sequence[Contender],
    pinning: Pinning,
    progress: Progress,
    *,
    infos: Sequence[ContenderInfo] | None = None,
    notes: Sequence[str] = (),
    warn: Callable[[str], None] = lambda text: None,
) -> Run:
    """Measure every figure of ``plan`` for every available contender, figure by figure
    (all contenders' round trips, then all one-way 64 B streams, ...), so that a change in
    the machine's load during the run touches every contender alike.

    A many-clients figure this host's descriptor limit does not allow is not measured, for
    any contender: ``warn`` gets one line saying which limit, its value and how to raise it.
    """
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    clock = time.monotonic()
    if infos is None:
        infos = availability(contenders)
    usable = {info.name for info in infos if info.available}
    reasons = {info.name: info.reason for info in infos}
    figures = plan.figures()
    outcomes: list[Outcome] = []
    saved = resource.getrlimit(resource.RLIMIT_NOFILE)
    unmeasurable = _unmeasurable(figures, warn)
    runnable = [
        (f, c)
        for f in figures
        for c in contenders
        if c.name in usable and c.runs(f.test) and f not in unmeasurable
    ]
    total = len(runnable) * plan.repeats
    built = native_build()
    loader = (
        "C (benchmarks/udsbench.c)"
        if built.binary
        else f"Python (udskit.bench.loader), as the C one is unavailable: {built.reason}"
    )
    workdir = _workdir()
    runner = _Runner(plan, pinning, workdir, str(built.binary) if built.binary else None)
    done = 0
    try:
        for figure in figures:
            trials: dict[str, list[Trial]] = {c.name: [] for c in contenders}
            ended: dict[str, Outcome] = {}
            for contender in contenders:
                if contender.name not in usable:
                    reason = reasons[contender.name]
                    ended[contender.name] = Outcome(contender.name, figure, "unavailable", reason)
                elif not contender.runs(figure.test):
                    reason = contender.skips[figure.test]
                    ended[contender.name] = Outcome(contender.name, figure, "skipped", reason)
                elif figure in unmeasurable:
                    reason = unmeasurable[figure]
                    ended[contender.name] = Outcome(contender.name, figure, "not_measured", reason)
            # The contenders take turns, run by run.
            for turn in range(plan.repeats):
                runner.turn = turn
                for contender in contenders:
                    if contender.name in ended:
                        continue
                    got = runner.measure(contender, figure)
                    if isinstance(got, Outcome):  # failed: no more runs of this one
                        ended[contender.name] = got
                        done += plan.repeats - turn
                        progress(done, total, _progress_text(got))
                        continue
                    trials[contender.name].append(got)
                    done += 1
                    progress(done, total, _progress_text(summarize(contender.name, figure, [got])))
            for contender in contenders:
                name = contender.name
                outcomes.append(ended.get(name) or summarize(name, figure, trials[name]))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        resource.setrlimit(resource.RLIMIT_NOFILE, saved)
    return Run(
        plan=plan,
        pinning=pinning,
        host=describe_host(),
        baseline=BASELINE,
        contenders=tuple(infos),
        outcomes=outcomes,
        started=started,
        seconds=time.monotonic() - clock,
        udskit_version=udskit.__version__,
        notes=tuple(notes),
        loader=loader,
    )


def _unmeasurable(figures: Sequence[Figure], warn: Callable[[str], None]) -> dict[Figure, str]:
    """The many-clients figures whose descriptors RLIMIT_NOFILE cannot allow, and why.

    Raises the soft limit for the largest count it can (the peers inherit it, and raise
    their own too); the runner's caller restores it.
    """
    found = {}
    for figure in sorted((f for f in figures if f.test == "many"), key=lambda f: f.param):
        problem = raise_nofile(figure.param + FD_HEADROOM)
        if problem:
            found[figure] = problem
            warn(f"{figure.title} not measured: {problem}")
    return found


def _progress_text(outcome: Outcome) -> str:
    what = f"{outcome.contender:<18} {outcome.figure.title:<18}"
    if outcome.status != "ok":
        return f"{what} {outcome.status}: {outcome.reason}"
    if outcome.figure.test == "rtt" and outcome.latency is not None:
        return f"{what} p50 {outcome.latency.p50_us:.1f} µs, p99 {outcome.latency.p99_us:.1f} µs"
    if outcome.figure.test == "many" and outcome.rate and outcome.latency:
        text = f"{what} {outcome.rate.msgs_per_s:,.0f} msg/s, p99 {outcome.latency.p99_us:,.0f} µs"
        if outcome.memory is not None:
            text += f", server {outcome.memory.kib_per_client:+,.1f} KiB per client"
        return text
    if outcome.rate is not None:
        return f"{what} {outcome.rate.msgs_per_s:,.0f} msg/s, {outcome.rate.mb_per_s:,.1f} MB/s"
    return what
