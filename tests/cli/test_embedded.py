"""``udskit.cli.main.main`` called more than once in one process (tests do, and so may a
program that embeds the CLI): each call logs as its own arguments say, to its own stderr.
A separate interpreter each, as such a program: pytest's own logging is not in the way."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.cli.conftest import COMMAND_TIMEOUT

_TWICE = """
import io, logging, sys
from udskit.cli.main import main
first = sys.stderr = io.StringIO()
main(["ls", sys.argv[1]])
second = sys.stderr = io.StringIO()
main(["--log-level", "debug", "ls", sys.argv[1]])
logging.getLogger("udskit.test").debug("during the second call")
sys.stderr = sys.__stderr__
for stderr in (first, second):
    print("during the second call" in stderr.getvalue())
"""

_OWN_LOGGING = """
import io, logging, sys
from udskit.cli.main import main
logging.basicConfig(stream=sys.stdout, format="app: %(message)s", level=logging.INFO)
main(["ls", sys.argv[1]])
logging.getLogger("udskit.test").info("the program's own handler, kept")
"""


def _run(program: str, tmp_path: Path) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", program, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=True,
    )
    return done.stdout.splitlines()


def test_a_second_call_logs_to_its_own_stderr_at_its_own_level(tmp_path: Path) -> None:
    # The first call's handler stayed (logging.basicConfig keeps one): the second call's
    # records went to the first call's stderr, and its --log-level was ignored.
    assert _run(_TWICE, tmp_path / "missing") == ["False", "True"]


def test_a_programs_own_logging_is_left_as_it_is(tmp_path: Path) -> None:
    assert _run(_OWN_LOGGING, tmp_path / "missing") == ["app: the program's own handler, kept"]
