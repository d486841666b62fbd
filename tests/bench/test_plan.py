"""Plans: figures, caps, labels."""

from __future__ import annotations

import pytest

from udskit.bench.plan import FULL, QUICK, STREAM_SIZES, Figure, size_label


def test_figures_cover_every_test_in_table_order() -> None:
    keys = [figure.key for figure in FULL.figures()]
    assert keys == [
        "rtt_64",
        "stream_64",
        "stream_4096",
        "stream_65536",
        "stream_1048576",
        "large_65536",
        "large_1048576",
        "large_16777216",
        "large_268435456",
        "many_100",
        "many_1000",
        "many_10000",
    ]


def test_quick_is_shorter_than_full_everywhere() -> None:
    assert QUICK.rtt_seconds < FULL.rtt_seconds
    assert QUICK.stream_seconds < FULL.stream_seconds
    assert QUICK.many_seconds < FULL.many_seconds
    assert QUICK.clients == FULL.clients == (100, 1000, 10_000)


def test_capped_bounds_every_count() -> None:
    plan = FULL.capped(10)
    assert (plan.rtt_count, plan.rtt_warmup, plan.stream_messages, plan.many_messages) == (
        10,
        10,
        10,
        10,
    )
    assert all(plan.stream_count(size) <= 10 for size in STREAM_SIZES)
    with pytest.raises(ValueError, match="at least 1"):
        FULL.capped(0)


def test_large_sizes_keep_256_mib_out_of_quick() -> None:
    assert max(FULL.large_sizes) == 256 << 20
    assert max(QUICK.large_sizes) == 16 << 20
    assert QUICK.large_seconds < FULL.large_seconds
    assert FULL.large_count(256 << 20) == FULL.large_bytes // (256 << 20)
    assert FULL.capped(1).large_count(64 * 1024) == 2  # never one message alone
    assert [f.key for f in QUICK.with_large_sizes((5,)).figures() if f.test == "large"] == [
        "large_5"
    ]
    assert not [f for f in QUICK.with_large_sizes(()).figures() if f.test == "large"]
    with pytest.raises(ValueError, match="positive"):
        QUICK.with_large_sizes((0,))


def test_stream_count_respects_the_byte_cap() -> None:
    assert FULL.stream_count(1 << 20) == FULL.stream_bytes // (1 << 20)
    assert FULL.stream_count(64) == FULL.stream_messages


def test_with_clients_replaces_the_counts() -> None:
    assert [f.key for f in QUICK.with_clients((3,)).figures()][-1] == "many_3"
    with pytest.raises(ValueError, match="positive"):
        QUICK.with_clients((0,))
    with pytest.raises(ValueError, match="positive"):
        QUICK.with_clients(())


@pytest.mark.parametrize(
    ("size", "label"),
    [(64, "64 B"), (4096, "4 KiB"), (65536, "64 KiB"), (1 << 20, "1 MiB"), (1500, "1500 B")],
)
def test_size_label(size: int, label: str) -> None:
    assert size_label(size) == label


def test_figure_titles() -> None:
    assert Figure("rtt", 64).title == "round trip 64 B"
    assert Figure("stream", 4096).title == "one-way 4 KiB"
    assert Figure("many", 1000).title == "1000 clients"
    assert Figure("large", 16 << 20).title == "large one-way 16 MiB"


def test_with_sizes_and_with_repeats() -> None:
    plan = QUICK.with_sizes((4096,)).with_repeats(3)
    assert [f.key for f in plan.figures()] == [
        "rtt_64",
        "stream_4096",
        "large_65536",
        "large_1048576",
        "large_16777216",
        "many_100",
        "many_1000",
        "many_10000",
    ]
    assert plan.repeats == 3
    with pytest.raises(ValueError, match="at least 1"):
        QUICK.with_repeats(0)
    with pytest.raises(ValueError, match="positive"):
        QUICK.with_sizes((0,))


def test_with_tests_keeps_the_report_order_and_refuses_unknown_tests() -> None:
    plan = QUICK.with_tests(("many", "rtt"))
    assert plan.tests == ("rtt", "many")
    assert [f.test for f in plan.figures()] == ["rtt", "many", "many", "many"]
    with pytest.raises(ValueError, match="some of rtt, stream, large, many, not bulk"):
        QUICK.with_tests(("bulk",))
    with pytest.raises(ValueError, match="some of"):
        QUICK.with_tests(())
