"""The page checker itself: it must fail on drift, say where and how, and let through only
the run-to-run values its placeholders name."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.docs import sessions


# -- comparing ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("expected", "actual"),
    [
        ("pid <pid> (udskit), uid 0", "pid 4242 (udskit), uid 0"),
        ("created <n> s ago", "created 12 s ago"),
        ("all 8 scenarios worked (<seconds> s)", "all 8 scenarios worked (4.7 s)"),
        ("<n>s   0    <time>  /tmp/demo/x.sock", "12s  0    2026-11-21 08:56:46  /tmp/demo/x.sock"),
        ("date: <http-date>", "date: Sat, 21 Nov 2026 08:56:50 GMT"),
        ("/tmp/demo/.udskit-<hex>/echo.sock", "/tmp/demo/.udskit-785fc6a5/echo.sock"),
        ("/tmp/udskit-demo-<tmp>", "/tmp/udskit-demo-ovpz582n"),
        ("a  b", "a      b"),  # column padding
        ("literal ... dots", "literal ... dots"),
        ("< pid <pid> 10 bytes", "< pid 7 10 bytes"),
    ],
)
def test_placeholders_match_what_varies(expected: str, actual: str) -> None:
    assert sessions.line_matches(expected, actual)


@pytest.mark.parametrize(
    ("expected", "actual"),
    [
        ("pid <pid> (udskit)", "pid 4242 (python3)"),
        ("pid <pid>", "pid abc"),
        ("created <n> s ago", "created 1.5 s ago"),
        ("exit 1", "exit 0"),
        ("a b", "a  b"),  # one space is not a column gap
        ("literal ... dots", "literal anything dots"),  # ... inside a line is literal
        ("<time>", "2026-11-21"),
        ("value <unknown>", "value 3"),  # only the listed placeholders are patterns
    ],
)
def test_anything_else_must_be_equal(expected: str, actual: str) -> None:
    assert not sessions.line_matches(expected, actual)


def test_an_ellipsis_line_stands_for_any_lines() -> None:
    assert sessions.matches(["a", "...", "z"], ["a", "z"])
    assert sessions.matches(["a", "...", "z"], ["a", "b", "c", "z"])
    assert sessions.matches(["..."], [])
    assert not sessions.matches(["a", "...", "z"], ["a", "b"])
    assert not sessions.matches(["a"], ["a", "b"])
    assert not sessions.matches(["a", "b"], ["a"])


# -- reading a page ----------------------------------------------------------------------------
def page(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "page.md"
    path.write_text(text, encoding="utf-8")
    return path


def test_blocks_that_would_escape_are_reported(tmp_path: Path) -> None:
    path = page(
        tmp_path,
        "```\n$ udskit ls\n```\n\n"
        "```sh\nmake install\n```\n\n"
        "<!-- not run: installs packages -->\n```sh\npip install udskit\n```\n\n"
        "<!-- check: output -->\n```text\nhello\n```\n\n"
        "```console\nhello\n$ echo hello\n```\n\n"
        "<!-- check: backgruond -->\n```python\npass\n```\n",
    )
    assert sessions.problems(path) == [
        "page.md:1: a block without a language (console? text?)",
        "page.md:5: a sh block is not run: say why",
        "page.md:15: an output block that follows no Python block",
        "page.md:19: a console block must start with a $ command",
        "page.md:25: unknown check words: backgruond",
    ]


def test_console_steps(tmp_path: Path) -> None:
    path = page(
        tmp_path,
        "```console\n"
        "$ udskit serve --echo /tmp/demo/e.sock &   # a comment\n"
        "serving\n"
        "$ echo a && echo b\n"
        "a\n"
        "b\n"
        "\n"
        "$ true\n"
        "```\n",
    )
    first, second, third = sessions.steps(path)
    assert (first.text, first.background, first.expected) == (
        "udskit serve --echo /tmp/demo/e.sock",
        True,
        ["serving"],
    )
    assert (second.text, second.background, second.expected) == (
        "echo a && echo b",
        False,
        ["a", "b"],
    )
    assert (third.where, third.expected) == ("page.md:8", [])


# -- running -----------------------------------------------------------------------------------
def test_a_page_that_tells_the_truth_passes(tmp_path: Path) -> None:
    path = page(
        tmp_path,
        "```console\n"
        "$ echo 'hello from pid' $$ > /tmp/demo/note.txt; cat /tmp/demo/note.txt\n"
        "hello from pid <pid>\n"
        '$ false; echo "exit $?"\n'
        "exit 1\n"
        "$ sh -c 'echo to stderr >&2'\n"
        "to stderr\n"
        "```\n\n"
        "```python\nprint(open('/tmp/demo/note.txt').read().split()[0])\n```\n\n"
        "<!-- check: output -->\n```text\nhello\n```\n",
    )
    result = sessions.run(path)
    assert result.mismatches == [], "\n".join(map(str, result.mismatches))


def test_drift_fails_with_a_diff_of_documented_against_actual(tmp_path: Path) -> None:
    path = page(
        tmp_path,
        "```console\n$ printf 'one\\ntwo\\nthree\\n'\none\n2\nthree\n$ echo fine\nfine\n```\n",
    )
    result = sessions.run(path)
    assert len(result.mismatches) == 1
    report = str(result.mismatches[0])
    assert report.splitlines()[0] == "page.md:2: $ printf 'one\\ntwo\\nthree\\n'"
    assert "--- documented" in report
    assert "+++ actual" in report
    assert "\n-2\n+two\n" in report
    assert "\n one\n" in report  # matching lines are context, not noise


def test_background_jobs_are_waited_for_compared_and_stopped(tmp_path: Path) -> None:
    # The server must be listening before the client runs (no race), its output is compared
    # once it has stopped, and it is stopped at the end of the page.
    path = page(
        tmp_path,
        "```console\n"
        "$ udskit serve --upper -v /tmp/demo/up.sock &\n"
        "udskit: serving /tmp/demo/up.sock (stream, mode 0600); Ctrl-C stops\n"
        "udskit: client pid=<pid> uid=0 gid=0 process=udskit\n"
        "$ echo hi | udskit connect /tmp/demo/up.sock\n"
        "HI\n"
        "```\n",
    )
    if os.geteuid() != 0:
        pytest.skip("the documented line shows uid 0")
    result = sessions.run(path)
    assert result.mismatches == [], "\n".join(map(str, result.mismatches))


def test_a_wrong_background_output_fails(tmp_path: Path) -> None:
    path = page(tmp_path, "```console\n$ sh -c 'echo started; exit 0' &\nstarting\n```\n")
    result = sessions.run(path)
    assert [m.step.where for m in result.mismatches] == ["page.md:2"]
    assert "(background)" in str(result.mismatches[0])


def test_a_python_example_that_fails_is_caught(tmp_path: Path) -> None:
    path = page(tmp_path, "```python\nimport udskit\nudskit.connect('/tmp/demo/none.sock')\n```\n")
    result = sessions.run(path)
    assert len(result.mismatches) == 1
    assert "cannot connect to /tmp/demo/none.sock" in str(result.mismatches[0])


def test_a_command_that_hangs_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sessions, "SESSION_TIMEOUT", 1.0)
    path = page(tmp_path, "```console\n$ echo before\nbefore\n$ sleep 30\n```\n")
    result = sessions.run(path)
    assert [str(m).splitlines()[0] for m in result.mismatches] == [
        "page.md:4: $ sleep 30: did not finish within 1 s"
    ]
