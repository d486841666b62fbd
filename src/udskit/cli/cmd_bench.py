"""``udskit bench``: udskit and its peers side by side, in one run, with ratios to stdlib."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import Final

from udskit.bench.contenders.registry import ALL, BASELINE, get, names
from udskit.bench.host import choose_pinning
from udskit.bench.output import write_whole
from udskit.bench.plan import CLIENT_COUNTS, FULL, QUICK, TESTS
from udskit.bench.plot import draw, plot_problem
from udskit.bench.report import render
from udskit.bench.results import LARGE_REFERENCE, ContenderInfo, to_json
from udskit.bench.runner import Progress, availability
from udskit.bench.runner import run as run_bench

from ._options import positive_int
from .main import EXIT_FAILURE, EXIT_OK, UsageError

HELP: Final = "measure udskit against stdlib, TCP, pipes, pyzmq, multiprocessing, asyncio and C"
EXAMPLE: Final = (
    "  udskit bench --quick\n"
    "  udskit bench --json results.json --plot results.png\n"
    "  udskit bench --quick --only udskit,asyncio,uvloop\n"
    "  udskit bench --quick --tests many --clients 10000\n"
    "  udskit bench --list"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick", action="store_true", help="short time caps: the whole run in about two minutes"
    )
    parser.add_argument("--json", metavar="FILE", help="write every figure and the setup as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="draw a PNG chart (needs matplotlib)")
    parser.add_argument(
        "--only",
        metavar="NAMES",
        help=f"comma-separated contenders to run ({BASELINE} runs too: ratios are to it; "
        f"those of large messages are to {LARGE_REFERENCE}, which runs only if named)",
    )
    parser.add_argument(
        "--messages",
        metavar="N",
        type=positive_int,
        help="at most N messages per measurement (for a smoke test; figures get noisy)",
    )
    parser.add_argument(
        "--repeats",
        metavar="N",
        type=positive_int,
        help="run each measurement N times, contenders taking turns, and report the median run "
        "(default: 3, or 1 with --quick)",
    )
    parser.add_argument(
        "--clients",
        metavar="LIST",
        help="client counts of the many-clients test (default: "
        f"{','.join(str(n) for n in CLIENT_COUNTS)})",
    )
    parser.add_argument(
        "--tests",
        metavar="LIST",
        help=f"comma-separated tests to run, of {','.join(TESTS)} (default: all)",
    )
    parser.add_argument(
        "--list", action="store_true", help="list the contenders, whether each can run here, exit"
    )


def run(args: argparse.Namespace) -> int:
    plan = QUICK if args.quick else FULL
    if args.messages is not None:
        plan = plan.capped(args.messages)
    if args.repeats is not None:
        plan = plan.with_repeats(args.repeats)
    if args.clients is not None:
        plan = plan.with_clients(_client_counts(args.clients))
    if args.tests is not None:
        wanted = tuple(name.strip() for name in args.tests.split(",") if name.strip())
        try:
            plan = plan.with_tests(wanted)
        except ValueError as exc:
            raise UsageError(f"--tests: {exc}") from None
    selected, notes = _selected(args.only, plan.tests)
    if args.list:
        _print_list(availability(ALL))
        return EXIT_OK
    if args.plot is not None and not args.plot.lower().endswith(".png"):
        raise UsageError(f"--plot draws a PNG: give a file name ending in .png, not {args.plot}")
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        problem = _unwritable(path)
        if problem:
            print(f"udskit bench: cannot write {option} {path}: {problem}", file=sys.stderr)
            return EXIT_FAILURE
    if args.plot is not None and (problem := plot_problem()):
        print(f"udskit bench: cannot draw --plot {args.plot}: {problem}", file=sys.stderr)
        return EXIT_FAILURE

    contenders = [get(name) for name in selected]
    pinning = choose_pinning()
    _say(f"{plan.name} run; {pinning.note}")
    if any(get(name).native for name in selected):
        _say("building the C reference (cached after the first run) ...")
    infos = availability(contenders)
    missing = [info for info in infos if not info.available]
    if missing:
        _say("unavailable here: " + "; ".join(f"{i.name} ({i.reason})" for i in missing))
    result = run_bench(plan, contenders, pinning, _progress(), infos=infos, notes=notes, warn=_say)
    print(render(result), end="", flush=True)
    if args.json is not None:
        _write_json(args.json, to_json(result))
        _say(f"wrote {args.json}")
    if args.plot is not None:
        draw(result, args.plot)
        _say(f"wrote {args.plot}")
    failed = [o for o in result.outcomes if o.status == "failed"]
    if failed:
        _say(f"{len(failed)} measurement(s) failed; see the Notes above for why")
        return EXIT_FAILURE
    return EXIT_OK


def _selected(only: str | None, tests: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """The contenders to run, in the table's order, and what the report notes of --only:
    the baseline added (unless only large messages run: they have another reference), and
    the large messages' reference when it is missing (the table then has no ratios)."""
    if only is None:
        return names(), []
    wanted = [name.strip() for name in only.split(",") if name.strip()]
    if not wanted:
        raise UsageError("--only needs at least one contender name")
    unknown = [name for name in wanted if name not in names()]
    if unknown:
        raise UsageError(
            f"unknown contender {', '.join(map(repr, unknown))} in --only; "
            f"choose from: {', '.join(names())}"
        )
    notes = []
    baseline = tests != ("large",)
    if baseline and BASELINE not in wanted:
        but = " but the large messages'" if "large" in tests else ""
        notes.append(f"{BASELINE} was added to --only: every ratio{but} is relative to it")
    if "large" in tests and LARGE_REFERENCE not in wanted:
        notes.append(
            f"{LARGE_REFERENCE} is not in --only: the large messages' ratios are relative to "
            "it, so that table has none; add it to --only for them"
        )
    # The table's order, with the baseline first whatever --only said.
    chosen = [name for name in names() if name in wanted or (baseline and name == BASELINE)]
    return chosen, notes


