"""Claiming a socket path with no descriptor left, at each step that needs one: the error
is one line that names the path and says what to raise (not "check the permissions"), and
nothing is left in the directory.

A claim holds its socket file open (O_PATH) until released: a claim that cannot (no
descriptor left just then: another thread took the last one) fails the same way, and
leaves no socket file (nor a client's reply directory) behind. It used to succeed without
the hold, and its release then left the file in place for ever."""

from __future__ import annotations

import errno
import os
import resource
import sys
from pathlib import Path
from typing import Any

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


def _no_descriptor_to_hold(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """From now on os.open() from sockfile's _hold fails with EMFILE (as if another thread
    had just taken the last descriptor); every other open goes through. Returns the list
    of the calls failed (their flags)."""
    real = os.open
    failed: list[int] = []

    def open_(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if sys._getframe(1).f_code.co_name == "_hold":
            failed.append(flags)
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    return failed


@pytest.mark.parametrize("kind", ["stream", "seqpacket", "dgram"])
def test_a_listener_that_cannot_hold_its_file_fails_and_leaves_none(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    path = sockdir / "s"
    failed = _no_descriptor_to_hold(monkeypatch)
    with pytest.raises(udskit.UdsError) as caught:
        udskit.listen(path, type=kind)  # type: ignore[call-overload]
    assert failed, "the hold was not tried"
    message = str(caught.value)
    assert "\n" not in message
    assert str(path) in message
    assert "no descriptor left" in message
    assert "ulimit -n" in message
    assert caught.value.errno == errno.EMFILE  # type: ignore[attr-defined]
    assert sorted(os.listdir(sockdir)) == []


def test_a_datagram_client_that_cannot_hold_its_reply_path_fails_and_leaves_none(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = sockdir / "runtime"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    with udskit.listen(sockdir / "s", type="dgram"):
        real = os.open
        failed = _no_descriptor_to_hold(monkeypatch)
        with pytest.raises(udskit.UdsError) as caught:
            udskit.connect(sockdir / "s", type="dgram")
        monkeypatch.setattr(os, "open", real)
        assert failed, "the hold was not tried"
        message = str(caught.value)
        assert "\n" not in message
        assert "ulimit -n" in message, message
        assert os.listdir(runtime) == []  # neither the reply path nor its directory
        # And with a descriptor to hold it, the same client works and cleans up.
        with udskit.connect(sockdir / "s", type="dgram") as client:
            client.send(b"ping")
        assert os.listdir(runtime) == []
