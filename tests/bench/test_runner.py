"""The runner: real peer processes, pinned apart; every way a peer can fail is reported as
the measurement's reason, and no peer process outlives its measurement."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from udskit.bench import runner
from udskit.bench.cbuild import Build
from udskit.bench.contenders.base import Contender
from udskit.bench.contenders.registry import get
from udskit.bench.host import Pinning, choose_pinning
from udskit.bench.plan import QUICK, Figure
from udskit.bench.results import Outcome, Run

ROOT = Path(__file__).resolve().parents[2]
# The large-message rows have tests of their own (test_contenders): none here.
PLAN = QUICK.capped(300).with_clients((3,)).with_large_sizes(())
UNPINNED = Pinning(None, None, "unpinned: test")


def _children() -> set[int]:
    """Live child processes of this test process (zombies are reaped by Popen.wait)."""
    me = str(os.getpid())
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == me:
                found.add(int(entry))
    return found


@pytest.fixture(autouse=True)
def no_peer_left() -> Iterator[None]:
    before = _children()
    yield
    assert _children() - before == set()


@pytest.fixture
def test_peers_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Peers import ``tests.bench.faulty_peers`` from the repository root."""
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + (os.pathsep + path if path else ""))


def _faulty(fault: str) -> Contender:
    return Contender(
        name="faulty",
        label="faulty",
        description="misbehaves on purpose",
        module="tests.bench.faulty_peers",
        transport="unix",
        options={"fault": fault},
        skips={"many": "not under test"},
    )


def _run(contender: Contender, pinning: Pinning = UNPINNED) -> Run:
    lines: list[str] = []
    return runner.run(PLAN, [contender], pinning, lambda d, t, text: lines.append(text))


def _outcome(run: Run, figure: Figure) -> Outcome:
    found = run.outcome(run.contenders[0].name, figure)
    assert found is not None
    return found


RTT = Figure("rtt", 64)


#: PLAN with time caps no loaded machine reaches: the message caps alone end each figure,
#: so the counts below are exact (with the quick caps, a busy CI machine measured 145
#: round trips of 300 in 0.2 s).
UNHURRIED = dataclasses.replace(PLAN, rtt_seconds=60.0, stream_seconds=60.0, many_seconds=60.0)


def test_real_peers_measure_every_figure() -> None:
    progress: list[tuple[int, int, str]] = []
    run = runner.run(
        UNHURRIED, [get("stdlib")], choose_pinning(), lambda d, t, s: progress.append((d, t, s))
    )
    assert [o.status for o in run.outcomes] == ["ok"] * len(PLAN.figures())
    assert [(d, t) for d, t, _ in progress] == [(i, 6) for i in range(1, 7)]
    rtt = _outcome(run, RTT)
    assert rtt.latency is not None
    assert rtt.latency.count == 300
    many = _outcome(run, Figure("many", 3))
    assert many.rate is not None
    assert many.rate.messages >= 300


def test_the_c_load_generator_drives_the_echo_servers(compiler: str) -> None:
    run = runner.run(PLAN, [get("stdlib")], UNPINNED, lambda d, t, s: None)
    assert run.loader == "C (benchmarks/udsbench.c)"
    assert _outcome(run, Figure("many", 3)).status == "ok"


def test_without_a_c_build_the_python_load_generator_stands_in(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(runner, "native_build", lambda: Build(None, "no cc (test)", None, None))
    run = runner.run(PLAN, [get("tcp")], UNPINNED, lambda d, t, s: None)
    assert run.loader == ("Python (udskit.bench.loader), as the C one is unavailable: no cc (test)")
    many = _outcome(run, Figure("many", 3))
    assert many.status == "ok", many.reason
    assert many.rate is not None
    assert many.rate.messages >= 300


def test_pipe_peers_get_their_descriptors_and_see_eof() -> None:
    run = runner.run(PLAN, [get("pipe")], UNPINNED, lambda d, t, s: None)
    statuses = {o.figure.key: o.status for o in run.outcomes}
    assert statuses == {
        "rtt_64": "ok",
        "stream_64": "ok",
        "stream_4096": "ok",
        "stream_65536": "ok",
        "stream_1048576": "ok",
        "many_3": "skipped",
    }


@pytest.mark.long
def test_repeated_runs_take_turns_and_pool_their_figures() -> None:
    progress: list[str] = []
    plan = UNHURRIED.with_repeats(2).with_sizes((4096,))
    run = runner.run(plan, [get("stdlib"), get("mp")], UNPINNED, lambda d, t, s: progress.append(s))
    rtt_turns = [line.split()[0] for line in progress if "round trip" in line]
    assert rtt_turns == ["stdlib", "mp", "stdlib", "mp"]
    assert len(progress) == 2 * 2 * len(plan.figures())
    rtt = _outcome(run, RTT)
    assert rtt.latency is not None
    assert rtt.latency.count == 2 * 300  # both runs' samples
    assert len(rtt.runs) == 2
    stream = run.outcome("mp", Figure("stream", 4096))
    assert stream is not None
    assert stream.rate is not None
    assert len(stream.runs) == 2
    assert stream.rate.msgs_per_s == min(stream.runs)  # the lower median of two runs


@pytest.mark.usefixtures("test_peers_importable")
def test_a_failed_run_ends_that_figure_for_that_contender() -> None:
    progress: list[tuple[int, int, str]] = []
    plan = PLAN.with_repeats(3).with_sizes((64,))
    run = runner.run(
        plan, [_faulty("client_crash")], UNPINNED, lambda d, t, s: progress.append((d, t, s))
    )
    rtt = [(d, t) for d, t, s in progress if "round trip" in s]
    assert rtt == [(3, 6)]  # one attempt, counted as all three runs
    assert _outcome(run, RTT).status == "failed"


@pytest.mark.usefixtures("test_peers_importable")
def test_a_server_that_crashes_is_reported_with_its_last_words() -> None:
    outcome = _outcome(_run(_faulty("crash_before_ready")), RTT)
    assert outcome.status == "failed"
    assert outcome.reason.startswith("faulty server exited before it was ready: ")
    assert outcome.reason.endswith("RuntimeError: boom before ready")


@pytest.mark.usefixtures("test_peers_importable")
def test_a_server_that_never_listens_is_killed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "READY_TIMEOUT", 1.0)
    outcome = _outcome(_run(_faulty("never_ready")), RTT)
    assert outcome.reason == "faulty server did not start listening within 1 s"


