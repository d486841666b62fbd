"""Claiming a socket path with no descriptor left, at each step that needs one: the error
is one line that names the path and says what to raise (not "check the permissions"), and
nothing is left in the directory."""

from __future__ import annotations

import errno
import os
import resource
from pathlib import Path

import pytest

import udskit

pytestmark = pytest.mark.usefixtures("no_fd_leak")


def _fill_all_but(free: int) -> list[int]:
    """Lower the open-file limit to what is open now and fill it, but for ``free``."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    top = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (top + 1, hard))
    fillers: list[int] = []
    while True:  # bounded: by the limit just set
        try:
            fillers.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
        except OSError as exc:
            if exc.errno != errno.EMFILE:
                raise
            break
    for _ in range(free):
        os.close(fillers.pop())
    return fillers


@pytest.mark.parametrize(
    ("kind", "free"),
    [("stream", 1), ("stream", 2), ("stream", 3), ("stream", 4), ("dgram", 2), ("dgram", 3)],
)
def test_out_of_descriptors_while_claiming_says_what_to_raise(
    sockdir: Path, kind: str, free: int
) -> None:
    path = sockdir / "s"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers = _fill_all_but(free)
    try:
        with pytest.raises(udskit.UdsError) as caught:
            udskit.listen(path, type=kind)  # type: ignore[call-overload]
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    message = str(caught.value)
    assert "\n" not in message
    assert str(path) in message
    assert "no descriptor left" in message, message
    assert "ulimit -n" in message
    assert "permission" not in message
    assert os.listdir(sockdir) == []
