"""Fixtures for the benchmark tests: a private compiler cache, and the C compiler check."""

from __future__ import annotations

import os
import resource
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The C reference is built into a cache private to this test session, never the
    user's; peers and ``udskit bench`` subprocesses inherit it."""
    home = tmp_path_factory.mktemp("xdg-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(home))
        yield home


@pytest.fixture
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """XDG_CACHE_HOME in a temporary directory, so builds never touch the user's cache."""
    home = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    return home


@pytest.fixture
def compiler() -> str:
    """The C compiler; a missing one skips, or fails when CI requires the test peers."""
    found = shutil.which(os.environ.get("CC") or "cc")
    if found is None:
        if os.environ.get("UDSKIT_REQUIRE_PEERS"):
            pytest.fail("no C compiler (cc) on PATH, and UDSKIT_REQUIRE_PEERS is set")
        pytest.skip("no C compiler (cc) on PATH")
    return found


@pytest.fixture
def restore_nofile() -> Iterator[tuple[int, int]]:
    """RLIMIT_NOFILE as it was before the test, restored after it."""
    saved = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield saved
    resource.setrlimit(resource.RLIMIT_NOFILE, saved)
