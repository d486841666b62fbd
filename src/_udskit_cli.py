"""The ``udskit`` command's entry point: outside the ``udskit`` package on purpose.

Importing anything from ``udskit`` first runs the package's ``__init__``, which loads the
whole library: a tenth of a second in which a Ctrl-C would end the command with a
KeyboardInterrupt traceback, before ``udskit.cli.main`` can catch anything. From here, it
ends the command as a Ctrl-C does at any later point: exit 130, nothing printed.
"""

from __future__ import annotations

#: What a shell reports for a command that SIGINT (Ctrl-C) ended: 128 + 2.
_EXIT_INTERRUPTED = 130


def main() -> int:
    try:
        from udskit.cli.main import main as run
    except KeyboardInterrupt:
        return _EXIT_INTERRUPTED
    return run()
