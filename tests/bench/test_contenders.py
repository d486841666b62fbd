"""Every contender, end to end with real peer processes: its round trip, a one-way stream of
1 MiB messages (every message arrives: counts are checked by the runner) and its echo
server under a few clients (every echo is checked by the load generator)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

import pytest

from udskit.bench import runner
from udskit.bench.contenders.registry import ALL, get, names
from udskit.bench.contenders.udskit_shm import pool_size
from udskit.bench.host import choose_pinning
from udskit.bench.plan import QUICK

ROOT = Path(__file__).resolve().parents[2]
PLAN = QUICK.capped(200).with_sizes((1 << 20,)).with_large_sizes((1 << 20,)).with_clients((3,))

#: The message servers' contenders: echo servers only.
MESSAGE_SERVERS: Final = ("udskit-msg", "udskit-aio-msg", "udskit-aio-msg-uvloop")


@pytest.mark.parametrize("name", names())
def test_contender_measures_what_it_runs(name: str) -> None:
    contender = get(name)
    problem = contender.requires()
    if problem is not None:
        if "compiler" in problem and not os.environ.get("UDSKIT_REQUIRE_PEERS"):
            pytest.skip(problem)
        pytest.fail(f"{name} cannot run here: {problem}")
    run = runner.run(PLAN, [contender], choose_pinning(), lambda d, t, s: None)
    for outcome in run.outcomes:
        if contender.runs(outcome.figure.test):
            assert outcome.status == "ok", f"{outcome.figure.title}: {outcome.reason}"
            if outcome.figure.test == "many":
                assert outcome.memory is not None, "every server's memory is measured"
        else:
            assert outcome.status == "skipped"
            assert outcome.reason == contender.skips[outcome.figure.test]


def test_names_are_unique_and_the_baseline_comes_first() -> None:
    assert len(set(names())) == len(ALL)
    assert names()[0] == "stdlib"
    with pytest.raises(ValueError, match="unknown contender 'x'; choose from: stdlib, udskit"):
        get("x")


@pytest.mark.parametrize("name", MESSAGE_SERVERS)
def test_a_message_server_contender_is_for_many_clients_only(name: str) -> None:
    contender = get(name)
    assert [contender.runs(test) for test in ("rtt", "stream", "large", "many")] == [
        False,
        False,
        False,
        True,
    ]
    assert contender.skips["rtt"] == contender.skips["stream"]
    assert contender.skips["rtt"].startswith("a message server is a many-clients server")


@pytest.mark.parametrize("name", [c.name for c in ALL if c.large])
def test_large_message_rows_run_only_large_messages_except_the_c_reference(name: str) -> None:
    contender = get(name)
    assert contender.runs("large")
    if name != "c-1mib":
        assert [contender.runs(test) for test in ("rtt", "stream", "many")] == [False] * 3
    assert all(c.skips["large"].startswith("large messages are") for c in ALL if not c.large)


@pytest.mark.parametrize("name", ["udskit-shm-copy", "udskit-shm-view", "udskit-shm-loan"])
def test_each_shared_memory_row_says_the_pool_it_runs_with(name: str) -> None:
    # view and loan said "shared_memory=True" (a 64 MiB pool) of a pool of two messages.
    assert "a pool of two messages" in get(name).description
    assert "shared_memory=True" not in get(name).description
    assert pool_size(16 << 20) == 2 * (16 << 20)
