"""Every contender, end to end with real peer processes: its round trip, a one-way stream of
1 MiB messages (every message arrives: counts are checked by the runner) and its echo
server under a few clients (every echo is checked by the load generator)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Final

import pytest

import udskit
import udskit.aio
from udskit.bench import runner
from udskit.bench.contenders.base import missing_module
from udskit.bench.contenders.registry import ALL, get, names
from udskit.bench.host import choose_pinning
from udskit.bench.plan import QUICK
from udskit.bench.results import ContenderInfo

ROOT = Path(__file__).resolve().parents[2]
PLAN = QUICK.capped(200).with_sizes((1 << 20,)).with_clients((3,))

#: Contenders of servers being written now: until udskit has them, they are unavailable, and
#: say which name is missing.
PENDING: Final = {
    "udskit-msg": "udskit has no MessageServer in udskit ",
    "udskit-aio-msg": "udskit.aio has no start_message_server in udskit ",
    "udskit-aio-msg-uvloop": "udskit.aio has no start_message_server in udskit ",
}


@pytest.fixture
def test_peers_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Peers import ``tests.bench.fake_message_servers`` from the repository root."""
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + (os.pathsep + path if path else ""))


@pytest.mark.parametrize("name", names())
def test_contender_measures_what_it_runs(name: str) -> None:
    contender = get(name)
    problem = contender.requires()
    if problem is not None:
        if "compiler" in problem and not os.environ.get("UDSKIT_REQUIRE_PEERS"):
            pytest.skip(problem)
        if name in PENDING and problem.startswith(PENDING[name]):
            pytest.skip(problem)
        pytest.fail(f"{name} cannot run here: {problem}")
    run = runner.run(PLAN, [contender], choose_pinning(), lambda d, t, s: None)
    for outcome in run.outcomes:
        if contender.runs(outcome.figure.test):
            assert outcome.status == "ok", f"{outcome.figure.title}: {outcome.reason}"
        else:
            assert outcome.status == "skipped"
            assert outcome.reason == contender.skips[outcome.figure.test]


def test_names_are_unique_and_the_baseline_comes_first() -> None:
    assert len(set(names())) == len(ALL)
    assert names()[0] == "stdlib"
    with pytest.raises(ValueError, match="unknown contender 'x'; choose from: stdlib, udskit"):
        get("x")


@pytest.mark.parametrize("name", sorted(PENDING))
def test_a_message_server_contender_is_for_many_clients_only(name: str) -> None:
    contender = get(name)
    assert [contender.runs(test) for test in ("rtt", "stream", "many")] == [False, False, True]
    assert contender.skips["rtt"] == contender.skips["stream"]
    assert contender.skips["rtt"].startswith("a message server is a many-clients server")


@pytest.mark.parametrize("name", sorted(PENDING))
def test_without_its_server_a_contender_is_unavailable_and_says_why(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(udskit, "MessageServer", raising=False)
    monkeypatch.delattr(udskit.aio, "start_message_server", raising=False)
    contender = get(name)
    reason = contender.requires()
    assert reason is not None
    if name.endswith("uvloop") and reason.startswith("uvloop is not installed"):
        pytest.skip(reason)
    assert reason == PENDING[name] + udskit.__version__
    plan = PLAN.with_tests(("many",))
    run = runner.run(plan, [get("stdlib"), contender], choose_pinning(), lambda d, t, s: None)
    assert run.info(name) is not None
    assert (run.info(name).available, run.info(name).reason) == (False, reason)  # type: ignore[union-attr]
    outcome = run.outcome(name, plan.figures()[0])
    assert outcome is not None
    assert (outcome.status, outcome.reason) == ("unavailable", reason)


@pytest.mark.parametrize("name", sorted(PENDING))
def test_a_message_server_contender_serves_many_clients_through_the_api(
    name: str, test_peers_importable: None
) -> None:
    """Against stand-ins with the API the contenders are written for (until the real ones)."""
    contender = dataclasses.replace(get(name), module="tests.bench.fake_message_servers")
    if name.endswith("uvloop") and (problem := missing_module("uvloop", "")()):
        pytest.skip(problem)
    plan = PLAN.with_tests(("many",))
    run = runner.run(
        plan,
        [contender],
        choose_pinning(),
        lambda d, t, s: None,
        infos=[ContenderInfo(name, contender.label, contender.description, True, "")],
    )
    outcome = run.outcome(name, plan.figures()[0])
    assert outcome is not None
    assert outcome.status == "ok", outcome.reason
    assert outcome.memory is not None
    assert outcome.memory.clients == 3
