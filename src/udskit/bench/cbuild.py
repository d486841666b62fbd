"""Build the C reference peer (``benchmarks/udsbench.c``) with ``$CC -O2`` (``cc`` when CC is
not set, as for make) into a cache.

The binary is named after a hash of the source and the compiler, so an edited source or
another compiler rebuilds it, and concurrent runs never see a half-written file (it is
compiled under a temporary name and renamed into place).
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ["Build", "build", "cache_dir", "compiler_command", "find_source"]

SOURCE_NAME: Final = "udsbench.c"

#: Compiling one small file takes well under a second; a compiler stuck longer is broken.
COMPILE_TIMEOUT: Final = 120.0

#: The compiler when ``$CC`` is not set, as for make.
_DEFAULT_CC: Final = "cc"


@dataclass(frozen=True, slots=True)
class Build:
    """The compiled binary, or why there is none."""

    binary: Path | None
    reason: str
    source: Path | None
    compiler: str | None


def find_source() -> Path | None:
    """The C reference's source: the copy installed with this package (in the source tree
    a link to ``benchmarks/udsbench.c``), else ``benchmarks/udsbench.c`` of the current
    directory; None if neither is there."""
    candidates = [
        Path(__file__).parent / SOURCE_NAME,  # the wheel holds a copy; a checkout, the link
        Path.cwd() / "benchmarks" / SOURCE_NAME,
    ]
    return next((path for path in candidates if path.is_file()), None)


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/udskit/bench`` (``~/.cache/udskit/bench`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "udskit" / "bench"


def compiler_command() -> tuple[list[str] | None, str]:
    """The compiler's command line from ``$CC``, as make reads it (a program and its own
    options, like ``ccache gcc`` or ``clang -m64``), else ``cc``; or None and why not."""
    wanted = os.environ.get("CC", "").strip()
    if not wanted:
        found = shutil.which(_DEFAULT_CC)
        if found is None:
            return None, f"no C compiler ({_DEFAULT_CC}) on PATH; install gcc or clang"
        return [found], ""
    try:
        words = shlex.split(wanted)
    except ValueError as exc:
        return None, f"$CC ({wanted}) is not a command line: {exc}"
    found = shutil.which(words[0])
    if found is None:
        return None, (
            f"$CC names {words[0]}, which is not on PATH (or not executable); install it, "
            f"or unset CC to use {_DEFAULT_CC}"
        )
    return [found, *words[1:]], ""


def build(source: Path | None = None) -> Build:
    """Compile the C reference unless the cache already holds this source's binary."""
    source = source or find_source()
    if source is None:
        return Build(
            None,
            f"C source {SOURCE_NAME} not found (neither installed with udskit.bench nor in "
            "./benchmarks; reinstall udskit, or run from its source tree)",
            None,
            None,
        )
    command, problem = compiler_command()
    if command is None:
        return Build(None, problem, source, None)
    compiler = shlex.join(command)
    digest = hashlib.sha256(source.read_bytes() + compiler.encode()).hexdigest()[:16]
    target = cache_dir() / f"udsbench-{digest}"
    if os.access(target, os.X_OK):
        return Build(target, "", source, compiler)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return Build(None, f"cannot create cache {target.parent}: {exc.strerror}", source, compiler)
    fd, partial = tempfile.mkstemp(prefix=".udsbench-", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run(
            [*command, "-O2", "-o", partial, str(source)],
            capture_output=True,
            text=True,
            timeout=COMPILE_TIMEOUT,
            check=False,
        )
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            first = next((line for line in lines if "error" in line), lines[0] if lines else "")
            return Build(None, f"{compiler} -O2 {source} failed: {first}", source, compiler)
        os.chmod(partial, 0o700)
        os.replace(partial, target)
    except subprocess.TimeoutExpired:
        return Build(None, f"{compiler} took over {COMPILE_TIMEOUT:.0f} s", source, compiler)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return Build(target, "", source, compiler)
