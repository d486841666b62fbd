"""The server memory column: RSS read from /proc, growth per client, the median run's, and
how the report and the JSON show it."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

from tests.bench.test_report import make_run
from udskit.bench.memory import ServerMemory, rss_kib
from udskit.bench.plan import Figure
from udskit.bench.report import render
from udskit.bench.results import Outcome, Run, metric, to_json, validate
from udskit.bench.runner import Trial, _progress_text, summarize
from udskit.bench.stats import latency, throughput

MANY = Figure("many", 10_000)


def test_growth_per_client_is_the_rss_difference_over_the_clients() -> None:
    assert (
        ServerMemory(ready_kib=10_000, connected_kib=30_480, clients=1000).kib_per_client == 20.48
    )
    assert ServerMemory(ready_kib=10_000, connected_kib=9_900, clients=100).kib_per_client == -1.0


def test_rss_of_a_live_process_and_of_none() -> None:
    mine = rss_kib(os.getpid())
    assert mine is not None
    assert mine > 1000  # an interpreter with pytest loaded holds megabytes
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert rss_kib(child.pid) is None  # reaped: /proc has no such process


def test_rss_grows_with_what_a_process_touches() -> None:
    code = (
        "import sys; from udskit.bench.memory import rss_kib; import os\n"
        "before = rss_kib(os.getpid()); block = bytearray(64 << 20)\n"
        "block[::4096] = b'x' * len(block[::4096]); print(rss_kib(os.getpid()) - before)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert 60_000 <= int(out.stdout) <= 70_000  # 64 MiB touched, in KiB


def _trial(msgs: int, memory: ServerMemory | None) -> Trial:
    return Trial([1000] * 10, msgs, 1.0, memory)


def test_summarize_keeps_the_median_runs_memory() -> None:
    runs = [
        ServerMemory(1000, 31_000, 1000),  # 30 KiB per client
        ServerMemory(1000, 11_000, 1000),  # 10
        ServerMemory(1000, 21_000, 1000),  # 20
    ]
    outcome = summarize("udskit", MANY, [_trial(100, m) for m in runs])
    assert outcome.memory == runs[2]
    assert metric(outcome, "kib_per_client") == 20.0
    # A run whose server's RSS could not be read is left out; none at all: no figure.
    partly = summarize("udskit", MANY, [_trial(100, None), _trial(100, runs[1])])
    assert partly.memory == runs[1]
    assert summarize("udskit", MANY, [_trial(100, None)]).memory is None


def _with_memory() -> Run:
    run = make_run()
    outcomes = [
        dataclasses.replace(o, memory=ServerMemory(20_000, 20_000 + 1234 * 1000, 1000))
        if o.contender == "stdlib" and o.figure == MANY
        else o
        for o in run.outcomes
    ]
    outcomes.append(Outcome("stdlib", Figure("many", 10), "not_measured", "RLIMIT_NOFILE is 5"))
    return dataclasses.replace(run, outcomes=outcomes)


def test_the_report_has_a_memory_table_under_the_many_clients_table() -> None:
    run = _with_memory()
    text = render(run)
    lines = text.splitlines()
    start = lines.index("Many clients: server memory, RSS growth per connected client (KiB)")
    assert lines[start + 1].split() == ["10", "cl.", "10000", "cl."]
    assert lines[start + 2].split() == ["stdlib", "not", "meas.", "1,234"]
    assert lines[start + 3].split() == ["udskit", "FAILED"]  # no figure where the run failed
    assert "  not meas. (10 clients): RLIMIT_NOFILE is 5" in lines


def test_the_json_keeps_both_rss_readings_and_the_growth() -> None:
    run = _with_memory()
    document = to_json(run)
    validate(document)
    outcomes = document["outcomes"]
    assert isinstance(outcomes, list)
    many = next(o for o in outcomes if o["contender"] == "stdlib" and o["figure"] == "many_10000")
    assert many["server_memory"] == {
        "ready_kib": 20_000,
        "connected_kib": 1_254_000,
        "clients": 1000,
        "kib_per_client": 1234.0,
    }
    assert many["ratios"]["kib_per_client"] == 1.0  # the baseline's own
    assert document["units"]["kib_per_client"].startswith("server RSS growth per connected")
    unmeasured = next(o for o in outcomes if o["status"] == "not_measured")
    assert (unmeasured["status"], unmeasured["server_memory"]) == ("not_measured", None)


def test_progress_names_the_growth_per_client() -> None:
    outcome = Outcome(
        "stdlib",
        MANY,
        "ok",
        latency=latency([1000] * 10),
        rate=throughput(1000, 64, 1.0),
        memory=ServerMemory(0, 2500, 1000),
    )
    assert _progress_text(outcome).endswith(", server +2.5 KiB per client")
