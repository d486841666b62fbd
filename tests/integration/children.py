"""Real child processes for tests: fork a function (optionally as another user) and collect
what it reports, with every wait bounded.

Forked children run a few socket calls and leave with ``os._exit``, so they never run
pytest's teardown or flush its buffers twice.
"""

from __future__ import annotations

import os
import select
import signal
import traceback
import warnings
from collections.abc import Callable, Sequence

import pytest

from ..conftest import READY_TIMEOUT

#: nobody/nogroup on Debian and most distributions: a second identity that owns nothing.
NOBODY = 65534

#: Exit status of a child whose function raised.
CHILD_FAILED = 70


def fork(
    func: Callable[[], int | None], *, as_user: int | None = None, groups: Sequence[int] = ()
) -> int:
    """Run ``func()`` in a forked child (as uid/gid ``as_user`` with supplementary
    ``groups``, if given); return its pid.

    The child's exit status is what ``func`` returns (0 for None), or CHILD_FAILED with the
    traceback on stderr if it raised.
    """
    with warnings.catch_warnings():
        # Python 3.12+ warns about fork() in a process with threads; the children here
        # only make socket calls and exit, they take none of the locks a thread may hold.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid:
        return pid
    code = CHILD_FAILED
    try:
        if as_user is not None:
            os.setgroups(list(groups))
            os.setgid(as_user)
            os.setuid(as_user)
        code = func() or 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def reap(pid: int, timeout: float = READY_TIMEOUT) -> int:
    """Wait for child ``pid`` to exit (bounded) and return its exit code (-N for signal N)."""
    pidfd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)
    if not ready:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise AssertionError(f"child {pid} did not exit within {timeout} s; killed it")
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def read_report(fd: int, timeout: float = READY_TIMEOUT) -> str:
    """Everything a child writes to ``fd`` until it closes its end (bounded wait)."""
    chunks: list[bytes] = []
    while True:
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            raise AssertionError(f"no report from the child within {timeout} s")
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks).decode("utf-8", "replace")
        chunks.append(chunk)


def run_in_child(
    func: Callable[[], str], *, as_user: int | None = None, groups: Sequence[int] = ()
) -> str:
    """Run ``func()`` in a child process and return the string it returned.

    If it raised, the report is ``"TypeName: message"`` instead, so tests can assert on a
    child's udskit error the way they would on their own.
    """
    read_end, write_end = os.pipe()

    def child() -> int:
        os.close(read_end)
        try:
            text = func()
        except Exception as exc:
            text = f"{type(exc).__name__}: {exc}"
        os.write(write_end, text.encode("utf-8", "replace"))
        os.close(write_end)
        return 0

    pid = fork(child, as_user=as_user, groups=groups)
    os.close(write_end)
    try:
        report = read_report(read_end)
    finally:
        os.close(read_end)
        code = reap(pid)
    assert code == 0, f"child exited with {code}: {report}"
    return report


class Held:
    """A child process that set something up (a listener, say) and holds it until stopped.

    ``setup()`` runs in the child and returns a string to report (e.g. ``"ready"``) and a
    function to call when told to stop. If ``setup`` raises, ``report`` is the error as
    ``"TypeName: message"`` and the child exits at once.
    """

    def __init__(
        self,
        setup: Callable[[], tuple[str, Callable[[], object]]],
        *,
        as_user: int | None = None,
    ) -> None:
        report_r, report_w = os.pipe()
        stop_r, self._stop_w = os.pipe()

        def child() -> int:
            os.close(report_r)
            os.close(self._stop_w)
            try:
                text, cleanup = setup()
            except Exception as exc:
                os.write(report_w, f"{type(exc).__name__}: {exc}".encode())
                return 0
            os.write(report_w, text.encode())
            os.close(report_w)
            select.select([stop_r], [], [], READY_TIMEOUT * 3)  # EOF: the parent said stop
            cleanup()
            return 0

        self.pid = fork(child, as_user=as_user)
        os.close(report_w)
        os.close(stop_r)
        self._stopped: int | None = None
        try:
            self.report = _read_some(report_r)
        except BaseException:
            self.kill()
            raise
        finally:
            os.close(report_r)

    def stop(self) -> int:
        """Tell the child to clean up and exit; return its exit code (idempotent)."""
        if self._stopped is None:
            os.close(self._stop_w)
            self._stopped = reap(self.pid)
        return self._stopped

    def kill(self) -> int:
        """SIGKILL the child (no cleanup runs); return its exit code."""
        if self._stopped is None:
            os.kill(self.pid, signal.SIGKILL)
            os.close(self._stop_w)
            self._stopped = reap(self.pid)
        return self._stopped

    def __enter__(self) -> Held:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _read_some(fd: int, timeout: float = READY_TIMEOUT) -> str:
    """The first report a child writes to ``fd`` (it writes it in one write)."""
    ready, _, _ = select.select([fd], [], [], timeout)
    if not ready:
        raise AssertionError(f"no report from the child within {timeout} s")
    return os.read(fd, 65536).decode("utf-8", "replace")


def _may_act_as_another_user() -> bool:
    return os.geteuid() == 0 or bool(os.environ.get("CI"))


#: For tests that act as a second uid (setuid in a child) or chown: they need root, which CI
#: has. They skip only outside CI when not root; with CI set they always run.
needs_root = pytest.mark.skipif(
    not _may_act_as_another_user(),
    reason="needs root to act as a second uid (always runs when CI is set)",
)


class Talker:
    """A child that reports as it goes, a line at a time: ``func(say)`` runs in the child,
    and each ``say(text)`` becomes one ``line()`` in the parent."""

    def __init__(
        self,
        func: Callable[[Callable[[str], None]], object],
        *,
        as_user: int | None = None,
        groups: Sequence[int] = (),
    ) -> None:
        read_end, write_end = os.pipe()

        def say(text: str) -> None:
            os.write(write_end, text.replace("\n", " ").encode() + b"\n")

        def child() -> int:
            os.close(read_end)
            try:
                func(say)
            except Exception as exc:
                say(f"{type(exc).__name__}: {exc}")
            return 0

        self.pid = fork(child, as_user=as_user, groups=groups)
        os.close(write_end)
        self._fd = read_end
        self._buffer = b""
        self._code: int | None = None

    def line(self, timeout: float = READY_TIMEOUT) -> str:
        """The child's next line (bounded wait); '' once it has exited without one."""
        while b"\n" not in self._buffer:
            ready, _, _ = select.select([self._fd], [], [], timeout)
            if not ready:
                raise AssertionError(f"child {self.pid} said nothing within {timeout} s")
            chunk = os.read(self._fd, 65536)
            if not chunk:
                return ""
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode("utf-8", "replace")

    def finish(self) -> int:
        """Wait for the child to exit; its exit code (idempotent)."""
        if self._code is None:
            try:
                self._code = reap(self.pid)
            finally:
                os.close(self._fd)
        return self._code

    def __enter__(self) -> Talker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.finish()
