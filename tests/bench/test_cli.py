"""``udskit bench`` as users run it: a tiny real run end to end, and every bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from udskit.bench.contenders.registry import names
from udskit.bench.results import validate
from udskit.cli import main
from udskit.cli.cmd_bench import _selected

ROOT = Path(__file__).resolve().parents[2]

#: The note of a run of large messages whose --only leaves their reference out.
MISSING_C_1MIB = (
    "c-1mib is not in --only: the large messages' ratios are relative to it, so that table "
    "has none; add it to --only for them"
)


#: A run small enough for a test: few messages, few clients, a few contenders.
TINY = ["--quick", "--messages", "2000", "--clients", "3,5"]


def _bench(*args: str, blocked: tuple[str, ...] = (), env: dict[str, str] | None = None) -> (
    subprocess.CompletedProcess[str]
):  # fmt: skip
    """``udskit bench ARGS`` in a fresh interpreter, with ``blocked`` modules unimportable."""
    code = (
        "import sys\n"
        f"for name in {list(blocked)!r}: sys.modules[name] = None\n"
        "from udskit.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, "bench", *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.long
def test_a_tiny_run_prints_the_table_and_writes_json_and_png(tmp_path: Path, compiler: str) -> None:
    report, chart = tmp_path / "bench.json", tmp_path / "bench.png"
    done = _bench(
        *TINY,
        "--only",
        "udskit,c",
        "--json",
        str(report),
        "--plot",
        str(chart),
        env={"XDG_CACHE_HOME": str(tmp_path / "cache")},
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for heading in (
        "Round trip, 64 B",
        "One-way throughput, messages per second",
        "One-way throughput, payload MB/s",
        "Many clients",
        "Targets (this run)",
        "Contenders",
    ):
        assert heading in out
    assert "pinning: " in out
    assert (
        "stdlib was added to --only: every ratio but the large messages' is relative to it" in out
    )
    assert MISSING_C_1MIB in out
    rows = [line.split()[0] for line in out.splitlines() if line[:1].isalpha()]
    assert {"stdlib", "udskit", "c"} <= set(rows)
    assert "1.00x" in out  # the baseline against itself
    # Progress went to stderr, one line per measurement.
    progress = [line for line in done.stderr.splitlines() if line.startswith("[")]
    assert len(progress) == 21
    assert re.match(r"\[ 1/21\] stdlib +round trip 64 B +p50 ", progress[0])
    assert f"wrote {report}" in done.stderr

    document = json.loads(report.read_text())
    validate(document)
    assert [c["name"] for c in document["contenders"]] == ["stdlib", "udskit", "c"]
    assert document["plan"]["clients"] == [3, 5]
    assert document["pinning"]["note"] in out
    figures = {(o["contender"], o["figure"]): o for o in document["outcomes"]}
    assert len(figures) == 3 * 10  # with the large messages, which these three skip
    assert figures[("udskit", "rtt_64")]["status"] == "ok"
    assert figures[("c", "many_5")]["status"] == "ok"
    assert figures[("stdlib", "stream_64")]["ratios"]["msgs_per_s"] == 1.0
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "bench.png", "cache"]


def test_tests_runs_only_those_and_the_report_shows_only_their_tables(tmp_path: Path) -> None:
    out = tmp_path / "many.json"
    done = _bench(*TINY, "--only", "stdlib", "--tests", "many", "--json", str(out))
    assert done.returncode == 0, done.stderr
    assert "Round trip" not in done.stdout
    assert "One-way" not in done.stdout
    assert "Targets (this run)" not in done.stdout  # none of them is about 3 or 5 clients
    lines = done.stdout.splitlines()
    memory = lines.index("Many clients: server memory, RSS growth per connected client (KiB)")
    assert lines[memory + 1].split() == ["3", "cl.", "5", "cl."]
    assert lines[memory + 2].split()[0] == "stdlib"
    assert all(re.fullmatch(r"-?[\d,.]+", cell) for cell in lines[memory + 2].split()[1:])
    document = json.loads(out.read_text(encoding="utf-8"))
    validate(document)
    assert [o["figure"] for o in document["outcomes"]] == ["many_3", "many_5"]
    assert all(o["server_memory"]["clients"] == o["param"] for o in document["outcomes"])


def test_a_run_of_large_messages_alone_names_their_reference(tmp_path: Path) -> None:
    # It said "ratios (x) are to stdlib" and "stdlib was added to --only: every ratio is
    # relative to it", of a table whose ratios are to c-1mib, which did not run: no ratios.
    out = tmp_path / "large.json"
    args = ("--quick", "--messages", "20", "--tests", "large", "--json", str(out))
    done = _bench(*args, "--only", "udskit-shm-copy")
    assert done.returncode == 0, done.stderr
    heading = done.stdout.split("\n\n")[0].splitlines()
    assert heading[2:] == [
        "ratios (x) are to c-1mib; MB/s are payload megabytes (10^6 bytes) per second",
        MISSING_C_1MIB,
    ]
    assert "stdlib" not in done.stdout  # it has no large messages to measure
    document = json.loads(out.read_text(encoding="utf-8"))
    validate(document)
    assert [c["name"] for c in document["contenders"]] == ["udskit-shm-copy"]


@pytest.mark.parametrize(
    ("only", "tests", "chosen", "notes"),
    [
        (
            "udskit",
            ("rtt",),
            ["stdlib", "udskit"],
            ["stdlib was added to --only: every ratio is relative to it"],
        ),
        (
            "udskit,udskit-shm-view",
            ("rtt", "large"),
            ["stdlib", "udskit", "udskit-shm-view"],
            [
                "stdlib was added to --only: every ratio but the large messages' is relative to it",
                MISSING_C_1MIB,
            ],
        ),
        ("mp-shm,c-1mib", ("large",), ["c-1mib", "mp-shm"], []),
        ("stdlib,c-1mib", ("rtt", "stream", "large", "many"), ["stdlib", "c-1mib"], []),
    ],
)
def test_only_adds_the_baseline_and_notes_a_missing_reference(
    only: str, tests: tuple[str, ...], chosen: list[str], notes: list[str]
) -> None:
    assert _selected(only, tests) == (chosen, notes)


def test_missing_extras_are_named_in_one_line_and_the_run_goes_on() -> None:
    done = _bench(*TINY, "--only", "zmq,uvloop", blocked=("zmq", "uvloop"))
    assert done.returncode == 0, done.stderr
    unavailable = [line for line in done.stderr.splitlines() if "unavailable here" in line]
    assert len(unavailable) == 1
    assert "zmq (zmq is not installed (pip install 'udskit[bench]'))" in unavailable[0]
    assert "uvloop (uvloop is not installed" in unavailable[0]
    zmq_rows = [line for line in done.stdout.splitlines() if line.startswith("zmq ")]
    assert zmq_rows
    assert all("unavail." in row for row in zmq_rows)


def test_a_missing_matplotlib_stops_before_measuring(tmp_path: Path) -> None:
    done = _bench(*TINY, "--plot", str(tmp_path / "x.png"), blocked=("matplotlib",))
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"udskit bench: cannot draw --plot {tmp_path / 'x.png'}: matplotlib is not installed "
        "(pip install 'udskit[bench]')"
    )
    assert done.stdout == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--only", "stdlib,nope"], "unknown contender 'nope' in --only; choose from: stdlib"),
        (["--only", ","], "--only needs at least one contender name"),
        (["--messages", "0"], "argument --messages: '0' must be at least 1"),
        (["--repeats", "0"], "argument --repeats: '0' must be at least 1"),
        (["--repeats", "two"], "argument --repeats: 'two' is not a whole number"),
        (["--messages", "1k"], "argument --messages: '1k' is not a whole number"),
        (["--clients", "10,x"], "--clients takes positive integers like 100,1000, not '10,x'"),
        (["--clients", "0"], "--clients takes positive integers"),
        (["--plot", "chart.svg"], "--plot draws a PNG: give a file name ending in .png"),
        (
            ["--tests", "rtt,bulk"],
            "--tests: tests must be some of rtt, stream, large, many, not rtt, bulk",
        ),
    ],
)
def test_usage_mistakes_exit_2_in_one_line(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as ended:
        main(["bench", *args])
    assert ended.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert message in err


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_an_unwritable_output_exits_1_before_measuring(
    option: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "missing" / "out.png"
    assert main(["bench", option, str(target)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        f"udskit bench: cannot write {option} {target}: directory {target.parent} does not "
        f"exist; create it first (mkdir -p {target.parent})"
    )


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_a_file_on_the_way_is_named_as_not_a_directory(
    option: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # it said "directory .../notes.txt/sub does not exist", of a file that exists
    (tmp_path / "notes.txt").write_text("")
    target = tmp_path / "notes.txt" / "sub" / "out.png"
    assert main(["bench", option, str(target)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        f"udskit bench: cannot write {option} {target}: {tmp_path}/notes.txt is not a "
        "directory; check the path"
    )


def test_a_directory_is_not_an_output_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "--json", str(tmp_path)]) == 1
    assert "it is a directory; give a file name" in capsys.readouterr().err


def test_list_names_every_contender_and_whether_it_can_run(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.splitlines() if not line.startswith(" ")]
    assert listed == names()
    assert "ready" in out
