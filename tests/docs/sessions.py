"""Run the console sessions and Python examples of a Markdown file, and compare their output
with the one the file shows.

The conventions a documentation page follows (README.md's "Development" section points here):

Blocks
    Every fenced block names its language. ```` ```console ```` blocks are shell sessions and
    ```` ```python ```` blocks are programs: both are run. ```` ```text ````, ```` ```nginx ````
    and the other data languages are shown, not run. Any other block (```` ```sh ````: commands
    to adapt, such as an install) must say why it is not run, on the line before it:
    ``<!-- not run: installs packages -->``; the same comment also exempts a console or Python
    block (a benchmark that takes minutes).

One session per file
    The runnable blocks of a file run in order, in one ``bash``, as one user would type them
    one after the other: a server started in one block still runs in the next. Every
    background job still running at the end of the file gets SIGTERM.

Paths
    The pages use ``/tmp/demo`` and ``/run/app``. The check maps both to fresh directories
    (mode 0755, so that ``--as www-data`` reaches them) in commands and programs, and maps
    them back in what was printed. The session starts in the parent of both.

Console sessions
    ``$ COMMAND`` lines are commands; the lines up to the next ``$`` line are what the command
    printed, stdout and stderr together, as on a terminal. A command ending in ``&`` (before
    an optional ``# comment``) runs in the background: the lines under it are everything that
    job prints until it ends (or is stopped at the end of the file), compared once it has
    ended. Before the next command runs, the check waits until the job listens (a listening
    or named datagram socket, Unix or TCP, in the job or its children; /proc only, it never
    connects) or has exited. ``$!``, ``wait`` and the rest of bash work as usual.

Python programs
    A ``python`` block runs as ``python -u BLOCK`` (its own process, from the session's
    directory). What it prints must equal the ```` ```text ```` block that follows it with
    ``<!-- check: output -->`` on the line before, or nothing when there is none.
    ``<!-- check: background -->`` runs a block in the background, as a command with ``&``
    (its output block is compared once it has ended); ``<!-- check: file=NAME -->`` only
    writes the block to NAME in the session's directory (a module that a command uses).

What may differ
    Lines are compared without trailing whitespace, and runs of two or more spaces compare
    equal (table columns move with the width of a pid). Trailing empty lines do not count.
    A line that is exactly ``...`` stands for any number of lines (none included). Inside a
    line, these placeholders stand for what changes from run to run, and nothing else:
    ``<pid>``, ``<n>`` (a whole number), ``<seconds>`` (``4.7``), ``<time>``
    (``2026-11-21 08:56:46``), ``<http-date>`` (``Sat, 21 Nov 2026 08:56:50 GMT``),
    ``<hex>``, ``<tmp>`` (a temporary name: letters, digits, ``_``), ``<process>`` (a
    process name, which is ``python`` or ``python3`` as the interpreter was started).
    Bash's own notices about background jobs (``line 12: 4242 Killed ...``) are left out:
    an interactive shell words them differently.
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Final

#: Bound on one file's whole session, against a command that hangs; not a measure of speed.
#: The longest page (docs/cli.md, with the demo) takes about 30 s alone, and 50 s or more
#: beside a second test worker on two CPUs, its servers started under coverage.
SESSION_TIMEOUT: Final = 240.0

#: The directories the pages use, and the name each gets inside the session's directory.
MAPPED: Final = (("/tmp/demo", "demo"), ("/run/app", "app"))

#: Languages that are shown as data and never run.
DATA_LANGUAGES: Final = frozenset({"text", "nginx", "ini", "toml", "json", "yaml"})

#: Languages that are run.
RUN_LANGUAGES: Final = frozenset({"console", "python"})

PLACEHOLDERS: Final = {
    "pid": r"\d+",
    "n": r"\d+",
    "seconds": r"\d+(?:\.\d+)?",
    "time": r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d",
    "http-date": r"[A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d GMT",
    "hex": r"[0-9a-f]+",
    "tmp": r"\w+",
    "process": r"[\w.-]+",
}

ANY_LINES: Final = "..."

#: The words a ``<!-- check: ... -->`` comment may hold, besides ``file=NAME``.
_CHECK_WORDS: Final = frozenset({"background", "output"})

_READY: Final = Path(__file__).with_name("ready.py")
_FENCE: Final = re.compile(r"^(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)")
_DIRECTIVE: Final = re.compile(r"^<!--\s*(?P<key>check|not run):\s*(?P<value>.*?)\s*-->\s*$")
_BACKGROUND: Final = re.compile(r"^(?P<command>.*\S)\s+&(?:\s+#.*)?\s*$")
_PLACEHOLDER: Final = re.compile("<(" + "|".join(map(re.escape, PLACEHOLDERS)) + ")>")
_SPACES: Final = re.compile(r" {2,}")
_MARK: Final = "\x1e"


@dataclass(frozen=True)
class Block:
    """One fenced block of a Markdown file."""

    file: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    check: tuple[str, ...] = ()  # the words of a <!-- check: ... --> comment before it
    not_run: str = ""  # the reason given by a <!-- not run: ... --> comment before it

    @property
    def where(self) -> str:
        return f"{self.file.name}:{self.line}"

    @property
    def runs(self) -> bool:
        return self.lang in RUN_LANGUAGES and not self.not_run and not self.output_of_previous

    @property
    def output_of_previous(self) -> bool:
        return "output" in self.check

    @property
    def background(self) -> bool:
        return "background" in self.check

    @property
    def file_name(self) -> str:
        for word in self.check:
            if word.startswith("file="):
                return word.removeprefix("file=")
        return ""


@dataclass
class Step:
    """One thing the session does: a command, a program, or a file to write."""

    where: str
    shown: str  # the command or "python" block as the page shows it
    expected: list[str]
    kind: str  # "command", "python" or "file"
    text: str  # the command line, or the program's source
    background: bool = False
    file_name: str = ""


@dataclass
class Mismatch:
    step: Step
    actual: list[str]

    def __str__(self) -> str:
        shown = display(self.step.expected, self.actual)
        diff = difflib.unified_diff(
            self.step.expected, shown, "documented", "actual", lineterm="", n=2
        )
        head = "(background) " if self.step.background else ""
        return f"{self.step.where}: {head}{self.step.shown}\n" + "\n".join(diff)


@dataclass
class Result:
    mismatches: list[Mismatch] = field(default_factory=list)
    transcript: str = ""


# -- reading the page ---------------------------------------------------------------------------
def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, with the directive comment before each."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        fence, start = opening["fence"], index
        index += 1
        body = []
        while index < len(lines) and not lines[index].startswith(fence):
            body.append(lines[index])
            index += 1
        index += 1
        check: tuple[str, ...] = ()
        not_run = ""
        directive = _DIRECTIVE.match(lines[start - 1]) if start else None
        if directive and directive["key"] == "check":
            check = tuple(directive["value"].split())
        elif directive:
            not_run = directive["value"] or "?"
        text = "\n".join(body) + "\n"
        found.append(Block(path, start + 1, opening["lang"], text, check, not_run))
    return found


def problems(path: Path) -> list[str]:
    """Blocks that would escape the check, and directives that make no sense."""
    found = blocks(path)
    issues = []
    for previous, block in zip([None, *found], found, strict=False):
        if not block.lang:
            issues.append(f"{block.where}: a block without a language (console? text?)")
        elif block.not_run or block.lang in DATA_LANGUAGES | RUN_LANGUAGES:
            pass
        else:
            issues.append(f"{block.where}: a {block.lang} block is not run: say why")
        unknown = [w for w in block.check if w not in _CHECK_WORDS and not w.startswith("file=")]
        if unknown:
            issues.append(f"{block.where}: unknown check words: {' '.join(unknown)}")
        if block.output_of_previous and (previous is None or previous.lang != "python"):
            issues.append(f"{block.where}: an output block that follows no Python block")
        if block.lang == "console" and block.runs:
            first = block.text.lstrip("\n").split("\n", 1)[0]
            if not first.startswith("$ "):
                issues.append(f"{block.where}: a console block must start with a $ command")
    return issues


def steps(path: Path) -> list[Step]:
    """What the session of one file does, in order."""
    found = blocks(path)
    result: list[Step] = []
    for block, after in zip(found, [*found[1:], None], strict=True):
        if not block.runs:
            continue
        if block.lang == "console":
            result += _console_steps(block)
            continue
        expected = _lines(after.text) if after and after.output_of_previous else []
        kind = "file" if block.file_name else "python"
        shown = f"python block ({block.file_name})" if block.file_name else "python block"
        result.append(
            Step(block.where, shown, expected, kind, block.text, block.background, block.file_name)
        )
    return result


def _console_steps(block: Block) -> list[Step]:
    result: list[Step] = []
    for offset, line in enumerate(block.text.splitlines()):
        if line.startswith("$ "):
            where = f"{block.file.name}:{block.line + 1 + offset}"
            command = line[2:]
            background = _BACKGROUND.match(command)
            text = background["command"] if background else command
            result.append(Step(where, line, [], "command", text, background is not None))
        elif result:
            result[-1].expected.append(line)
    for step in result:
        step.expected = _lines("\n".join(step.expected))
    return result


def _lines(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


# -- comparing ---------------------------------------------------------------------------------
@cache
def _pattern(expected: str) -> re.Pattern[str]:
    parts = _PLACEHOLDER.split(_SPACES.sub("  ", expected))
    regex = "".join(
        PLACEHOLDERS[part] if index % 2 else re.escape(part) for index, part in enumerate(parts)
    )
    return re.compile(regex)


def line_matches(expected: str, actual: str) -> bool:
    return _pattern(expected).fullmatch(_SPACES.sub("  ", actual)) is not None


def matches(expected: Sequence[str], actual: Sequence[str]) -> bool:
    """Whether ``actual`` fits ``expected``, where a ``...`` line stands for any lines."""
    # reachable[j]: the expected lines so far can account for the first j actual lines
    reachable = [True] + [False] * len(actual)
    for line in expected:
        if line == ANY_LINES:
            for j in range(1, len(actual) + 1):
                reachable[j] = reachable[j] or reachable[j - 1]
        else:
            reachable = [False] + [
                reachable[j] and line_matches(line, actual[j]) for j in range(len(actual))
            ]
    return reachable[-1]


def display(expected: Sequence[str], actual: Sequence[str]) -> list[str]:
    """``actual``, with each line that a documented line matches shown as that line, so that
    a diff shows only what really differs."""
    shown, position = [], 0
    for line in actual:
        for index in range(position, len(expected)):
            if expected[index] != ANY_LINES and line_matches(expected[index], line):
                shown.append(expected[index])
                position = index + 1
                break
        else:
            shown.append(line)
    return shown


# -- running -----------------------------------------------------------------------------------
def run(path: Path, python: str = sys.executable) -> Result:
    """Run the session of one Markdown file; return every step whose output differs."""
    plan = steps(path)
    root = Path(tempfile.mkdtemp(prefix="uds-doc-", dir="/tmp"))
    try:
        root.chmod(0o755)
        for _, name in MAPPED:
            (root / name).mkdir(mode=0o755)
            (root / name).chmod(0o755)
        (root / ".doc").mkdir()
        script = _script(plan, root, python)
        script_path = root / ".doc" / "session.sh"
        script_path.write_text(script, encoding="utf-8")
        output, timed_out = _run_script(script_path, root, python)
        return _compare(plan, output, root, script_path, timed_out)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _forward(text: str, root: Path) -> str:
    for documented, name in MAPPED:
        text = text.replace(documented, f"{root}/{name}")
    return text


def _backward(text: str, root: Path) -> str:
    for documented, name in MAPPED:
        text = text.replace(f"{root}/{name}", documented)
    return text


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _script(plan: Sequence[Step], root: Path, python: str) -> str:
    doc = root / ".doc"
    # Each step starts with a marker line in the output; $? survives it, for "echo $?".
    lines = ["exec 2>&1", f"cd {_quote(str(root))}", "_doc_jobs=", "_doc_keep() { return $1; }"]
    for number, step in enumerate(plan):
        log = _quote(str(doc / f"{number}.log"))
        lines += [
            "_doc_status=$?",
            f"printf '{_MARK}%s{_MARK}\\n' {number}",
            '_doc_keep "$_doc_status"',
        ]
        if step.kind == "file":
            (root / step.file_name).write_text(_forward(step.text, root), encoding="utf-8")
            continue
        if step.kind == "python":
            program = doc / f"{number}.py"
            program.write_text(_forward(step.text, root), encoding="utf-8")
            command = f"{_quote(python)} -u {_quote(str(program))}"
        else:
            command = _forward(step.text, root)
        if step.background:
            lines += [
                f"{command} >{log} 2>&1 &",
                '_doc_jobs="$_doc_jobs $!"',
                f"{_quote(python)} {_quote(str(_READY))} $!",
            ]
        else:
            lines.append(command)
    lines += [
        f"printf '{_MARK}end{_MARK}\\n'",
        'for _doc_job in $_doc_jobs; do kill -TERM "$_doc_job" 2>/dev/null; done',
        "wait",
    ]
    return "\n".join(lines) + "\n"


def _environment(python: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "TMPDIR")}
    # The commands as a user of this install runs them: its udskit (and gunicorn) first.
    env["PATH"] = os.pathsep.join([os.path.dirname(python), env.get("PATH", os.defpath)])
    env["LC_ALL"] = "C.UTF-8"
    env.pop("LANG", None)
    return env


def _run_script(script: Path, root: Path, python: str) -> tuple[str, bool]:
    """The session's output, and whether it ran out of time."""
    process = subprocess.Popen(
        ["bash", "--norc", "--noprofile", str(script)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=root,
        env=_environment(python),
        start_new_session=True,  # one process group: whatever the session left running
    )
    timed_out = False
    try:
        out, _ = process.communicate(timeout=SESSION_TIMEOUT)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate()
    finally:
        try:  # anything the session started and left behind, by its process group
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return out.decode("utf-8", errors="replace"), timed_out


def _compare(
    plan: Sequence[Step], output: str, root: Path, script: Path, timed_out: bool
) -> Result:
    notice = re.compile(rf"^{re.escape(str(script))}: line \d+: +\d+ [A-Z]")
    pieces = re.split(f"{_MARK}(\\w+){_MARK}\n", output)
    outputs: dict[str, str] = dict(zip(pieces[1::2], pieces[2::2], strict=True))
    result = Result(transcript=_backward(output, root))
    for number, step in enumerate(plan):
        if step.background:
            log = root / ".doc" / f"{number}.log"
            text = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
        else:
            text = outputs.get(str(number), "")
        lines = [line for line in _lines(_backward(text, root)) if not notice.match(line)]
        if not matches(step.expected, lines):
            result.mismatches.append(Mismatch(step, lines))
    if "end" not in outputs:
        last = max((int(key) for key in outputs if key.isdigit()), default=-1)
        stuck = plan[last] if last >= 0 else Step("(start)", "(start)", [], "command", "")
        why = f"did not finish within {SESSION_TIMEOUT:.0f} s" if timed_out else "ended the session"
        result.mismatches.append(
            Mismatch(Step(stuck.where, f"{stuck.shown}: {why}", [], "command", ""), [])
        )
    return result
