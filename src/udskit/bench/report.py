"""The text report: one table per test, each figure with its ratio to the baseline, then the
targets and the notes that explain every empty cell."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import Final

from .plan import RTT_SIZE, Figure, size_label
from .results import LARGE_REFERENCE, Metric, Outcome, Run, metric, metric_ratio
from .targets import check

__all__ = ["format_count", "format_rate", "format_ratio", "format_us", "render"]

#: Width of the name column: the longest name and a space, at least this.
_NAME_WIDTH: Final = 18

#: Width that notes and the legend wrap at.
_WIDTH: Final = 100

#: What an empty cell says, by outcome status.
_EMPTY: Final = {
    "skipped": "n/a",
    "unavailable": "unavail.",
    "failed": "FAILED",
    "not_measured": "not meas.",
}


def format_us(value: float) -> str:
    """Microseconds with three significant figures: 4.31, 41.2, 412, 4,120."""
    if value < 10:
        return f"{value:.2f}"
    if value < 100:
        return f"{value:.1f}"
    return f"{value:,.0f}"


def format_count(value: float) -> str:
    """A rate with a k/M suffix and three significant figures: 802, 6.62k, 177k, 1.31M."""
    for suffix, scale in (("M", 1e6), ("k", 1e3)):
        if value >= scale:
            scaled = value / scale
            if scaled < 10:
                return f"{scaled:.2f}{suffix}"
            if scaled < 100:
                return f"{scaled:.1f}{suffix}"
            return f"{scaled:.0f}{suffix}"
    return f"{value:.0f}"


def format_rate(value: float) -> str:
    """Megabytes per second: 11.3, 1,428."""
    return f"{value:.1f}" if value < 100 else f"{value:,.0f}"


def format_ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def _cell(
    run: Run,
    outcome: Outcome | None,
    name: Metric,
    width: int,
    ratio: bool,
) -> str:
    """One metric (and its ratio) right-aligned in ``width`` (+7 for the ratio)."""
    if outcome is None:
        return " " * (width + (7 if ratio else 0))
    value = metric(outcome, name)
    if value is None:
        text = _EMPTY.get(outcome.status, "-")
        return f"{text:>{width}}" + (" " * 7 if ratio else "")
    shown = (
        format_us(value)
        if name.endswith("_us") or name == "kib_per_client"
        else format_count(value)
        if name == "msgs_per_s"
        else format_rate(value)
    )
    cell = f"{shown:>{width}}"
    if ratio:
        cell += f"{format_ratio(metric_ratio(run, outcome, name)):>7}"
    return cell


def _rows(
    run: Run,
    columns: Sequence[tuple[Figure, Metric, bool]],
    width: int,
) -> list[str]:
    """One line per contender; ratios to each figure's reference (see ``reference``)."""
    lines = []
    for info in run.contenders:
        outcomes = [run.outcome(info.name, figure) for figure, _, _ in columns]
        if all(o is None or o.status == "skipped" for o in outcomes):
            continue  # a test this contender does not run: the Notes say why
        cells = [_cell(run, o, m, width, r) for o, (_, m, r) in zip(outcomes, columns, strict=True)]
        lines.append(f"{info.name:<{_name_width(run)}}" + "  ".join(cells))
    return lines


def _name_width(run: Run) -> int:
    return max([_NAME_WIDTH - 1, *(len(info.name) for info in run.contenders)]) + 1


def _header(run: Run, titles: Sequence[tuple[str, bool]], width: int) -> str:
    parts = [f"{title:>{width + (7 if ratio else 0)}}" for title, ratio in titles]
    return " " * _name_width(run) + "  ".join(parts)


def _latency_table(run: Run) -> list[str]:
    rtt = Figure("rtt", RTT_SIZE)
    columns: list[tuple[Figure, Metric, bool]] = [(rtt, "p50_us", True), (rtt, "p99_us", True)]
    return [
        f"Round trip, {size_label(RTT_SIZE)} (µs; x < 1 is faster)",
        _header(run, [("p50", True), ("p99", True)], 9),
        *_rows(run, columns, 9),
    ]


def _stream_tables(run: Run) -> list[str]:
    figures = [Figure("stream", size) for size in run.plan.stream_sizes]
    titles = [(size_label(f.param), True) for f in figures]
    rates: list[tuple[Figure, Metric, bool]] = [(f, "msgs_per_s", True) for f in figures]
    megabytes: list[tuple[Figure, Metric, bool]] = [(f, "mb_per_s", False) for f in figures]
    return [
        "One-way throughput, messages per second (x > 1 is faster)",
        _header(run, titles, 7),
        *_rows(run, rates, 7),
        "",
        "One-way throughput, payload MB/s",
        _header(run, [(t, False) for t, _ in titles], 7),
        *_rows(run, megabytes, 7),
    ]


