"""Building the C reference into the cache, and every reason it cannot be built."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from udskit.bench import cbuild
from udskit.bench.cbuild import build, cache_dir, find_source


def test_source_is_found_beside_the_package() -> None:
    source = find_source()
    assert source is not None
    assert source.parent == Path(cbuild.__file__).parent  # what a wheel installs
    # In the source tree that is a link to the one C file, benchmarks/udsbench.c.
    assert source.resolve().parent.name == "benchmarks"
    assert source.resolve().name == "udsbench.c"


def test_cache_dir_follows_xdg(cache_home: Path) -> None:
    assert cache_dir() == cache_home / "udskit" / "bench"


def test_build_compiles_once_then_reuses_the_binary(cache_home: Path, compiler: str) -> None:
    first = build()
    assert first.reason == ""
    assert first.binary is not None
    assert first.binary.parent == cache_home / "udskit" / "bench"
    assert os.access(first.binary, os.X_OK)
    built_at = first.binary.stat().st_mtime_ns
    again = build()
    assert again.binary == first.binary
    assert again.binary.stat().st_mtime_ns == built_at
    # Nothing half-written is left behind.
    assert sorted(p.name for p in first.binary.parent.iterdir()) == [first.binary.name]


def test_a_broken_source_gives_the_compiler_error(
    tmp_path: Path, cache_home: Path, compiler: str
) -> None:
    source = tmp_path / "udsbench.c"
    source.write_text("int main(void) { return missing_symbol; }\n")
    result = build(source)
    assert result.binary is None
    assert "failed" in result.reason
    assert "missing_symbol" in result.reason
    assert list((cache_home / "udskit" / "bench").iterdir()) == []


def test_no_compiler_is_a_reason_not_a_crash(
    tmp_path: Path, cache_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no cc there
    result = build()
    assert result.binary is None
    assert result.reason == "no C compiler (cc) on PATH; install gcc or clang"


def test_a_missing_cc_is_named(cache_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "/nonexistent/cc -O3")
    result = build()
    assert result.binary is None
    assert result.reason == (
        "$CC names /nonexistent/cc, which is not on PATH (or not executable); install it, "
        "or unset CC to use cc"
    )


def test_cc_is_a_command_line_as_for_make(
    tmp_path: Path, cache_home: Path, monkeypatch: pytest.MonkeyPatch, compiler: str
) -> None:
    """$CC is honoured with its own options (like CC='ccache gcc' or CC='clang -m64'):
    here a wrapper that logs its arguments, given an option of its own."""
    log = tmp_path / "cc.log"
    wrapper = tmp_path / "logging-cc"
    wrapper.write_text(f'#!/bin/sh\necho "$@" > {log}\nexec {compiler} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", f"{wrapper} -DUDSKIT_FROM_CC=1")
    result = build()
    assert result.reason == ""
    assert result.binary is not None
    assert os.access(result.binary, os.X_OK)
    assert log.read_text().startswith("-DUDSKIT_FROM_CC=1 -O2 -o ")
    assert result.compiler == f"{wrapper} -DUDSKIT_FROM_CC=1"


def test_an_unwritable_cache_is_a_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compiler: str
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    result = build()
    assert result.binary is None
    assert result.reason.startswith(f"cannot create cache {blocker}/udskit/bench")


def test_the_c_sender_sends_its_warm_up_uncounted_and_the_receiver_counts_all(
    cache_home: Path, compiler: str, tmp_path: Path
) -> None:
    binary = build().binary
    assert binary is not None
    path = str(tmp_path / "s")
    receiver = subprocess.Popen(
        [str(binary), "stream_receiver", path, "--size", "1000"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert receiver.stdout is not None
        assert json.loads(receiver.stdout.readline()) == {"ready": path}
        sender = subprocess.run(
            [str(binary), "stream_sender", path, "--size", "1000", "--count", "5", "--warmup", "3"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        received = json.loads(receiver.stdout.readline())["result"]
    finally:
        receiver.wait(timeout=30)
        receiver.stdout.close()  # type: ignore[union-attr]
    sent = json.loads(sender.stdout)["result"]
    assert (sent["messages"], sent["warmup"], received["messages"]) == (5, 3, 8)
    assert received["last_ns"] >= sent["started_ns"]
