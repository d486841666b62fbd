"""Pinning choices, the descriptor limit, and host facts."""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest

from udskit.bench.host import choose_pinning, describe_host, raise_nofile


def test_two_cpus_pin_server_and_client_apart() -> None:
    pinning = choose_pinning({3, 1, 7})
    assert (pinning.server_cpu, pinning.client_cpu, pinning.pinned) == (1, 3, True)
    assert pinning.note == "server pinned to CPU 1, client and load generator to CPU 3"


def test_one_cpu_runs_unpinned_and_says_so() -> None:
    pinning = choose_pinning({5})
    assert not pinning.pinned
    assert pinning.client_cpu is None
    assert pinning.note == "unpinned: this process may use only CPU 5"


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning needs two CPUs")
def test_pin_moves_the_process_and_its_later_threads() -> None:
    cpu = max(os.sched_getaffinity(0))
    code = (
        "import os, threading; from udskit.bench.host import pin; "
        f"pin({cpu}); seen = []; "
        "t = threading.Thread(target=lambda: seen.append(os.sched_getaffinity(0))); "
        "t.start(); t.join(); print(sorted(os.sched_getaffinity(0)), sorted(seen[0]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [f"[{cpu}]", f"[{cpu}]"]


def test_raise_nofile_is_quiet_when_enough(restore_nofile: tuple[int, int]) -> None:
    soft, _ = restore_nofile
    assert raise_nofile(min(soft, 64)) is None
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == restore_nofile


def test_raise_nofile_lifts_the_soft_limit(restore_nofile: tuple[int, int]) -> None:
    _, hard = restore_nofile
    if hard != resource.RLIM_INFINITY and hard < 256:
        pytest.skip("hard limit too low to test raising")
    resource.setrlimit(resource.RLIMIT_NOFILE, (128, hard))
    assert raise_nofile(200) is None
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= 200


def test_raise_nofile_says_when_the_hard_limit_is_too_low() -> None:
    # Lowering a hard limit cannot be undone without privilege: do it in a child process.
    code = (
        "import resource; from udskit.bench.host import raise_nofile; "
        "resource.setrlimit(resource.RLIMIT_NOFILE, (100, 100)); print(raise_nofile(300))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert (
        "RLIMIT_NOFILE (open files) is 100, hard limit 100, below the 300 descriptors needed"
        in out.stdout
    )
    assert "`ulimit -Hn 300`" in out.stdout
    assert "`ulimit -n 300`" in out.stdout


def test_describe_host_names_what_a_reader_compares() -> None:
    host = describe_host()
    assert host["python"] == sys.version.split()[0]
    assert host["cpus_allowed"] == len(os.sched_getaffinity(0))
    assert isinstance(host["libraries"], dict)
    assert set(host["libraries"]) == {"pyzmq", "uvloop", "matplotlib"}
