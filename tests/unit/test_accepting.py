"""``udskit.accepting``: which accept(2) errno gets which verdict, and the back-off's pauses."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from udskit.accepting import (
    ACCEPT_BACKOFF,
    ACCEPT_BACKOFF_MAX,
    SPARE_FDS,
    AcceptVerdict,
    Backoff,
    classify,
)


def _accept_error(code: int) -> OSError:
    # As the socket module raises it: OSError(errno, strerror) picks the builtin subclass
    # (EAGAIN gives BlockingIOError, EINTR InterruptedError, ...).
    return OSError(code, os.strerror(code))


@pytest.mark.parametrize(
    "code", [errno.EINTR, errno.EAGAIN, errno.EWOULDBLOCK, errno.ECONNABORTED, errno.EPROTO]
)
def test_a_lost_or_missing_connection_is_retried(code: int) -> None:
    assert classify(_accept_error(code)) is AcceptVerdict.RETRY


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM])
def test_running_out_of_resources_backs_off(code: int) -> None:
    assert classify(_accept_error(code)) is AcceptVerdict.BACK_OFF


@pytest.mark.parametrize(
    "code",
    [
        errno.ENETDOWN,
        errno.EPROTO,
        errno.ENOPROTOOPT,
        errno.EHOSTDOWN,
        errno.ENONET,
        errno.EHOSTUNREACH,
        errno.EOPNOTSUPP,
        errno.ENETUNREACH,
    ],
)
def test_a_tcp_connections_pending_network_error_is_retried(code: int) -> None:
    # man 2 accept, "Error handling": treat them like EAGAIN.
    assert classify(_accept_error(code)) is AcceptVerdict.RETRY


@pytest.mark.parametrize("code", [errno.EBADF, errno.EINVAL, errno.ENOTSOCK, errno.EFAULT])
def test_a_broken_listener_is_fatal(code: int) -> None:
    assert classify(_accept_error(code)) is AcceptVerdict.FATAL


def test_an_error_without_errno_is_fatal() -> None:
    assert classify(OSError("no errno")) is AcceptVerdict.FATAL


def test_the_builtin_subclasses_are_classified_by_their_errno() -> None:
    assert classify(BlockingIOError(errno.EAGAIN, "again")) is AcceptVerdict.RETRY
    assert classify(InterruptedError(errno.EINTR, "interrupted")) is AcceptVerdict.RETRY
    assert classify(ConnectionAbortedError(errno.ECONNABORTED, "gone")) is AcceptVerdict.RETRY


def test_back_off_doubles_up_to_the_cap() -> None:
    backoff = Backoff()
    pauses = [backoff.next() for _ in range(10)]
    assert pauses[0] == ACCEPT_BACKOFF
    assert pauses[1] == 2 * ACCEPT_BACKOFF
    assert pauses[2] == 4 * ACCEPT_BACKOFF
    assert max(pauses) == ACCEPT_BACKOFF_MAX
    assert pauses[-3:] == [ACCEPT_BACKOFF_MAX] * 3  # stays at the cap
    assert pauses == sorted(pauses)


def test_the_pauses_are_the_documented_ones() -> None:
    backoff = Backoff()
    assert [backoff.next() for _ in range(9)] == [
        0.01,
        0.02,
        0.04,
        0.08,
        0.16,
        0.32,
        0.64,
        1.0,
        1.0,
    ]


def test_reset_starts_the_pauses_over() -> None:
    backoff = Backoff()
    for _ in range(5):
        backoff.next()
    assert backoff.delay > ACCEPT_BACKOFF
    backoff.reset()
    assert backoff.delay == ACCEPT_BACKOFF
    assert backoff.next() == ACCEPT_BACKOFF


def test_each_loop_has_its_own_back_off() -> None:
    first, second = Backoff(), Backoff()
    first.next()
    first.next()
    assert second.next() == ACCEPT_BACKOFF


def test_verdicts_and_back_off_read_well() -> None:
    assert repr(AcceptVerdict.BACK_OFF) == "AcceptVerdict.BACK_OFF"
    assert repr(Backoff()) == "<Backoff next=0.01 s>"


_FIT = """
import os, resource
from udskit.accepting import relays_that_fit
resource.setrlimit(resource.RLIMIT_NOFILE, (300, 400))
first = relays_that_fit()
limits = resource.getrlimit(resource.RLIMIT_NOFILE)
held = [os.open("/dev/null", os.O_RDONLY) for _ in range(40)]
print(first, relays_that_fit(), *limits, len(os.listdir("/proc/self/fd")))
"""


def test_relays_that_fit_raise_the_limit_and_take_two_descriptors_each() -> None:
    # In a process of its own: its limits and open files are the test's to set.
    done = subprocess.run(
        [sys.executable, "-c", _FIT], capture_output=True, text=True, timeout=30, check=True
    )
    first, fewer, soft, hard, open_now = map(int, done.stdout.split())
    assert (soft, hard) == (400, 400)  # the soft limit raised to the hard one first
    assert first - fewer == 40 // 2  # 40 more descriptors open: 20 relays fewer
    assert 0 < 2 * fewer + open_now + SPARE_FDS <= 400
    assert 2 * (fewer + 1) + open_now + SPARE_FDS > 400 - 2  # and no fewer than fit