def _client_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        counts = ()
    if not counts or any(n < 1 for n in counts):
        raise UsageError(f"--clients takes positive integers like 100,1000, not {text!r}")
    return counts


def _unwritable(path: str | None) -> str | None:
    """Why ``path`` cannot be written, checked before minutes of measuring; None if it can."""
    if path is None:
        return None
    if os.path.isdir(path):
        return "it is a directory; give a file name"
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        return _unreachable(directory)
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"directory {directory} is not writable"
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return "the file is not writable"
    return None


def _unreachable(directory: str) -> str:
    """Why ``directory`` is not there: the first component on the way that is a file (it
    said "directory /etc/passwd does not exist"), or that does not exist, and what to do."""
    parts = directory.split("/")
    for i in range(2, len(parts) + 1):
        prefix = "/".join(parts[:i])
        if os.path.isdir(prefix):
            continue
        if os.path.lexists(prefix):
            return f"{prefix} is not a directory; check the path"
        break
    return (
        f"directory {directory} does not exist; create it first (mkdir -p {shlex.quote(directory)})"
    )


def _write_json(path: str, document: dict[str, object]) -> None:
    text = json.dumps(document, indent=2) + "\n"
    write_whole(path, lambda out: out.write(text.encode("utf-8")), ".json")


def _print_list(infos: list[ContenderInfo]) -> None:
    for info in infos:
        state = "ready" if info.available else f"unavailable: {info.reason}"
        print(f"{info.name:<18} {state}\n{'':<18} {info.description}")


def _say(text: str) -> None:
    print(f"udskit bench: {text}", file=sys.stderr, flush=True)


def _progress() -> Progress:
    tty = sys.stderr.isatty()

    def report(done: int, total: int, text: str) -> None:
        line = f"[{done:>{len(str(total))}}/{total}] {text}"
        if tty:
            end = "\n" if done == total else ""
            print(f"\r\x1b[K{line}", end=end, file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    return report
