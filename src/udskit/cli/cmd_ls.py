"""``udskit ls [DIR] [--stale] [--json]``: the host's Unix sockets, or the stale ones in DIR."""

from __future__ import annotations

import argparse
import json
import os
import stat
import time

from udskit import inspect
from udskit.address import one_line

from ._output import Output
from .main import UsageError

HELP = "list the host's Unix sockets (type, state, process), or stale socket files in DIR"
EXAMPLE = """\
  udskit ls                       every named Unix socket, and which process holds it
  udskit ls /run                  only socket files under /run
  udskit ls --stale /tmp          socket files under /tmp that nobody listens on
  udskit ls --json
"""

_COLUMNS = ("TYPE", "STATE", "CONNS", "PID", "PROCESS", "PATH")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "directory", metavar="DIR", nargs="?", help="only sockets under DIR (needed by --stale)"
    )
    parser.add_argument(
        "--stale",
        action="store_true",
        help="list socket files under DIR (recursively) that nobody listens on",
    )
    parser.add_argument("--json", action="store_true", help="JSON, one object per socket")


def run(args: argparse.Namespace) -> int:
    out = Output()
    if args.directory is not None:
        # a mistyped DIR would otherwise list nothing, as if no socket were there
        _check_directory(args.directory)
    if args.stale:
        if args.directory is None:
            raise UsageError("--stale needs the directory to search, e.g. udskit ls --stale /tmp")
        stale = inspect.find_stale(args.directory)
        if args.json:
            out.write(_json([s.as_dict() for s in stale]))
        else:
            out.write(_stale_table(stale))
        return 0
    entries = inspect.list_sockets(args.directory)
    if args.json:
        out.write(_json([e.as_dict() for e in entries]))
    else:
        out.write(_table(entries))
    return 0


def _check_directory(directory: str) -> None:
    """DIR exists and is a directory, or the one line that says which it is not."""
    shown = one_line(directory) if directory else "''"
    try:
        info = os.stat(directory)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such directory: {shown}; check the path") from None
    except OSError as exc:
        raise OSError(f"cannot look at {shown}: {os.strerror(exc.errno or 0).lower()}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise NotADirectoryError(f"{shown} is not a directory; give the directory to list")


def _json(items: list[dict[str, object]]) -> bytes:
    return (json.dumps(items, indent=2) + "\n").encode()


def _table(entries: list[inspect.SocketEntry]) -> bytes:
    rows: list[tuple[str, ...]] = [_COLUMNS]
    rows.extend(
        (
            e.type,
            e.state,
            str(e.connections) if e.state == "listening" else "",
            ",".join(str(p) for p in e.pids) or "?",
            ",".join(sorted(set(e.processes))) or "?",
            f"{e.path}  ({e.note})" if e.note else e.path,
        )
        for e in entries
    )
    return _format(rows)


def _stale_table(stale: list[inspect.StaleSocket]) -> bytes:
    rows: list[tuple[str, ...]] = [("AGE", "UID", "MODIFIED", "PATH")]
    for s in stale:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.mtime))
        rows.append((_age(s.age), str(s.uid), when, s.path))
    return _format(rows)


def _format(rows: list[tuple[str, ...]]) -> bytes:
    # Every cell may hold what another user chose (a path, a process name): one line each.
    rows = [tuple(one_line(cell) for cell in row) for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True))
        + "  "
        + row[-1]
        for row in rows
    ]
    return "".join(line.rstrip() + "\n" for line in lines).encode()


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"
