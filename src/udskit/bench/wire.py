"""What a peer process is told, and what it answers.

The runner starts every peer (Python or C) with one job and reads JSON lines from its stdout:
``{"ready": ADDRESS}`` once a server accepts connections, then ``{"result": {...}}`` from
the side that measured. A peer that fails exits non-zero with its reason on stderr.

The many-clients load generator also prints ``{"connected": N}`` once its N clients are
connected and each has had one echo, then waits for a line (or EOF) on stdin before the timed
part: the runner samples the server's memory in between. A peer that cannot run its job on
this host as configured (too few descriptors allowed) prints ``{"not_measured": REASON}``
and exits 0: the figure is not measured, which is not a failure of the contender.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Literal, TypeAlias

__all__ = [
    "Job",
    "LoadResult",
    "Option",
    "Role",
    "RttResult",
    "SendResult",
    "StreamResult",
    "decode_line",
    "fail",
    "parse_load",
    "parse_rtt",
    "parse_send",
    "parse_stream",
    "say_connected",
    "say_not_measured",
    "say_ready",
    "say_result",
    "wait_for_go",
]

Role: TypeAlias = Literal[
    "rtt_server", "rtt_client", "stream_receiver", "stream_sender", "echo_server", "load"
]
Option: TypeAlias = str | int | float | bool


@dataclass(frozen=True, slots=True)
class Job:
    """One peer's work: which contender (and the module holding its roles), which role,
    where to meet, how much, how long."""

    contender: str
    module: str
    role: Role
    address: str
    size: int = 64
    count: int = 0
    warmup: int = 0
    seconds: float = 0.0
    clients: int = 0
    cpu: int | None = None
    fds: tuple[int, ...] = ()
    options: Mapping[str, Option] = field(default_factory=dict)

    def to_json(self) -> str:
        data = asdict(self)
        data["options"] = dict(self.options)
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> Job:
        data = json.loads(text)
        data["fds"] = tuple(data.get("fds", ()))
        return cls(**data)

    def option(self, name: str, default: Option) -> Option:
        return self.options.get(name, default)


@dataclass(frozen=True, slots=True)
class RttResult:
    """Round-trip times in nanoseconds, warm-up excluded, in the order measured."""

    samples_ns: list[int]


@dataclass(frozen=True, slots=True)
class StreamResult:
    """What a one-way receiver counted, and when (CLOCK_MONOTONIC, ns) the last one came."""

    messages: int
    last_ns: int


@dataclass(frozen=True, slots=True)
class SendResult:
    """What a one-way sender sent, and when (CLOCK_MONOTONIC, ns) it began.

    Both peers read the same system-wide clock, so the receiver's ``last_ns`` minus this
    ``started_ns`` is the transfer's duration, whatever the processes' start-up times.
    ``warmup`` messages went before the clock started: the receiver counts them too.
    """

    messages: int
    started_ns: int
    warmup: int = 0


@dataclass(frozen=True, slots=True)
class LoadResult:
    """What the many-clients load generator saw: echoes, their latencies, and any errors."""

    clients: int
    messages: int
    seconds: float
    samples_ns: list[int]
    errors: int
    first_error: str


def say_ready(address: str) -> None:
    print(json.dumps({"ready": address}), flush=True)


def say_connected(clients: int) -> None:
    print(json.dumps({"connected": clients}), flush=True)


def wait_for_go() -> None:
    """Block until the runner writes a line to stdin, or closes it (EOF: go at once)."""
    sys.stdin.buffer.readline()


def say_not_measured(reason: str) -> None:
    """Tell the runner this figure cannot be measured here, why, and end the peer."""
    print(reason, file=sys.stderr, flush=True)
    print(json.dumps({"not_measured": reason}), flush=True)
    raise SystemExit(0)


def say_result(result: RttResult | StreamResult | SendResult | LoadResult) -> None:
    print(json.dumps({"result": asdict(result)}), flush=True)


def decode_line(line: str) -> dict[str, object]:
    """One protocol line as a dict; ValueError naming the line if it is not one."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        shown = line if len(line) < 80 else line[:77] + "..."
        raise ValueError(f"peer printed {shown!r}, not a JSON object")  # noqa: TRY004
    return value


def parse_rtt(value: object) -> RttResult:
    data = _object(value)
    samples = data.get("samples_ns")
    if not isinstance(samples, list) or not all(isinstance(s, int) for s in samples):
        raise ValueError("round-trip result without a list of integer samples_ns")
    return RttResult(samples)


def parse_stream(value: object) -> StreamResult:
    data = _object(value)
    return StreamResult(messages=_int(data, "messages"), last_ns=_int(data, "last_ns"))


def parse_send(value: object) -> SendResult:
    data = _object(value)
    return SendResult(
        messages=_int(data, "messages"),
        started_ns=_int(data, "started_ns"),
        warmup=_int(data, "warmup"),
    )


def parse_load(value: object) -> LoadResult:
    data = _object(value)
    samples = data.get("samples_ns")
    if not isinstance(samples, list) or not all(isinstance(s, int) for s in samples):
        raise ValueError("load result without a list of integer samples_ns")
    first_error = data.get("first_error", "")
    return LoadResult(
        clients=_int(data, "clients"),
        messages=_int(data, "messages"),
        seconds=_float(data, "seconds"),
        samples_ns=samples,
        errors=_int(data, "errors"),
        first_error=str(first_error),
    )


def _object(value: object) -> dict[str, object]:
    if not isinstance(value, dict):
        raise ValueError(f"a result must be a JSON object, not {type(value).__name__}")  # noqa: TRY004
    return value


def _int(data: dict[str, object], key: str) -> int:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"result field {key!r} must be an integer, not {value!r}")  # noqa: TRY004
    return value


def _float(data: dict[str, object], key: str) -> float:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"result field {key!r} must be a number, not {value!r}")  # noqa: TRY004
    return float(value)


def fail(message: str) -> None:
    """End a peer with a one-line reason on stderr (the runner shows it in the table)."""
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(1)
