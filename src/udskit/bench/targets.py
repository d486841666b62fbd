"""udskit's performance targets, checked against one run's figures.

Each target compares one contender's metric with another's (same run, same pinning); the
10,000-client target asks only that every client was served without an error, and the
message servers' memory target is an absolute bound per client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from .plan import Figure, size_label
from .results import LOWER_IS_BETTER, Metric, Run, metric, metric_ratio

__all__ = ["TARGETS", "Checked", "Target", "check"]


@dataclass(frozen=True, slots=True)
class Target:
    text: str
    contender: str
    figure: Figure
    metric: Metric
    against: str
    op: Literal["<=", ">="]
    bound: float


@dataclass(frozen=True, slots=True)
class Checked:
    """A target and what this run made of it: the measured ratio, and whether it holds
    (None when a figure is missing)."""

    text: str
    ratio: float | None
    met: bool | None
    why_missing: str = ""


def _target(
    what: str, contender: str, figure: Figure, name: Metric, against: str, bound: float
) -> Target:
    op: Literal["<=", ">="] = "<=" if name in LOWER_IS_BETTER else ">="
    return Target(f"{what} {op} {bound}x {against}", contender, figure, name, against, op, bound)


_RTT: Final = Figure("rtt", 64)
_64B: Final = Figure("stream", 64)


def _many(clients: int) -> Figure:
    return Figure("many", clients)


def _servers() -> tuple[Target, ...]:
    """The many-clients targets: the message servers at least as fast as the hand-written
    selectors server at every client count, and the thread-per-client server's tail."""
    targets: list[Target] = []
    for n in (100, 1000, 10_000):
        targets += [
            _target(f"{n} clients msg/s", "udskit-msg", _many(n), "msgs_per_s", "stdlib", 1.0),
            _target(f"{n} clients p99", "udskit-msg", _many(n), "p99_us", "stdlib", 1.0),
            _target(
                f"aio {n} clients msg/s", "udskit-aio-msg", _many(n), "msgs_per_s", "stdlib", 0.9
            ),
        ]
    for n in (1000, 10_000):
        targets += [
            _target(
                f"aio uvloop {n} clients msg/s",
                "udskit-aio-msg-uvloop",
                _many(n),
                "msgs_per_s",
                "stdlib",
                1.0,
            ),
            _target(
                f"aio uvloop {n} clients msg/s",
                "udskit-aio-msg-uvloop",
                _many(n),
                "msgs_per_s",
                "uvloop",
                1.2,
            ),
        ]
    targets.append(
        _target("Server 1000 clients p99", "udskit", _many(1000), "p99_us", "stdlib", 5.0)
    )
    return tuple(targets)


def _large() -> tuple[Target, ...]:
    """The shared-memory targets: against the C reference with 1 MiB buffers at 16 and
    256 MiB, ahead of the hand-written shared_memory handoff on every row, ahead of the
    socket path at 1 MiB, and no worse than it below the threshold (64 KiB)."""
    targets: list[Target] = []
    for size in (16 << 20, 256 << 20):
        figure = Figure("large", size)
        label = size_label(size)
        targets += [
            _target(f"{label} in place", "udskit-shm-view", figure, "mb_per_s", "c-1mib", 3.0),
            _target(f"{label} copy-out", "udskit-shm-copy", figure, "mb_per_s", "c-1mib", 1.5),
            _target(f"{label} loan", "udskit-shm-loan", figure, "mb_per_s", "c-1mib", 10.0),
        ]
    for size in (1 << 20, 16 << 20, 256 << 20):
        figure = Figure("large", size)
        for mode in ("copy", "view", "loan"):
            targets.append(
                _target(
                    f"{size_label(size)} shm {mode}",
                    f"udskit-shm-{mode}",
                    figure,
                    "mb_per_s",
                    "mp-shm",
                    1.0,
                )
            )
    one = Figure("large", 1 << 20)
    below = Figure("large", 64 * 1024)
    targets += [
        _target("1 MiB in place", "udskit-shm-view", one, "mb_per_s", "udskit-sock", 1.5),
        _target("1 MiB copy-out", "udskit-shm-copy", one, "mb_per_s", "udskit-sock", 1.5),
        _target("64 KiB shm channel", "udskit-shm-copy", below, "mb_per_s", "udskit-sock", 0.9),
    ]
    return tuple(targets)


