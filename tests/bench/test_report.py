"""The report, the JSON document and the targets, from a hand-built run."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest

from udskit.bench.host import Pinning
from udskit.bench.plan import QUICK, Figure
from udskit.bench.report import format_count, format_rate, format_ratio, format_us, render
from udskit.bench.results import (
    SCHEMA,
    ContenderInfo,
    Outcome,
    Run,
    metric,
    metric_ratio,
    to_json,
    validate,
)
from udskit.bench.stats import latency, throughput
from udskit.bench.targets import check

PLAN = QUICK.with_clients((10, 10_000))
RTT = Figure("rtt", 64)
S64 = Figure("stream", 64)
MANY = Figure("many", 10_000)


def _info(name: str, available: bool = True, reason: str = "") -> ContenderInfo:
    return ContenderInfo(name, name, f"the {name} contender", available, reason)


def _rtt(name: str, p50_ns: int) -> Outcome:
    return Outcome(name, RTT, "ok", latency=latency([p50_ns] * 90 + [p50_ns * 3] * 10))


def _stream(name: str, figure: Figure, msgs_per_s: float) -> Outcome:
    return Outcome(name, figure, "ok", rate=throughput(int(msgs_per_s), figure.param, 1.0))


def make_run() -> Run:
    outcomes = [
        _rtt("stdlib", 40_000),
        _rtt("udskit", 42_000),
        _rtt("udskit-spin", 10_000),
        Outcome("pipe", RTT, "failed", "pipe server exited with status 1: boom"),
        _stream("stdlib", S64, 500_000),
        _stream("udskit", S64, 600_000),
        Outcome("udskit-spin", S64, "ok", rate=throughput(100, 64, 0.001)),
        _stream("pipe", S64, 800_000),
        Outcome(
            "stdlib",
            MANY,
            "ok",
            latency=latency([1_000_000] * 10),
            rate=throughput(50_000, 64, 1.0),
        ),
        Outcome("udskit", MANY, "failed", "3 errors, the first: an echo differed", errors=3),
        Outcome("pipe", MANY, "skipped", "a pipe joins exactly two processes"),
        Outcome("udskit-spin", MANY, "skipped", "polling is for one peer"),
    ]
    outcomes += [
        Outcome("zmq", figure, "unavailable", "zmq is not installed (pip install 'udskit[bench]')")
        for figure in PLAN.figures()
    ]
    return Run(
        plan=PLAN,
        pinning=Pinning(0, 1, "server pinned to CPU 0, client and load generator to CPU 1"),
        host={"python": "3.11.7", "kernel": "6.1", "cpu_model": "Test CPU", "cpus_allowed": 2},
        baseline="stdlib",
        contenders=[
            _info("stdlib"),
            _info("udskit"),
            _info("udskit-spin"),
            _info("pipe"),
            _info("zmq", False, "zmq is not installed (pip install 'udskit[bench]')"),
        ],
        outcomes=outcomes,
        started="2026-01-01T00:00:00+00:00",
        seconds=42.0,
        udskit_version="0.1.0",
        notes=("stdlib was added to --only",),
    )


@pytest.mark.parametrize(
    ("value", "text"), [(4.314, "4.31"), (41.26, "41.3"), (412.4, "412"), (4120.0, "4,120")]
)
def test_format_us(value: float, text: str) -> None:
    assert format_us(value) == text


@pytest.mark.parametrize(
    ("value", "text"),
    [(802, "802"), (6620, "6.62k"), (17_700, "17.7k"), (177_244, "177k"), (1_310_000, "1.31M")],
)
def test_format_count(value: float, text: str) -> None:
    assert format_count(value) == text


def test_format_rate_and_ratio() -> None:
    assert format_rate(11.34) == "11.3"
    assert format_rate(1428.4) == "1,428"
    assert format_ratio(1.0449) == "1.04x"
    assert format_ratio(None) == ""


def test_metrics_and_ratios_come_from_ok_outcomes_only() -> None:
    run = make_run()
    udskit = run.outcome("udskit", RTT)
    assert udskit is not None
    assert metric(udskit, "p50_us") == 42.0
    assert metric_ratio(run, udskit, "p50_us") == pytest.approx(1.05)
    assert metric(run.outcome("pipe", RTT), "p50_us") is None
    assert metric(run.outcome("nobody", RTT), "p50_us") is None
    stream = run.outcome("udskit", S64)
    assert stream is not None
    assert metric_ratio(run, stream, "msgs_per_s") == pytest.approx(1.2)
    assert metric_ratio(run, stream, "msgs_per_s", against="pipe") == pytest.approx(0.75)


@pytest.mark.parametrize(
    ("tests", "ratios"),
    [
        (("rtt", "stream", "many"), "ratios (x) are to stdlib;"),
        (("rtt", "large"), "ratios (x) are to stdlib, of large messages to c-1mib;"),
        (("large",), "ratios (x) are to c-1mib;"),
    ],
)
def test_the_heading_names_the_reference_of_the_tests_run(
    tests: tuple[str, ...], ratios: str
) -> None:
    # It said "ratios (x) are to stdlib" of a run of large messages alone.
    run = dataclasses.replace(make_run(), plan=PLAN.with_tests(tests))
    heading = render(run).splitlines()[2]
    assert heading == f"{ratios} MB/s are payload megabytes (10^6 bytes) per second"


def test_render_shows_every_figure_with_its_ratio() -> None:
    text = render(make_run())
    assert "pinning: server pinned to CPU 0, client and load generator to CPU 1" in text
    assert "stdlib was added to --only" in text
    lines = text.splitlines()
    udskit_rtt = next(line for line in lines if line.startswith("udskit ") and "1.05x" in line)
    assert "42.0" in udskit_rtt
    assert "126" in udskit_rtt  # p99: the slow sample
    assert any(line.startswith("udskit ") and "600k" in line and "1.20x" in line for line in lines)
    assert any(line.startswith("pipe ") and "FAILED" in line for line in lines)
    assert any(line.startswith("zmq ") and "unavail." in line for line in lines)


def test_render_explains_every_empty_cell_in_the_notes() -> None:
    text = render(make_run())
    notes = text[text.index("\nNotes\n") :]
    assert "zmq: unavailable: zmq is not installed" in notes
    assert "pipe, round trip 64 B: FAILED: pipe server exited with status 1: boom" in notes
    assert "udskit, 10000 clients: FAILED: 3 errors" in notes
    assert "n/a (pipe many): a pipe joins exactly two processes" in notes


def test_rows_of_tests_a_contender_does_not_run_are_left_out() -> None:
    text = render(make_run())
    many = text[text.index("Many clients") : text.index("Targets (this run)")]
    assert "pipe" not in many
    assert "udskit-spin" not in many
    assert "zmq" in many  # unavailable is not "does not run": it shows, marked


def test_targets_are_checked_against_the_right_references() -> None:
    checked = {item.text: item for item in check(make_run())}
    p50 = checked["udskit round trip p50 <= 1.05x stdlib"]
    assert p50.ratio == pytest.approx(1.05)
    assert p50.met is True
    assert checked["udskit-spin round trip p50 <= 0.35x stdlib"].met is True
    assert checked["4 KiB one-way >= 1.0x stdlib"].met is None
    assert "no figure for udskit, stdlib" in checked["4 KiB one-way >= 1.0x stdlib"].why_missing
    held = checked["udskit: 10000 clients held with no error"]
    assert held.met is False
    assert "an echo differed" in held.why_missing
    # Targets naming a contender that was not selected are not listed at all.
    assert not any("aio" in text for text in checked)


def test_render_lists_missed_targets() -> None:
    text = render(make_run())
    assert "udskit: 10000 clients held with no error" in text
    assert "MISSED" in text


def test_json_document_round_trips_and_validates() -> None:
    document = json.loads(json.dumps(to_json(make_run())))
    validate(document)
    assert document["schema"] == SCHEMA
    assert document["pinning"] == {
        "pinned": True,
        "server_cpu": 0,
        "client_cpu": 1,
        "note": "server pinned to CPU 0, client and load generator to CPU 1",
    }
    by_key = {(o["contender"], o["figure"]): o for o in document["outcomes"]}
    udskit = by_key[("udskit", "rtt_64")]
    assert udskit["latency"]["p50_us"] == 42.0
    assert udskit["ratios"]["p50_us"] == pytest.approx(1.05)
    assert by_key[("zmq", "stream_65536")]["status"] == "unavailable"
    assert by_key[("udskit", "many_10000")]["errors"] == 3
    assert document["plan"]["clients"] == [10, 10_000]


def _broken(change: str) -> dict[str, object]:
    document = copy.deepcopy(to_json(make_run()))
    outcomes = document["outcomes"]
    assert isinstance(outcomes, list)
    if change == "schema":
        document["schema"] = "other/9"
    elif change == "missing":
        del document["pinning"]
    elif change == "type":
        document["seconds"] = "fast"
    elif change == "contender":
        outcomes[0]["contender"] = "ghost"
    elif change == "status":
        outcomes[0]["status"] = "great"
    elif change == "reason":
        failed = next(o for o in outcomes if o["status"] == "failed")
        failed["reason"] = ""
    elif change == "latency":
        outcomes[0]["latency"] = None
    return document


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("schema", "schema is 'other/9'"),
        ("missing", "missing 'pinning'"),
        ("type", "'seconds' has the wrong type"),
        ("contender", "contender 'ghost' is not listed"),
        ("status", "unknown status 'great'"),
        ("reason", "needs a reason"),
        ("latency", "needs latency"),
    ],
)
def test_validate_names_what_is_wrong(change: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate(_broken(change))


def test_validate_refuses_a_non_object() -> None:
    with pytest.raises(ValueError, match="JSON object"):
        validate([])


def test_a_long_contender_name_widens_the_name_column() -> None:
    run = make_run()
    long = "udskit-aio-msg-uvloop"
    outcomes = [*run.outcomes, _rtt(long, 40_000)]
    contenders = [*run.contenders, _info(long)]
    text = render(dataclasses.replace(run, outcomes=outcomes, contenders=contenders))
    lines = text.splitlines()
    start = lines.index("Round trip, 64 B (µs; x < 1 is faster)")
    header, stdlib = lines[start + 1 : start + 3]
    row = next(line for line in lines if line.startswith(long + " "))
    assert len(header) == len(stdlib) == len(row)
    assert row.split() == [long, "40.0", "1.00x", "120", "1.00x"]
    assert f"  {long} the {long} contender" in lines


def test_json_ratios_of_large_messages_are_those_of_the_table() -> None:
    # They were null in the JSON (computed against stdlib, which runs no large messages)
    # while the table showed them against c-1mib.
    large = Figure("large", 16 * 1024 * 1024)
    run = dataclasses.replace(
        make_run(),
        plan=PLAN.with_large_sizes((large.param,)).with_tests(("large",)),
        contenders=[_info("c-1mib"), _info("udskit-shm-copy")],
        outcomes=[
            Outcome("c-1mib", large, "ok", rate=throughput(1000, large.param, 1.0)),
            Outcome("udskit-shm-copy", large, "ok", rate=throughput(1500, large.param, 1.0)),
        ],
    )
    document = json.loads(json.dumps(to_json(run)))
    validate(document)
    by_key = {(o["contender"], o["figure"]): o for o in document["outcomes"]}
    ratios = by_key[("udskit-shm-copy", large.key)]["ratios"]
    assert ratios == {"mb_per_s": pytest.approx(1.5), "msgs_per_s": pytest.approx(1.5)}
    assert by_key[("c-1mib", large.key)]["ratios"]["mb_per_s"] == pytest.approx(1.0)
    row = next(line for line in render(run).splitlines() if line.startswith("udskit-shm-copy"))
    assert row.split()[-1] == "1.50x"
    assert "c-1mib's for large messages" in document["units"]["ratios"]
