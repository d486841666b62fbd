"""What one run measures, and for how long: message sizes, client counts, counts and time caps.

Every measurement is bounded twice, by a message count and by a time cap, so a slow contender
ends on time and a fast one does not run for ever.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

__all__ = [
    "CLIENT_COUNTS",
    "FULL",
    "LARGE_SIZES",
    "QUICK",
    "RTT_SIZE",
    "STREAM_SIZES",
    "TESTS",
    "Figure",
    "Plan",
    "Test",
    "size_label",
]

Test: TypeAlias = Literal["rtt", "stream", "large", "many"]

#: Every test, in the order the report shows them.
TESTS: Final[tuple[Test, ...]] = ("rtt", "stream", "large", "many")

#: Payload of the round-trip test: small enough that the cost is all system calls and wake-ups.
RTT_SIZE: Final = 64

#: One-way message sizes: a small message, a page, a large buffer and a bulk transfer.
STREAM_SIZES: Final = (64, 4096, 65536, 1 << 20)

#: Large one-way messages, for the shared-memory rows and their references: one below the
#: shared-memory threshold (nothing may regress there), then 1, 16 and 256 MiB. A 256 MiB
#: run holds about 1 GiB at its peak (the sender's payload, a pool of two messages, the
#: receiver's copy), so it is left out of --quick, which stops at 16 MiB.
LARGE_SIZES: Final = (64 * 1024, 1 << 20, 16 << 20, 256 << 20)
QUICK_LARGE_SIZES: Final = (64 * 1024, 1 << 20, 16 << 20)

#: Large messages every sender sends before its clock starts (the receiver takes them too):
#: twice the shared-memory rows' pool of two messages, so that every page a contender's
#: buffers use has been touched once. A first touch is a one-off cost (a pool's fresh page
#: is faulted in and zeroed, as is the C reference's socket memory and the hand-written
#: handoff's block), measured on its own by benchmarks/shm_costs.py; left in, it was 40% of
#: the 256 MiB in-place figure, with only 32 messages measured.
LARGE_WARMUP: Final = 4

#: Payload each client of the many-clients echo test sends, and waits to see back.
ECHO_SIZE: Final = 64

#: Clients of the many-clients echo test: 100; the 1000 that must be held with no error; and
#: 10,000, where a server's memory per client and a descriptor limit (RLIMIT_NOFILE is often
#: 1024 by default) start to matter.
CLIENT_COUNTS: Final = (100, 1000, 10_000)


@dataclass(frozen=True, slots=True)
class Figure:
    """One cell group of the results: a test and its parameter (a size, or a client count)."""

    test: Test
    param: int

    @property
    def key(self) -> str:
        """A stable name for JSON and --only style references: rtt_64, stream_4096, many_100."""
        return f"{self.test}_{self.param}"

    @property
    def title(self) -> str:
        if self.test == "rtt":
            return f"round trip {size_label(self.param)}"
        if self.test == "stream":
            return f"one-way {size_label(self.param)}"
        if self.test == "large":
            return f"large one-way {size_label(self.param)}"
        return f"{self.param} clients"


@dataclass(frozen=True, slots=True)
class Plan:
    """Counts and time caps for every measurement of one run."""

    name: str
    #: Each measurement is repeated this many times, the contenders taking turns, and the
    #: median run reported: a burst of load from elsewhere on the machine then spoils one
    #: run of one contender, not the figure.
    repeats: int
    #: Round trips measured (after the warm-up ones), and the time cap on them.
    rtt_count: int
    rtt_warmup: int
    rtt_seconds: float
    #: One-way streaming: at most this many messages and bytes per size, and a time cap.
    stream_messages: int
    stream_bytes: int
    stream_seconds: float
    #: Many-clients echo: the client counts, a cap on all clients' messages, and a time cap.
    clients: tuple[int, ...]
    many_messages: int
    many_seconds: float
    #: Large one-way messages: at most this many messages and bytes per size, a time cap,
    #: and the messages sent before the clock starts (see LARGE_WARMUP).
    large_messages: int = 2000
    large_bytes: int = 1 << 30
    large_seconds: float = 0.5
    large_warmup: int = LARGE_WARMUP
    #: One-way message sizes.
    stream_sizes: tuple[int, ...] = STREAM_SIZES
    #: Large message sizes (none: the large test makes no figure).
    large_sizes: tuple[int, ...] = ()
    #: The tests this run makes (all by default).
    tests: tuple[Test, ...] = TESTS

    def figures(self) -> list[Figure]:
        rtt = [Figure("rtt", RTT_SIZE)]
        stream = [Figure("stream", size) for size in self.stream_sizes]
        large = [Figure("large", size) for size in self.large_sizes]
        many = [Figure("many", n) for n in self.clients]
        return [figure for figure in rtt + stream + large + many if figure.test in self.tests]

    def stream_count(self, size: int) -> int:
        """Messages of ``size`` bytes the sender may send."""
        return max(1, min(self.stream_messages, self.stream_bytes // size))

    def large_count(self, size: int) -> int:
        """Large messages of ``size`` bytes the sender may send (at least two: one alone
        measures a start, not a rate)."""
        return max(2, min(self.large_messages, self.large_bytes // size))

    def capped(self, messages: int) -> Plan:
        """This plan with every message count at most ``messages`` (for smoke runs)."""
        if messages < 1:
            raise ValueError(f"--messages must be at least 1, not {messages}")
        return dataclasses.replace(
            self,
            rtt_count=min(self.rtt_count, messages),
            rtt_warmup=min(self.rtt_warmup, messages),
            stream_messages=min(self.stream_messages, messages),
            large_messages=min(self.large_messages, messages),
            large_warmup=min(self.large_warmup, messages),
            many_messages=min(self.many_messages, messages),
        )

    def with_repeats(self, repeats: int) -> Plan:
        if repeats < 1:
            raise ValueError(f"repeats must be at least 1, not {repeats}")
        return dataclasses.replace(self, repeats=repeats)

    def with_sizes(self, sizes: tuple[int, ...]) -> Plan:
        if not sizes or any(n < 1 for n in sizes):
            raise ValueError(f"message sizes must be positive integers, not {sizes}")
        return dataclasses.replace(self, stream_sizes=sizes)

    def with_large_sizes(self, sizes: tuple[int, ...]) -> Plan:
        if any(n < 1 for n in sizes):
            raise ValueError(f"message sizes must be positive integers, not {sizes}")
        return dataclasses.replace(self, large_sizes=sizes)

    def with_clients(self, clients: tuple[int, ...]) -> Plan:
        if not clients or any(n < 1 for n in clients):
            raise ValueError(f"client counts must be positive integers, not {clients}")
        return dataclasses.replace(self, clients=clients)

    def with_tests(self, tests: tuple[str, ...]) -> Plan:
        """This plan making only ``tests`` (in the report's order, whatever the order given)."""
        unknown = [name for name in tests if name not in TESTS]
        if not tests or unknown:
            raise ValueError(f"tests must be some of {', '.join(TESTS)}, not {', '.join(tests)}")
        return dataclasses.replace(self, tests=tuple(t for t in TESTS if t in tests))


#: The full run: long enough for stable medians and p99s, a few minutes in all.
FULL: Final = Plan(
    name="full",
    repeats=3,
    rtt_count=10_000,
    rtt_warmup=500,
    rtt_seconds=0.7,
    stream_messages=5_000_000,
    stream_bytes=8 << 30,
    stream_seconds=0.4,
    clients=CLIENT_COUNTS,
    many_messages=1_000_000,
    many_seconds=0.7,
    # 256 MiB messages: up to 32 in 2 s.
    large_bytes=8 << 30,
    large_seconds=2.0,
    large_sizes=LARGE_SIZES,
)

#: --quick: the same figures with short caps; about two minutes on two CPUs, half of it the
#: 10,000-client figures (connecting the clients and every server's first echo to each, which
#: no cap shortens).
QUICK: Final = Plan(
    name="quick",
    repeats=1,
    rtt_count=3_000,
    rtt_warmup=100,
    rtt_seconds=0.2,
    stream_messages=500_000,
    stream_bytes=1 << 30,
    stream_seconds=0.1,
    clients=CLIENT_COUNTS,
    many_messages=100_000,
    many_seconds=0.3,
    large_bytes=256 << 20,
    large_seconds=0.2,
    large_sizes=QUICK_LARGE_SIZES,
)


def size_label(size: int) -> str:
    """64 B, 4 KiB, 64 KiB, 1 MiB."""
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} B"