TARGETS: Final = (
    _target("udskit round trip p50", "udskit", _RTT, "p50_us", "stdlib", 1.05),
    _target("udskit round trip p99", "udskit", _RTT, "p99_us", "stdlib", 1.10),
    _target("udskit-spin round trip p50", "udskit-spin", _RTT, "p50_us", "stdlib", 0.35),
    _target("aio on uvloop round trip p50", "udskit-aio-uvloop", _RTT, "p50_us", "uvloop", 1.0),
    _target("aio round trip p50", "udskit-aio", _RTT, "p50_us", "asyncio", 0.8),
    _target("64 B one-way batched msg/s", "udskit-batch", _64B, "msgs_per_s", "stdlib", 2.0),
    _target("64 B one-way batched msg/s", "udskit-batch", _64B, "msgs_per_s", "zmq", 1.3),
    _target("4 KiB one-way", "udskit", Figure("stream", 4096), "msgs_per_s", "stdlib", 1.0),
    _target("64 KiB one-way", "udskit", Figure("stream", 65536), "msgs_per_s", "stdlib", 1.0),
    _target("1 MiB one-way", "udskit", Figure("stream", 1 << 20), "msgs_per_s", "c-1mib", 0.9),
    _target(
        "aio 1 MiB one-way", "udskit-aio", Figure("stream", 1 << 20), "msgs_per_s", "asyncio", 5.0
    ),
    *_servers(),
    *_large(),
)

#: Every udskit server holds this many clients with no error.
MANY_CLIENTS: Final = 10_000

#: The servers that must hold MANY_CLIENTS.
_UDSKIT_SERVERS: Final = (
    "udskit",
    "udskit-aio",
    "udskit-aio-uvloop",
    "udskit-msg",
    "udskit-aio-msg",
    "udskit-aio-msg-uvloop",
)

#: A message server holds no thread and no buffer per client: at most this much memory
#: (KiB of RSS) per idle client, at the largest client count of the run.
MESSAGE_SERVER_KIB: Final = 4.0


def check(run: Run) -> list[Checked]:
    """Every target this run can speak to (those whose contenders were selected)."""
    selected = {info.name for info in run.contenders}
    figures = set(run.plan.figures())
    checked = []
    for target in TARGETS:
        if target.contender not in selected or target.against not in selected:
            continue
        if target.figure not in figures:
            continue  # a test or size this run does not make
        outcome = run.outcome(target.contender, target.figure)
        value = (
            None if outcome is None else metric_ratio(run, outcome, target.metric, target.against)
        )
        if value is None:
            missing = [
                name
                for name in (target.contender, target.against)
                if metric(run.outcome(name, target.figure), target.metric) is None
            ]
            checked.append(Checked(target.text, None, None, f"no figure for {', '.join(missing)}"))
            continue
        met = value <= target.bound if target.op == "<=" else value >= target.bound
        checked.append(Checked(target.text, value, met))
    many = Figure("many", MANY_CLIENTS)
    for name in _UDSKIT_SERVERS if many in figures else ():
        outcome = run.outcome(name, many)
        if outcome is None or outcome.status in ("unavailable", "skipped"):
            continue
        text = f"{name}: {MANY_CLIENTS} clients held with no error"
        if outcome.status == "not_measured":
            checked.append(Checked(text, None, None, outcome.reason))
        elif outcome.status == "ok":
            checked.append(Checked(text, None, True))
        else:
            checked.append(Checked(text, None, False, outcome.reason))
    largest = max((f for f in figures if f.test == "many"), key=lambda f: f.param, default=None)
    for name in ("udskit-msg", "udskit-aio-msg", "udskit-aio-msg-uvloop"):
        if largest is None or name not in selected:
            continue
        kib = metric(run.outcome(name, largest), "kib_per_client")
        text = f"{name}: RSS per client at {largest.param} clients <= {MESSAGE_SERVER_KIB:g} KiB"
        if kib is None:
            checked.append(Checked(text, None, None, "no figure"))
        else:
            checked.append(Checked(f"{text} ({kib:.2f})", None, kib <= MESSAGE_SERVER_KIB))
    return checked
