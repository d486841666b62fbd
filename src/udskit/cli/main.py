"""Entry point: build the parser from the subcommand modules, dispatch, and turn errors
into one line on stderr.

Each subcommand lives in ``udskit/cli/cmd_<name>.py`` and provides:

* ``HELP``: one line for ``udskit --help``;
* ``EXAMPLE``: example invocations, shown under the subcommand's ``--help``;
* ``add_arguments(parser)``: its options;
* ``run(args) -> int``: the exit code.

Exit codes: 0 ok, 1 runtime failure, 2 usage, 130 interrupted (Ctrl-C). Expected failures
(every ``UdsError``, bad values, a missing peer program) print ``udskit: <what failed>`` and
never a traceback. A command whose stdout lost its reader stops, and the process ends killed
by SIGPIPE, silently, as ``cat`` and ``git`` do there (a shell's status 141).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import ClassVar, Final, NoReturn

import udskit

from ._output import forget_stdout_gone, found_stdout_gone, stdout_gone
from ._stdio import hold_standard_fds
from ._wording import in_cli_words

__all__ = [
    "COMMANDS",
    "EXIT_BROKEN_PIPE",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "UsageError",
    "main",
]

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2
#: What a shell reports for a command that SIGINT (Ctrl-C) ended: 128 + 2.
EXIT_INTERRUPTED: Final = 130
#: What a shell reports for a command that SIGPIPE ended (128 + 13); ours, should the
#: signal itself not end us (a parent that blocked it).
EXIT_BROKEN_PIPE: Final = 128 + signal.SIGPIPE

#: Subcommands in the order ``udskit --help`` lists them.
COMMANDS: Final = (
    "serve",
    "upgrade",
    "connect",
    "send",
    "pair",
    "wait",
    "doctor",
    "ls",
    "bridge",
    "tap",
    "http",
    "bench",
    "demo",
)


class UsageError(Exception):
    """A command-line mistake a parser cannot see (e.g. two conflicting actions): exit 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with usage mistakes reported in one line (argparse prints the usage
    synopsis first, several lines for a subcommand with many options)."""

    #: The command line being parsed (set by main): to say what to do about an argument
    #: that starts with '-' and is taken for an option.
    argv: ClassVar[Sequence[str]] = ()

    def error(self, message: str) -> NoReturn:
        hint = f"see '{self.prog} --help'"
        if message.startswith(_DASH_MISTAKES):
            known = self._option_string_actions
            dashed = [a for a in self.argv if a.startswith("-") and a != "--" and a not in known]
            if dashed and "--" not in self.argv:
                hint += f"; an argument that starts with '-', such as {dashed[0]}, goes after '--'"
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}; {hint}\n")


#: argparse's words for a command line where an argument starting with '-' was taken for an
#: option (``udskit send PATH -hello``: "-h" with "ello"; ``--what``: no MSG given).
_DASH_MISTAKES: Final = (
    "argument -h/--help: ignored explicit argument",
    "unrecognized arguments:",
    "the following arguments are required:",
)


def _load(name: str) -> ModuleType | None:
    module_name = f"udskit.cli.cmd_{name}"
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return None
        raise


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser with every subcommand, or with ``only`` that one: each subcommand's
    module loads only when it is used, and a command starts in half the time that loading
    them all takes."""
    parser = _Parser(
        prog="udskit",
        description="Unix domain sockets done right: serve, connect, diagnose, bridge, measure.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  udskit serve --echo /tmp/echo.sock\n"
            "  udskit send --reply /tmp/echo.sock hello\n"
            "  udskit doctor /tmp/gunicorn.sock --as www-data\n\n"
            "addresses: /path, ./rel, unix:PATH, @abstract, tcp:HOST:PORT, fd:N\n"
            "exit codes: 0 ok, 1 failure, 2 usage, 130 Ctrl-C, 141 stdout's reader gone (SIGPIPE)"
        ),
    )
    parser.add_argument("--version", action="version", version=f"udskit {udskit.__version__}")
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=("debug", "info", "warning", "error"),
        help="udskit's own log messages on stderr (default: warning)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS if only is None else (only,):
        module = _load(name)
        if module is None:
            continue
        sub = commands.add_parser(
            name,
            help=module.HELP,
            description=module.HELP,
            epilog="examples:\n" + module.EXAMPLE,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


#: The one option that may come before the subcommand with a value.
_LOG_LEVEL: Final = "--log-level"


def _chosen(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` names: its first word, after any ``--log-level``. None for
    anything else (``--help`` or ``--version`` first, no subcommand, a mistake): then the
    parser has every subcommand, to list them or to say which there are."""
    words = iter(argv)
    for word in words:
        option, has_value, _ = word.partition("=")
        if not _LOG_LEVEL.startswith(option) or len(option) < len("--l"):
            return word if word in COMMANDS else None
        if not has_value:  # argparse's abbreviations too: --log debug
            next(words, None)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    hold_standard_fds()  # before any socket can take a closed one's number
    forget_stdout_gone()  # an earlier call's, in this process: not ours to die of
    try:
        code = _main(argv)
    except KeyboardInterrupt:
        # Ctrl-C, at any point, even while the subcommands' modules load: the shell's code
        # for an interrupted command, and no traceback.
        return EXIT_INTERRUPTED
    if stdout_gone():
        _end_as_sigpipe_does()
    return code


def _end_as_sigpipe_does() -> NoReturn:
    """End as a writer whose reader went away ends: ``cat`` is killed by SIGPIPE there, and
    git (write_or_die.c, check_pipe) raises it on itself after EPIPE. Python ignores
    SIGPIPE (so that a socket's peer going away is an error, not our death), and the
    command has stopped and cleaned up on its EPIPE already: now the signal, with its
    default action. A shell sees 141 (``set -o pipefail`` fails the pipeline, as for cat),
    a parent process the signal; stderr says nothing, as for cat.
    """
    sys.stderr.flush()
    previous = signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        os.kill(os.getpid(), signal.SIGPIPE)
    finally:
        # Still alive: every thread blocks the signal (an embedding program, a parent that
        # blocked it). Python's own disposition again, which also discards the pending
        # signal (POSIX, sigaction): else the process would die of a later EPIPE on any
        # socket, or when it unblocks the signal, long after this command.
        signal.signal(signal.SIGPIPE, previous)
    raise SystemExit(EXIT_BROKEN_PIPE)  # its status, then


def _main(argv: Sequence[str] | None) -> int:
    _Parser.argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_chosen(_Parser.argv))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    _log_to_stderr(args.log_level)
    try:
        return int(args.run(args))
    except UsageError as exc:
        parser.exit(EXIT_USAGE, f"udskit {args.command}: error: {exc}\n")
    except (udskit.UdsError, ValueError, OSError) as exc:
        if isinstance(exc, BrokenPipeError) and found_stdout_gone():
            return EXIT_OK  # print() to a stdout nobody reads: main ends as SIGPIPE would
        # Expected failures: one line, no traceback. OSError covers what the library does not
        # wrap (a missing program for --exec, an unreadable file for -d @FILE, ...).
        print(f"udskit {args.command}: {_one_line(exc)}", file=sys.stderr)
        return (
            EXIT_USAGE
            if isinstance(exc, ValueError) and not isinstance(exc, udskit.AddressError)
            else EXIT_FAILURE
        )


#: The handler an earlier call of main() put on the root logger, in this process.
_OURS: Final[list[logging.Handler]] = []


def _log_to_stderr(level: str) -> None:
    """Log at ``level`` to this call's stderr, in the words of the command line.

    As logging.basicConfig, except that a handler of an earlier call in this process
    (tests, a program that embeds the CLI) is replaced, not kept: basicConfig left it,
    writing to that call's stderr at that call's level. A program's own logging is left
    as it is, as basicConfig leaves it."""
    root = logging.getLogger()
    for handler in _OURS:
        root.removeHandler(handler)
    _OURS.clear()
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_InCliWords("udskit: %(message)s"))
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    _OURS.append(handler)


class _InCliWords(logging.Formatter):
    """Log records as the command line says them (``allow=`` as ``--allow-uid/--allow-gid``)."""

    def format(self, record: logging.LogRecord) -> str:
        return in_cli_words(super().format(record))


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and not isinstance(exc, udskit.UdsError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        text = f"{exc.strerror.lower()}{where}"
    return in_cli_words(" ".join(text.split()))
