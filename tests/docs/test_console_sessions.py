"""Every console session and Python example in README.md and docs/*.md runs, and prints what
the page says it prints.

The pages show a root's session (uid 0, ``chgrp``, ``doctor --as www-data`` connecting as
another user), so the sessions run as root, as CI runs them; the check that no block escapes
runs for everyone. The conventions are in ``tests/docs/sessions.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.docs import sessions

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
IDS = [page.relative_to(ROOT).as_posix() for page in PAGES]


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_every_block_runs_or_says_why(page: Path) -> None:
    problems = sessions.problems(page)
    assert not problems, "\n".join(problems)


@pytest.mark.long
@pytest.mark.root
@pytest.mark.timeout(sessions.SESSION_TIMEOUT + 60)
@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_documented_sessions_print_what_they_show(page: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the pages show a root's session (chgrp, doctor --as www-data)")
    if not sessions.steps(page):
        pytest.skip("nothing to run on this page")
    result = sessions.run(page)
    if result.mismatches:
        report = "\n\n".join(str(mismatch) for mismatch in result.mismatches)
        pytest.fail(
            f"{len(result.mismatches)} documented output(s) differ from what users see "
            f"(update the page to what the program prints, unless the program is wrong):\n\n"
            f"{report}",
            pytrace=False,
        )
