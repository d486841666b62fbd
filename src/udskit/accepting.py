"""What an accept loop does about each accept(2) error, for every udskit accept loop.

The blocking :class:`udskit.Server`, the asyncio :class:`udskit.aio.Server`, both
listeners' ``accept()`` (blocking, and asyncio's ``accept_socket()``) and the bridge all act
on this one survey (Linux accept(2), man 2 accept; net/unix/af_unix.c; net/ipv4/tcp.c):

* EINTR: nothing was accepted; retry. PEP 475 already retries a blocking call inside the
  socket module, so it reaches us only from a non-blocking accept.
* EAGAIN (= EWOULDBLOCK): nothing (left) to accept, or another thread or process took the
  connection first; wait for the listener to be readable again.
* ECONNABORTED: the client gave up while queued; accept the next.
* EPROTO: a protocol error on the queued connection; it is lost, accept the next.
* ENETDOWN, ENOPROTOOPT, EHOSTDOWN, ENONET, EHOSTUNREACH, EOPNOTSUPP, ENETUNREACH (with
  EPROTO): on a TCP listener, Linux hands the queued connection's pending network error
  to accept(2), and the man page's "Error handling" says to treat these like EAGAIN and
  retry. The connection is gone; accept the next. (A broken listener says EBADF or
  EINVAL; EOPNOTSUPP otherwise means a socket that cannot accept, a datagram one, which a
  udskit listener never is.)
* EMFILE, first: the process's soft open-file limit is raised to its hard limit, once
  (:func:`raise_open_file_limit`), and accepting goes on at once. A login shell or a
  systemd service starts with a soft limit of 1,024, kept low for old programs that use
  ``select()``, under a hard limit that is usually 524,288 or more: left there, a server
  would hold about a thousand clients and keep the rest waiting. Go programs raise it as
  they start; udskit's servers raise it when they need it, and say so in a warning, and
  its relays (the bridge, the tap) as they start (:func:`relays_that_fit`). udskit never
  uses ``select()``; programs that ``udskit serve --exec`` runs inherit the raised limit.
* EMFILE, ENFILE: out of descriptors (ours, or the system's). The pending connection stays
  queued, so the listener stays readable and an immediate retry would spin at 100% CPU. We
  back off (ACCEPT_BACKOFF doubling to ACCEPT_BACKOFF_MAX) while established connections
  finish and free descriptors; a success starts the pauses over. The first failure of a run
  is logged as a warning that says what to do, the retries at debug level, the recovery
  once: a server out of descriptors for an hour logs two lines, not one a second.
* ENOBUFS, ENOMEM: out of kernel memory; the same back-off.
* anything else (EBADF, EINVAL, ENOTSOCK, ...): a bug or a closed listener; stop accepting
  and report it.

:func:`classify` says which of the three an error is; :class:`Backoff` counts the pauses.
:func:`relays_that_fit` keeps a relay (the bridge, the tap), which needs a second
descriptor for each client it accepts, from accepting clients it has none left for.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import resource
import time
from typing import Final

from .translate import RESOURCE_ADVICE

__all__ = [
    "ACCEPT_BACKOFF",
    "ACCEPT_BACKOFF_MAX",
    "RESOURCE_ERRNOS",
    "RETRY_ERRNOS",
    "AcceptVerdict",
    "Backoff",
    "classify",
    "more_open_files",
    "raise_open_file_limit",
    "relays_that_fit",
]

log = logging.getLogger("udskit")

#: First pause after EMFILE/ENFILE/ENOBUFS/ENOMEM on accept: short, since a descriptor is
#: often freed within milliseconds by a connection ending.
ACCEPT_BACKOFF: Final = 0.01
#: The longest pause: a server out of descriptors for long still looks again every second.
ACCEPT_BACKOFF_MAX: Final = 1.0

#: A TCP connection's pending network errors, which Linux reports from accept(2).
_TCP_PENDING_ERRNOS: Final = frozenset(
    {
        errno.ENETDOWN,
        errno.EPROTO,
        errno.ENOPROTOOPT,
        errno.EHOSTDOWN,
        errno.ENONET,
        errno.EHOSTUNREACH,
        errno.EOPNOTSUPP,
        errno.ENETUNREACH,
    }
)
#: accept(2) errors after which the listener is fine: retry (see the survey above).
RETRY_ERRNOS: Final = (
    frozenset({errno.EINTR, errno.EAGAIN, errno.ECONNABORTED}) | _TCP_PENDING_ERRNOS
)
#: accept(2) errors that mean "out of resources": back off before accepting again.
RESOURCE_ERRNOS: Final = frozenset(RESOURCE_ADVICE)


class AcceptVerdict(enum.Enum):
    """What to do after an accept(2) error."""

    RETRY = "retry"  # accept again (after waiting for readability, for EAGAIN)
    BACK_OFF = "back off"  # pause (see Backoff), then accept again
    FATAL = "fatal"  # stop accepting and report the error

    def __repr__(self) -> str:
        return f"AcceptVerdict.{self.name}"


def classify(exc: OSError) -> AcceptVerdict:
    """What to do about ``exc``, raised by accept(2) (see the module's survey)."""
    if exc.errno in RETRY_ERRNOS:
        return AcceptVerdict.RETRY
    if exc.errno in RESOURCE_ERRNOS:
        return AcceptVerdict.BACK_OFF
    return AcceptVerdict.FATAL


class Backoff:
    """The pauses of one accept loop: ``next()`` gives the pause to take now, each twice
    the one before up to ACCEPT_BACKOFF_MAX; ``reset()`` after an accept that worked."""

    __slots__ = ("_delay", "_failures", "_since")

    def __init__(self) -> None:
        self._delay = ACCEPT_BACKOFF
        self._failures = 0  # in the current run of failures
        self._since = 0.0  # when that run began (time.monotonic())

    @property
    def delay(self) -> float:
        """The pause the next ``next()`` returns."""
        return self._delay

    def next(self) -> float:
        if not self._failures:
            self._since = time.monotonic()
        self._failures += 1
        delay = self._delay
        self._delay = min(delay * 2, ACCEPT_BACKOFF_MAX)
        return delay

    def reset(self) -> None:
        self._delay = ACCEPT_BACKOFF
        self._failures = 0

    def failed(self, exc: OSError, address: object) -> float:
        """Count a BACK_OFF failure of accept(2) on ``address``, log it (the first of a
        run as a warning that says what to do, the others at debug level) and return the
        pause to take; none for an EMFILE that raising the open-file limit cured."""
        if exc.errno == errno.EMFILE and more_open_files(address):
            return 0.0
        first = not self._failures
        pause = self.next()
        reason = os.strerror(exc.errno or 0)
        if first:
            log.warning(
                "%s: accept failed (%s): %s; the clients connected are still served, new "
                "ones wait in the backlog; retrying, first in %.2f s",
                address,
                reason,
                RESOURCE_ADVICE.get(exc.errno or 0, "out of resources"),
                pause,
            )
        else:
            log.debug("%s: accept failed (%s); retrying in %.2f s", address, reason, pause)
        return pause

    def succeeded(self, address: object) -> None:
        """accept(2) worked: the pauses start over; the end of a run of failures is
        logged once."""
        if self._failures:
            log.warning(
                "%s: accepting again, after %d failed tries in %.1f s",
                address,
                self._failures,
                time.monotonic() - self._since,
            )
        self.reset()

    def __repr__(self) -> str:
        return f"<Backoff next={self._delay:g} s>"


#: Descriptors that :func:`relays_that_fit` leaves free for what is not a relay: the event
#: loop's or the threads' own, a client accepted only to be refused, logging, name lookups.
SPARE_FDS: Final = 64


def relays_that_fit(each: int = 2) -> int | None:
    """Connections a relay can hold at once within the open-file limit, once its soft limit
    is raised to the hard one (:func:`raise_open_file_limit`, logged if it was): ``each``
    descriptors each (a stream relay's two: the client, and ours to its server; the
    datagram tap's one, its socket to the server for a sender), less those already open
    and SPARE_FDS; None where there is no limit. Past it, a relay would accept a client and
    then find no descriptor to reach the server with: it must leave the client waiting in
    the backlog instead (the datagram tap: close its least recent sender's socket)."""
    raised = raise_open_file_limit()
    if raised is not None:
        log.info("raised this process's open-file limit from %d to %d, its hard limit", *raised)
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        open_now = len(os.listdir("/proc/self/fd"))
    except OSError:  # no /proc: the three standard streams, at least
        open_now = 3
    return max(1, (soft - open_now - SPARE_FDS) // each)


def more_open_files(where: object) -> bool:
    """Out of descriptors (EMFILE) at ``where``: raise the soft open-file limit to the hard
    one (:func:`raise_open_file_limit`) and say so in a warning; False if it was there
    already, and nothing is said. For accept(2) (:meth:`Backoff.failed`), and for what a
    server opens per client besides (``udskit serve --exec``: two pipes)."""
    raised = raise_open_file_limit()
    if raised is None:
        return False
    log.warning(
        "%s: out of descriptors at %d open files; raised this process's open-file limit to "
        "%d, its hard limit",
        where,
        *raised,
    )
    return True


def raise_open_file_limit() -> tuple[int, int] | None:
    """Raise RLIMIT_NOFILE's soft limit to its hard limit (see the module's survey); the
    limit before and after, or None if it was there already (or cannot be raised)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or (hard != resource.RLIM_INFINITY and soft >= hard):
        return None
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:  # an infinite hard limit: the kernel's nr_open caps it
        log.debug("open-file limit left at %d: %s", soft, exc)
        return None
    return soft, hard
