"""A descriptor limit too low for the many-clients test: each peer and the runner say which
limit, its value and how to raise it, and the figure is not measured (no failure, no crash).

The soft and hard limits are lowered in a child process only: a lowered hard limit cannot be
raised again without privilege.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Final

import pytest

from udskit.bench import cbuild
from udskit.bench.contenders.native import command
from udskit.bench.wire import Job, Role

#: Far below what 100 clients need (100 + FD_HEADROOM), above what an interpreter needs.
LOW: Final = 64

#: Sets RLIMIT_NOFILE (soft and hard) to argv[1], then runs the rest of argv in its place.
_LIMITED = (
    "import os, resource, sys; n = int(sys.argv[1]); "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); os.execv(sys.argv[2], sys.argv[2:])"
)


def _limited(argv: list[str], limit: int = LOW) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _LIMITED, str(limit), *argv],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def _job(tmp_path: Path, role: Role) -> Job:
    module = "udskit.bench.loader" if role == "load" else "udskit.bench.contenders.stdlib"
    path = str(tmp_path / "s.sock")
    return Job("stdlib", module, role, path, count=10, seconds=0.1, clients=100)


def _check_said(done: subprocess.CompletedProcess[str], who: str) -> None:
    assert done.returncode == 0, done.stderr
    reason = json.loads(done.stdout)["not_measured"]
    assert reason.startswith(f"the {who} cannot hold 100 clients: ")
    assert f"RLIMIT_NOFILE (open files) is {LOW}, hard limit {LOW}" in reason
    assert "below the 356 descriptors needed" in reason
    assert "`ulimit -n 356`" in reason
    assert reason in done.stderr


@pytest.mark.parametrize(
    ("role", "who"), [("load", "load generator"), ("echo_server", "echo server")]
)
def test_a_python_peer_says_the_figure_cannot_be_measured(
    tmp_path: Path, role: Role, who: str
) -> None:
    job = _job(tmp_path, role)
    _check_said(_limited([sys.executable, "-m", "udskit.bench.peer", job.to_json()]), who)
    assert not (tmp_path / "s.sock").exists()  # the server stopped before listening


@pytest.mark.parametrize(
    ("role", "who"), [("load", "load generator"), ("echo_server", "echo server")]
)
def test_the_c_peer_says_the_figure_cannot_be_measured(
    tmp_path: Path, compiler: str, role: Role, who: str
) -> None:
    built = cbuild.build()
    assert built.binary is not None, built.reason
    job = _job(tmp_path, role)
    argv = command(dataclasses.replace(job, options={"binary": str(built.binary)}))
    _check_said(_limited(argv), who)


def test_the_runner_warns_once_and_marks_the_figure_not_measured() -> None:
    code = """
from udskit.bench import runner
from udskit.bench.contenders.registry import get
from udskit.bench.host import Pinning
from udskit.bench.plan import QUICK
plan = QUICK.with_tests(("many",)).with_clients((100,))
run = runner.run(plan, [get("stdlib"), get("udskit")], Pinning(None, None, "test"),
                 lambda d, t, s: print("progress", s), warn=lambda text: print("warn", text))
for outcome in run.outcomes:
    print("outcome", outcome.contender, outcome.status, outcome.reason)
"""
    done = _limited([sys.executable, "-c", code])
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    warned = [line for line in lines if line.startswith("warn ")]
    assert len(warned) == 1
    assert warned[0].startswith(
        f"warn 100 clients not measured: RLIMIT_NOFILE (open files) is {LOW}, hard limit {LOW}"
    )
    assert "`ulimit -n 356`" in warned[0]
    outcomes = [line for line in lines if line.startswith("outcome ")]
    assert [line.split()[1:3] for line in outcomes] == [
        ["stdlib", "not_measured"],
        ["udskit", "not_measured"],
    ]
    assert not [line for line in lines if line.startswith("progress ")]  # nothing was started
