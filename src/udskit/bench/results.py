"""The results of a run as values: one Outcome per contender and figure, and the whole Run.

``to_json`` is the ``--json`` file's format (schema ``udskit-bench/1``), ``validate`` checks a
loaded one; ratios are computed here, against the reference's outcome for the same figure
(the baseline's, or for large messages :data:`LARGE_REFERENCE`'s), for the table and the JSON
alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Final, Literal, TypeAlias

from .host import Pinning
from .memory import ServerMemory
from .plan import Figure, Plan
from .stats import Latency, Throughput, ratio

__all__ = [
    "LARGE_REFERENCE",
    "SCHEMA",
    "ContenderInfo",
    "Metric",
    "Outcome",
    "Run",
    "Status",
    "metric",
    "metric_ratio",
    "reference",
    "to_json",
    "validate",
]

SCHEMA: Final = "udskit-bench/1"

#: ``not_measured``: this host does not allow the figure (too few descriptors), whoever runs.
Status: TypeAlias = Literal["ok", "failed", "unavailable", "skipped", "not_measured"]
STATUSES: Final = ("ok", "failed", "unavailable", "skipped", "not_measured")
Metric: TypeAlias = Literal["p50_us", "p99_us", "msgs_per_s", "mb_per_s", "kib_per_client"]

#: The metrics each test reports, headline first. Latencies: lower is better.
METRICS: Final[Mapping[str, tuple[Metric, ...]]] = {
    "rtt": ("p50_us", "p99_us"),
    "stream": ("msgs_per_s", "mb_per_s"),
    "large": ("mb_per_s", "msgs_per_s"),
    "many": ("msgs_per_s", "p99_us", "kib_per_client"),
}
LOWER_IS_BETTER: Final = frozenset({"p50_us", "p99_us", "kib_per_client"})

#: The contender the large messages' ratios are to: the C reference with 1 MiB socket
#: buffers. The baseline, stdlib, does not run large messages; the targets compare with it too.
LARGE_REFERENCE: Final = "c-1mib"


@dataclass(frozen=True, slots=True)
class Outcome:
    """One contender's result for one figure, or why there is none."""

    contender: str
    figure: Figure
    status: Status
    reason: str = ""
    latency: Latency | None = None
    rate: Throughput | None = None
    errors: int = 0
    #: The headline figure of each repeated run (round trips: p50 µs; else msg/s), in order.
    runs: tuple[float, ...] = ()
    #: Many clients: the server's RSS before and with the clients (that of the median run).
    memory: ServerMemory | None = None


@dataclass(frozen=True, slots=True)
class ContenderInfo:
    name: str
    label: str
    description: str
    available: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Run:
    """Everything one ``udskit bench`` run measured, and under which conditions."""

    plan: Plan
    pinning: Pinning
    host: Mapping[str, object]
    baseline: str
    contenders: Sequence[ContenderInfo]
    outcomes: Sequence[Outcome]
    started: str
    seconds: float
    udskit_version: str
    notes: Sequence[str] = field(default_factory=tuple)
    #: The many-clients load generator, and why it is not the C one when it is not.
    loader: str = ""

    def outcome(self, contender: str, figure: Figure) -> Outcome | None:
        for item in self.outcomes:
            if item.contender == contender and item.figure == figure:
                return item
        return None

    def info(self, contender: str) -> ContenderInfo | None:
        return next((item for item in self.contenders if item.name == contender), None)


def metric(outcome: Outcome | None, name: Metric) -> float | None:
    """A measured value of an ``ok`` outcome; None when there is none."""
    if outcome is None or outcome.status != "ok":
        return None
    if name in ("p50_us", "p99_us"):
        return None if outcome.latency is None else float(getattr(outcome.latency, name))
    if name == "kib_per_client":
        return None if outcome.memory is None else outcome.memory.kib_per_client
    return None if outcome.rate is None else float(getattr(outcome.rate, name))


def metric_ratio(
    run: Run, outcome: Outcome, name: Metric, against: str | None = None
) -> float | None:
    """``outcome``'s metric over the same metric of ``against`` (default: the figure's
    :func:`reference`)."""
    other = run.outcome(against or reference(run, outcome.figure), outcome.figure)
    return ratio(metric(outcome, name), metric(other, name))


def reference(run: Run, figure: Figure) -> str:
    """The contender ``figure``'s ratios are to: the baseline, but LARGE_REFERENCE for
    large messages, which the baseline does not run."""
    return LARGE_REFERENCE if figure.test == "large" else run.baseline