def _large_table(run: Run) -> list[str]:
    figures = [Figure("large", size) for size in run.plan.large_sizes]
    if not figures:
        return []
    titles = [(size_label(f.param), True) for f in figures]
    megabytes: list[tuple[Figure, Metric, bool]] = [(f, "mb_per_s", True) for f in figures]
    return [
        f"Large messages one-way, payload MB/s (x: ratio to {LARGE_REFERENCE}, > 1 is faster)",
        _header(run, titles, 7),
        *_rows(run, megabytes, 7),
    ]


def _many_table(run: Run) -> list[str]:
    columns: list[tuple[Figure, Metric, bool]] = []
    titles = []
    for clients in run.plan.clients:
        figure = Figure("many", clients)
        columns += [(figure, "msgs_per_s", True), (figure, "p99_us", False)]
        titles += [(f"{clients} cl. msg/s", True), ("p99 µs", False)]
    memory: list[tuple[Figure, Metric, bool]] = [
        (Figure("many", clients), "kib_per_client", False) for clients in run.plan.clients
    ]
    return [
        "Many clients: echo of 64 B, aggregate msg/s and p99 latency",
        *([f"(load generator: {run.loader})"] if run.loader else []),
        _header(run, titles, 9),
        *_rows(run, columns, 9),
        "",
        "Many clients: server memory, RSS growth per connected client (KiB)",
        _header(run, [(f"{clients} cl.", False) for clients in run.plan.clients], 9),
        *_rows(run, memory, 9),
    ]


def _targets(run: Run) -> list[str]:
    lines = []
    for item in check(run):
        verdict = "met" if item.met else "MISSED" if item.met is False else "not measured"
        ratio = format_ratio(item.ratio)
        detail = f" ({item.why_missing})" if item.why_missing else ""
        lines.append(f"  {item.text:<52} {ratio:>7}  {verdict}{detail}")
    return ["Targets (this run)", *lines] if lines else []


def _notes(run: Run) -> list[str]:
    lines = [
        f"  {info.name}: unavailable: {info.reason}"
        for info in run.contenders
        if not info.available
    ]
    lines += [
        f"  {outcome.contender}, {outcome.figure.title}: FAILED: {outcome.reason}"
        for outcome in run.outcomes
        if outcome.status == "failed"
    ]
    skipped: dict[str, list[str]] = {}
    unmeasured: dict[str, list[str]] = {}
    for outcome in run.outcomes:
        if outcome.status == "skipped":
            skipped.setdefault(outcome.reason, [])
            entry = f"{outcome.contender} {outcome.figure.test}"
            if entry not in skipped[outcome.reason]:
                skipped[outcome.reason].append(entry)
        elif outcome.status == "not_measured":
            titles = unmeasured.setdefault(outcome.reason, [])
            if outcome.figure.title not in titles:
                titles.append(outcome.figure.title)
    for reason, titles in unmeasured.items():
        lines.append(f"  not meas. ({', '.join(titles)}): {reason}")
    for reason, entries in skipped.items():
        lines.append(f"  n/a ({', '.join(entries)}): {reason}")
    wrapped = [
        part
        for line in lines
        for part in textwrap.wrap(line, width=_WIDTH, subsequent_indent="      ")
    ]
    return ["Notes", *wrapped] if wrapped else []


def _legend(run: Run) -> list[str]:
    lines = ["Contenders"]
    for info in run.contenders:
        lines += textwrap.wrap(
            info.description,
            width=_WIDTH,
            initial_indent=f"  {info.name:<{_name_width(run)}}",
            subsequent_indent=" " * (_name_width(run) + 2),
        )
    return lines


def render(run: Run) -> str:
    """The whole report, as printed by ``udskit bench``."""
    host = run.host
    title = (
        f"udskit bench ({run.plan.name} run, {run.started}, {run.seconds:.0f} s): udskit "
        f"{run.udskit_version}, Python {host.get('python')}, Linux {host.get('kernel')}, "
        f"{host.get('cpu_model')}, {host.get('cpus_allowed')} CPUs"
    )
    tests = run.plan.tests
    if "large" not in tests:
        ratios = f"ratios (x) are to {run.baseline}"
    elif tests == ("large",):
        ratios = f"ratios (x) are to {LARGE_REFERENCE}"
    else:
        ratios = f"ratios (x) are to {run.baseline}, of large messages to {LARGE_REFERENCE}"
    heading = [
        title,
        f"pinning: {run.pinning.note}",
        f"{ratios}; MB/s are payload megabytes (10^6 bytes) per second",
        *run.notes,
    ]
    sections = [
        heading,
        _latency_table(run) if "rtt" in tests else [],
        _stream_tables(run) if "stream" in tests else [],
        _large_table(run) if "large" in tests else [],
        _many_table(run) if "many" in tests else [],
        _targets(run),
        _notes(run),
        _legend(run),
    ]
    return "\n\n".join("\n".join(lines) for lines in sections if lines) + "\n"
