"""What users read names things in their words: no internal scenario ids (S1-S11), issue
numbers or "seed" in the pages, the command line's help, or the benchmark's report."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from tests.bench.test_report import make_run
from udskit.bench.report import render
from udskit.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: Internal words: scenario ids (S1 ... S11), "seed" scenarios and claims, issue numbers.
JARGON = re.compile(r"\bS\d{1,2}\b|\b[Ss]eeds?\b|\b[Ii]ssues?\b")


def jargon(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if JARGON.search(line)]


def test_the_pattern_catches_the_old_wording() -> None:
    assert jargon("Issue 4 targets (this run)")
    assert jargon("Seed claim S10 holds")
    assert jargon("udskit demo: the seed scenarios S1-S8")
    assert not jargon("udskit serve --echo /tmp/demo/s1.sock")


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_pages(page: Path) -> None:
    assert jargon(page.read_text(encoding="utf-8")) == []


def helps(parser: argparse.ArgumentParser) -> list[str]:
    texts = [parser.format_help()]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            texts += [sub.format_help() for sub in action.choices.values()]
    return texts


def test_command_line_help() -> None:
    texts = helps(build_parser())
    assert len(texts) > 10  # the main help and every subcommand's
    assert [line for text in texts for line in jargon(text)] == []


def test_bench_report() -> None:
    text = render(make_run())
    assert "Targets (this run)" in text
    assert jargon(text) == []