def to_json(run: Run) -> dict[str, object]:
    outcomes = []
    for item in run.outcomes:
        names = METRICS[item.figure.test]
        outcomes.append(
            {
                "contender": item.contender,
                "figure": item.figure.key,
                "test": item.figure.test,
                "param": item.figure.param,
                "status": item.status,
                "reason": item.reason,
                "latency": None if item.latency is None else asdict(item.latency),
                "throughput": None if item.rate is None else asdict(item.rate),
                "server_memory": _memory(item.memory),
                "errors": item.errors,
                "runs": list(item.runs),
                "ratios": {name: metric_ratio(run, item, name) for name in names},
            }
        )
    return {
        "schema": SCHEMA,
        "udskit_version": run.udskit_version,
        "started": run.started,
        "seconds": round(run.seconds, 3),
        "mode": run.plan.name,
        "plan": asdict(run.plan),
        "host": dict(run.host),
        "pinning": {
            "pinned": run.pinning.pinned,
            "server_cpu": run.pinning.server_cpu,
            "client_cpu": run.pinning.client_cpu,
            "note": run.pinning.note,
        },
        "baseline": run.baseline,
        "units": {
            "latency": "microseconds",
            "msgs_per_s": "messages per second",
            "mb_per_s": "payload megabytes (10**6 bytes) per second",
            "kib_per_client": "server RSS growth per connected client, KiB (1024 bytes)",
            "ratios": (
                f"value / the baseline's value for the same figure ({LARGE_REFERENCE}'s for "
                "large messages)"
            ),
        },
        "contenders": [asdict(item) for item in run.contenders],
        "outcomes": outcomes,
        "notes": list(run.notes),
        "loader": run.loader,
    }


def _memory(memory: ServerMemory | None) -> dict[str, object] | None:
    if memory is None:
        return None
    return {**asdict(memory), "kib_per_client": round(memory.kib_per_client, 3)}


_TOP_LEVEL: Final = {
    "schema": str,
    "udskit_version": str,
    "started": str,
    "seconds": (int, float),
    "mode": str,
    "plan": dict,
    "host": dict,
    "pinning": dict,
    "baseline": str,
    "units": dict,
    "contenders": list,
    "outcomes": list,
    "notes": list,
    "loader": str,
}
_OUTCOME: Final = {
    "contender": str,
    "figure": str,
    "test": str,
    "param": int,
    "status": str,
    "reason": str,
    "errors": int,
    "ratios": dict,
}


def validate(document: object) -> None:
    """Raise ValueError naming the first field of ``document`` that breaks the schema."""
    if not isinstance(document, dict):
        raise ValueError("a result document must be a JSON object")  # noqa: TRY004
    _fields(document, _TOP_LEVEL, "document")
    if document["schema"] != SCHEMA:
        raise ValueError(f"schema is {document['schema']!r}, expected {SCHEMA!r}")
    contenders = {item.get("name") for item in document["contenders"] if isinstance(item, dict)}
    for index, item in enumerate(document["outcomes"]):
        where = f"outcomes[{index}]"
        if not isinstance(item, dict):
            raise ValueError(f"{where} must be an object")  # noqa: TRY004
        _fields(item, _OUTCOME, where)
        if item["contender"] not in contenders:
            raise ValueError(f"{where}: contender {item['contender']!r} is not listed")
        if item["test"] not in METRICS:
            raise ValueError(f"{where}: unknown test {item['test']!r}")
        if item["status"] not in STATUSES:
            raise ValueError(f"{where}: unknown status {item['status']!r}")
        if item["status"] == "ok":
            wanted = "throughput" if item["test"] in ("stream", "large") else "latency"
            if not isinstance(item.get(wanted), dict):
                raise ValueError(f"{where}: an ok {item['test']} outcome needs {wanted}")
        elif not item["reason"]:
            raise ValueError(f"{where}: a {item['status']} outcome needs a reason")


def _fields(data: dict[str, object], spec: Mapping[str, object], where: str) -> None:
    for key, kind in spec.items():
        if key not in data:
            raise ValueError(f"{where}: missing {key!r}")
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, kind):  # type: ignore[arg-type]
            raise ValueError(  # noqa: TRY004 - a bad document, whatever the cause
                f"{where}: {key!r} has the wrong type ({type(value).__name__})"
            )