@pytest.mark.usefixtures("test_peers_importable")
def test_a_server_that_talks_nonsense_is_reported() -> None:
    outcome = _outcome(_run(_faulty("garbage")), RTT)
    assert outcome.status == "failed"
    assert outcome.reason == "peer printed 'hello\\n', not a JSON object"


@pytest.mark.usefixtures("test_peers_importable")
def test_a_client_that_fails_is_reported() -> None:
    outcome = _outcome(_run(_faulty("client_crash")), RTT)
    assert outcome.reason == "faulty client exited with status 3: client broke"


@pytest.mark.usefixtures("test_peers_importable")
def test_a_client_that_hangs_is_killed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "CLIENT_SLACK", 1.0)
    outcome = _outcome(_run(_faulty("client_hangs")), RTT)
    assert outcome.status == "failed"
    assert outcome.reason.startswith("faulty client did not finish within")


@pytest.mark.usefixtures("test_peers_importable")
def test_lost_messages_fail_the_stream_figure() -> None:
    outcome = _outcome(_run(_faulty("")), Figure("stream", 64))
    assert outcome.status == "failed"
    assert outcome.reason == "10 messages sent, 7 received"


@pytest.mark.usefixtures("test_peers_importable")
def test_warm_up_messages_are_received_but_not_measured() -> None:
    outcome = _outcome(_run(_faulty("warmup")), Figure("stream", 64))
    assert outcome.status == "ok", outcome.reason
    assert outcome.rate is not None
    assert outcome.rate.messages == 5


@pytest.mark.usefixtures("test_peers_importable")
def test_an_unavailable_contender_is_never_started() -> None:
    contender = _faulty("crash_before_ready")
    missing = Contender(**{
        field: getattr(contender, field) for field in Contender.__dataclass_fields__
    } | {"requires": lambda: "not here (install it)"})  # fmt: skip
    run = _run(missing)
    assert {o.status for o in run.outcomes} == {"unavailable"}
    assert {o.reason for o in run.outcomes} == {"not here (install it)"}
    assert run.contenders[0].available is False


def test_summarize_pools_latencies_and_reports_the_median_run() -> None:
    trials = [
        runner.Trial([10_000] * 10, 10, 0.0),
        runner.Trial([30_000] * 10, 10, 0.0),
        runner.Trial([20_000] * 10, 10, 0.0),
    ]
    rtt = runner.summarize("x", RTT, trials)
    assert rtt.runs == (10.0, 30.0, 20.0)
    assert rtt.latency is not None
    assert (rtt.latency.count, rtt.latency.p50_us) == (30, 20.0)
    streams = [runner.Trial([], 100, 1.0), runner.Trial([], 300, 1.0), runner.Trial([], 200, 1.0)]
    stream = runner.summarize("x", Figure("stream", 4096), streams)
    assert stream.runs == (100.0, 300.0, 200.0)
    assert stream.rate is not None
    assert (stream.rate.msgs_per_s, stream.rate.messages) == (200.0, 200)
    many = runner.summarize("x", Figure("many", 10), [runner.Trial([5_000, 7_000], 2, 0.5)])
    assert many.rate is not None
    assert many.latency is not None
    assert (many.rate.msgs_per_s, many.latency.count) == (4.0, 2)


def test_socket_paths_share_a_length_within_a_turn_and_change_it_between_turns() -> None:
    first = [runner.socket_path("/tmp/w", serial, 0) for serial in (1, 9, 10, 999)]
    assert len({len(path) for path in first}) == 1
    lengths = {len(runner.socket_path("/tmp/w", 1, turn)) for turn in range(3)}
    assert len(lengths) == 3
    assert runner.socket_path("/tmp/w", 1, 3) == runner.socket_path("/tmp/w", 1, 0)
    assert max(lengths) - len("/tmp/w") <= runner._PATH_ROOM
