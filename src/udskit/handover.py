"""Listener handover: a new process takes a live listener over from the process serving it.

A server that restarts the plain way (close, then a new process binds) leaves a window in
which clients find no socket (ENOENT) or a dead one (ECONNREFUSED). Here the listening
socket itself moves: the serving process passes its descriptor to its successor with
SCM_RIGHTS, so the socket, its file (inode, mode, owner) and the clients queued in its
backlog never go away; both processes hold it for a moment, then only the new one.

The two talk over a private control socket next to the socket file, ``DIR/.NAME`` +
CONTROL_SUFFIX: a seqpacket socket of mode 0600, claimed like any udskit socket file (so a
stale one is replaced and a live one never), served by a thread of the serving process while
it offers handover. Only its own user and root can connect (file permissions), and the
serving process checks each caller's SO_PEERCRED too: another uid is refused and logged. The
conversation is in :mod:`udskit.proto.handover`.

The successor:

1. connects to the control socket; nobody there (no file, or a stale one) means no server
   offers handover, and it claims the path fresh, as ``listen()`` always does;
2. asks for the listener, checks what it gets (a listening AF_UNIX socket of its type);
3. sets up its server, then says ``ready``; the serving process answers ``stopped`` with its
   listening control socket, and gives up both files; only then does the successor own them
   (:func:`udskit.sockfile.adopt`) and answer on the control socket in turn. The control
   socket moving too means that its name never goes missing: a request made at any moment
   waits in its backlog for whichever process serves it.

A successor that crashes, hangs (READY_TIMEOUT) or sends garbage before ``ready`` leaves the
serving process serving as before, and owning the file. A serving process that dies after
passing the listener leaves the successor with the only descriptor: the successor notices
(a pidfd of the serving process) and serves on. One handover at a time: a second
successor is told who is taking over.

:class:`Upgrader` is the whole of it for one listening socket, for a framework's own server
loop; ``listen(..., handover=True)`` and the servers build on it.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import socket
import stat
import threading
import time
from collections.abc import Callable, Sequence
from typing import Final

from .accepting import AcceptVerdict, Backoff, classify
from .address import Address, AddressLike
from .ancillary import RECV_FLAGS, ControlDataError, ancillary_size, close_fds, rights, unpack
from .creds import peer_cred
from .errors import AddressError, AddressInUse, HandoverError, ProtocolError, UdsError
from .options import (
    DEFAULT_BACKLOG,
    ListenOptions,
    base_type,
    check_seconds,
    listen_options,
    type_name,
)
from .proto.handover import MAX_MESSAGE, VERSION, Message, decode, encode
from .sockfile import Claim, adopt, claim, is_bound_at
from .translate import translate
from .wakeup import WakeUp

__all__ = [
    "CONTROL_SUFFIX",
    "READY_TIMEOUT",
    "UPGRADE_TIMEOUT",
    "Upgrader",
    "control_address",
    "request_upgrade",
]

log = logging.getLogger("udskit")

#: What the control socket's name adds to the socket file's: ``DIR/.NAME.udskit-handover``.
#: Hidden, next to the file (so the same directory permissions guard it), and recognisable
#: so that ``udskit ls`` shows it as part of the server it belongs to.
CONTROL_SUFFIX: Final = b".udskit-handover"

#: How long a successor has, from receiving the listener, to say it is ready; also how long
#: each side waits for the other's answer. A successor that takes longer is taken for hung:
#: the serving process drops it and goes on serving.
READY_TIMEOUT: Final = 30.0

#: How long a started successor has to take over (``upgrade()``): its start, and then its
#: own READY_TIMEOUT.
UPGRADE_TIMEOUT: Final = 2 * READY_TIMEOUT

#: How long a broken conversation waits for the other process's pidfd to say it exited. The
#: kernel closes a dying process's descriptors (our peer sees the conversation end) before
#: it reports the exit on its pidfd; in between lie microseconds, or a few milliseconds on a
#: loaded machine. A process alive after this long closed the conversation on purpose.
EXIT_GRACE: Final = 1.0

#: How long the serving process waits for the first message of a process that connected to
#: its control socket: a successor asks at once, so a silent one is not a successor.
HELLO_TIMEOUT: Final = 5.0

#: Conversations open at once on the control socket. One handover runs at a time; a few more
#: are told so. More callers than this are one user's runaway script: they are closed.
MAX_CONVERSATIONS: Final = 8

#: How long close() waits for the control thread to end (it wakes at once; this bounds a
#: thread stuck in a callback).
_JOIN_TIMEOUT: Final = 5.0

_SEQPACKET: Final = socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC

#: How a fresh listener is bound: :func:`udskit.listening.bind_listener`.
Bind = Callable[[ListenOptions], "tuple[socket.socket, Claim | None]"]


def control_address(address: Address) -> Address:
    """The control socket of the listener at ``address`` (a socket path)."""
    if address.kind != "path":
        raise AddressError(
            f"handover needs a socket path, not {address}: its control socket is a file "
            "next to the socket file"
        )
    directory, name = os.path.split(address.absolute().raw)
    return Address("path", os.path.join(directory, b"." + name + CONTROL_SUFFIX))


class Upgrader:
    """A listening socket at a path that survives restarts of the program serving it.

    Created, it takes the listener over from the process serving ``address`` if that process
    offers handover, and otherwise claims the path fresh (as :func:`udskit.listen` does, with
    ``mode``/``owner``/``group``; a listener taken over keeps its file's mode and owner).
    Then, from the program's own server loop::

        upgrader = Upgrader("/run/app.sock")
        server = make_server(upgrader.socket)   # anything that accepts on a socket
        upgrader.ready()        # the previous process stops accepting; we offer handover
        upgrader.wait()         # returns once a successor has taken over
        server.stop_accepting_and_finish()      # then exit
        upgrader.close()

    A listener taken over is one open socket shared with the previous process until that
    one stops, its flags too: udskit's servers make it non-blocking (O_NONBLOCK), whatever
    ``socket.getblocking()`` says in this process. Wait with poll()/select() and accept
    without blocking, ready for BlockingIOError: while both processes hold the socket, either
    may take a client the other was woken for. (udskit's listeners and servers do this.)

    ``previous_pid`` is the pid of the process it took over from (None: started fresh);
    ``successor_pid`` the one that took over from it. ``on_handed_over(callback)`` runs
    ``callback()`` in the control thread once a successor has taken over. ``command``: the
    argv that starts a successor, for ``upgrade()`` and ``udskit upgrade PATH``.

    Thread-safe: ``ready``, ``wait``, ``upgrade`` and ``close`` may be called from any thread;
    ``upgrade`` also from a signal handler.
    """

    def __init__(
        self,
        address: AddressLike,
        *,
        type: str = "stream",  # noqa: A002 - the natural name for the socket type
        mode: int = 0o600,
        owner: int | str | None = None,
        group: int | str | None = None,
        backlog: int = DEFAULT_BACKLOG,
        ready_timeout: float = READY_TIMEOUT,
        command: Sequence[str] | None = None,
    ) -> None:
        from .listening import bind_listener  # listening builds on this module

        opts = listen_options(
            address,
            type=type,
            backlog=backlog,
            mode=mode,
            owner=owner,
            group=group,
            allow=None,
            framing="length",
            max_frame=None,
            max_fds=0,
            sndbuf=None,
            rcvbuf=None,
        )
        self._start(opts, bind_listener, ready_timeout, command)

    @classmethod
    def for_listen(
        cls,
        opts: ListenOptions,
        bind: Bind,
    ) -> Upgrader:
        """The Upgrader of ``listen(..., handover=True)``."""
        upgrader = cls.__new__(cls)
        upgrader._start(opts, bind, READY_TIMEOUT, None)
        return upgrader

    def _start(
        self,
        opts: ListenOptions,
        bind: Bind,
        ready_timeout: float,
        command: Sequence[str] | None,
    ) -> None:
        if command is not None and (
            isinstance(command, (str, bytes))
            or not command
            or not all(isinstance(part, str) for part in command)
        ):
            raise ValueError(f"command must be a non-empty list of str (an argv), not {command!r}")
        self.address = opts.target
        self._control = control_address(opts.target)
        self._kind = opts.kind
        self._ready_timeout = check_seconds("ready_timeout", ready_timeout)
        #: The argv that starts a successor (``upgrade()``, ``udskit upgrade``); settable at
        #: any time.
        self.command = list(command) if command is not None else None
        self._lock = threading.Lock()
        self._owner_pid = os.getpid()
        self._is_ready = False
        self._released = threading.Event()  # release() has run
        self._claim: Claim | None = None
        self._offer: _Offer | None = None
        self._callbacks: list[Callable[[], object]] = []
        self._handed_over = threading.Event()
        self.previous_pid: int | None = None
        self.successor_pid: int | None = None
        self._previous: _Predecessor | None = None
        died_at = None
        try:
            taken = _take(self._control, opts.target, opts.kind, self._ready_timeout)
        except _Gone:
            taken, died_at = None, time.monotonic()
        if taken is not None:
            self.socket, self._previous = taken
            self.previous_pid = self._previous.pid
            return
        try:
            self.socket, self._claim = _bind_fresh(opts, bind, died_at)
        except AddressInUse as exc:
            # Not the claim's own advice ("stop it first, or choose another path"): the
            # caller asked to take over, and what it needs to know is why it could not.
            owner = "" if exc.pid is None else f" (pid {exc.pid}, uid {exc.uid})"
            raise AddressInUse(
                f"cannot take over {opts.target}: the live server there{owner} offers no "
                "handover (started without it, handing over right now, or unable to make "
                "its handover socket: see its log); retry, or stop it first",
                pid=exc.pid,
                uid=exc.uid,
            ) from None

    # -- the successor's side ---------------------------------------------------------------
    def ready(self) -> None:
        """Say the program is ready to serve: the previous process (if any) stops accepting
        and gives the socket file up to this one; then offer handover to the next.

        Raises HandoverError if the previous process refused or gave up waiting: it goes on
        serving, and this process must not (close the Upgrader and exit).
        """
        with self._lock:
            if self._is_ready or self._released.is_set():
                return
            self._is_ready = True
            previous, self._previous = self._previous, None
        control: socket.socket | None = None
        if previous is not None:
            try:
                claimed, control = previous.finish(self.socket, self.address, self._ready_timeout)
            finally:
                previous.close()
            with self._lock:
                late = self._released.is_set()  # release() ran meanwhile, in another thread
                if not late:
                    self._claim = claimed
            if late:
                if claimed is not None:
                    claimed.release()
                if control is not None:
                    control.close()
                return
        try:
            offer = _Offer(self, self._control, self._kind, self._ready_timeout, control)
        except UdsError as exc:
            log.warning(
                "%s: cannot offer handover (%s); the server runs, but cannot be handed over",
                self.address,
                exc,
            )
            return
        with self._lock:
            released = self._released.is_set()  # release() may have run meanwhile
            if not released:
                self._offer = offer
        if released:
            offer.close()
        else:
            offer.start()

    # -- the serving side -------------------------------------------------------------------
    @property
    def handed_over(self) -> bool:
        """True once a successor has taken over (it owns the socket file now)."""
        return self._handed_over.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until a successor has taken over; False if ``timeout`` passed first."""
        return self._handed_over.wait(timeout)

    def on_handed_over(self, callback: Callable[[], object]) -> None:
        """Call ``callback()`` (in the control thread) once a successor has taken over; at
        once if one already has."""
        with self._lock:
            if not self._handed_over.is_set():
                self._callbacks.append(callback)
                return
        callback()

    def upgrade(self) -> None:
        """Start ``command`` as a successor, which takes over; safe from a signal handler.

        Logs the outcome. Without ``command``, or before ``ready()``, logs why not."""
        offer = self._offer
        if offer is None or self.command is None:
            log.warning(
                "%s: cannot upgrade: %s",
                self.address,
                "no command to start a successor with"
                if self.command is None
                else "not offering handover yet",
            )
            return
        offer.request_upgrade()

    def _give_up(self, successor: int) -> None:
        """A successor has been told it owns the socket file now: give it up."""
        with self._lock:
            if self._claim is not None:
                self._claim.disown()
            self.successor_pid = successor
            self._handed_over.set()
            callbacks, self._callbacks = self._callbacks, []
        log.info("%s: handed over to pid %d", self.address, successor)
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("%s: a handover callback failed", self.address)

    # -- the end ----------------------------------------------------------------------------
    def release(self) -> None:
        """Stop offering handover, and remove the socket file if it is still ours (not handed
        over). The socket stays open: ``close()`` closes it."""
        with self._lock:
            if self._released.is_set():
                return
            self._released.set()
            offer, self._offer = self._offer, None
        if offer is not None:
            offer.close()  # after a handover under way now: the file is the successor's
        with self._lock:
            bound, self._claim = self._claim, None
            previous, self._previous = self._previous, None
        if previous is not None:
            previous.close()
        if bound is not None and os.getpid() == self._owner_pid:
            bound.release()  # a no-op once disowned

    def disown(self) -> None:
        """Give up the socket file without removing it (another process keeps the socket, as
        systemd's descriptor store does), and stop offering handover."""
        with self._lock:
            if self._claim is not None:
                self._claim.disown()
        self.release()

    def close(self) -> None:
        """``release()``, then close this process's copy of the socket (never shutdown():
        the socket may live on in a successor)."""
        self.release()
        self.socket.close()

    def __enter__(self) -> Upgrader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = (
            f"handed over to pid {self.successor_pid}"
            if self.handed_over
            else f"taken from pid {self.previous_pid}"
            if self.previous_pid
            else "fresh"
        )
        return f"<Upgrader {type_name(self._kind)} {self.address} {state}>"


def request_upgrade(address: AddressLike, *, timeout: float = UPGRADE_TIMEOUT) -> tuple[int, int]:
    """Ask the udskit server at ``address`` to start its successor (its ``command``), and
    wait until that has taken over; return (the old pid, the new pid).

    HandoverError says why not: no server offers handover there, it has no command, the
    new process failed (the old one goes on serving)."""
    target = Address.parse(address)
    control = control_address(target)
    wait = check_seconds("timeout", timeout)
    conv = _connect(control, target, "upgrade")
    if conv is None:
        raise HandoverError(
            f"cannot upgrade {target}: no udskit server offers handover there (start it with "
            "handover, or restart it by hand)"
        )
    with conv:
        _send(conv, Message("upgrade"))
        try:
            answer = _receive(conv, ("upgraded", "error"), wait)
        except ProtocolError as exc:
            raise HandoverError(f"cannot upgrade {target}: {_reason(exc)}") from None
        if answer.op == "error":
            raise HandoverError(f"cannot upgrade {target}: {answer.reason}")
        return answer.old, answer.pid


def _connect(control: Address, target: Address, doing: str) -> socket.socket | None:
    """A conversation with the process serving the control socket, if it is this user or
    root; None if nobody serves it (no file, or a stale one)."""
    held = _control_file(control)
    if held is None:
        return None
    conv = socket.socket(socket.AF_UNIX, _SEQPACKET)
    try:
        try:
            # Through the descriptor of the very file we looked at: a name swapped meanwhile
            # (a symlink to another server's control socket) is never followed.
            conv.connect(f"/proc/self/fd/{held}")
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
                conv.close()
                return None
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise HandoverError(
                    f"cannot {doing} {target}: its handover socket {control} refuses this "
                    "user; run as the user that serves it, or as root",
                    errno=exc.errno,
                ) from None
            raise translate(exc, "connect", control) from None
        _check_owner(conv, control, target, doing)
    except BaseException:
        conv.close()
        raise
    finally:
        os.close(held)
    return conv


def _control_file(control: Address) -> int | None:
    """An O_PATH descriptor of the control socket file, if there is one that this user (or
    root) made: a symlink, or another user's file, planted at the name is not a server's
    control socket (in a directory others may write, anyone can put one there)."""
    directory, name = os.path.split(control.raw)
    try:
        dir_fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None  # no such directory: no socket file either (the claim will say so)
    try:
        held = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    finally:
        os.close(dir_fd)
    found = os.fstat(held)
    if not stat.S_ISSOCK(found.st_mode) or found.st_uid not in (os.geteuid(), 0):
        if stat.S_ISLNK(found.st_mode) or stat.S_ISSOCK(found.st_mode):
            log.warning(
                "%s is not a handover socket of this user (%s); ignoring it",
                control,
                "a symlink" if stat.S_ISLNK(found.st_mode) else f"owned by uid {found.st_uid}",
            )
        os.close(held)
        return None
    return held


def _check_owner(conv: socket.socket, control: Address, target: Address, doing: str) -> None:
    """Nobody else's listener is taken, nor anybody else asked to start a process, whatever
    the control socket's place. (SO_PEERCRED names the process that created it, which may
    have handed it over since: its uid is what counts.)"""
    owner = peer_cred(conv)
    if owner.uid not in (os.geteuid(), 0):
        raise HandoverError(
            f"cannot {doing} {target}: its handover socket {control} is served by uid "
            f"{owner.uid}, not this user or root; refusing a listener from another user"
        )


# -- the successor's half of the conversation ----------------------------------------------


class _Predecessor:
    """The conversation with the process we took the listener from, until it stops."""

    __slots__ = ("conv", "pid", "pidfd")

    def __init__(self, conv: socket.socket, pid: int, pidfd: int) -> None:
        self.conv = conv
        self.pid = pid
        self.pidfd = pidfd

    def finish(
        self, sock: socket.socket, address: Address, timeout: float
    ) -> tuple[Claim | None, socket.socket | None]:
        """Say ready; once the predecessor has stopped (or died), own the socket file.
        Returns its claim, and the predecessor's control socket (None if it died)."""
        try:
            try:
                _send(self.conv, Message("ready"))
            except OSError:
                pass  # it hung up; what it said before it did is still there to read
            answer, fds = _receive_with_fds(self.conv, ("stopped", "error"), timeout)
        except (ProtocolError, OSError) as exc:
            if not _exited(self.pidfd, exc):
                raise HandoverError(
                    f"cannot take over {address}: pid {self.pid} did not confirm "
                    f"({_reason(exc)}); it goes on serving"
                ) from None
            log.info("%s: pid %d exited during the handover; serving on", address, self.pid)
            return _own(sock, address), None
        if answer.op == "error":
            raise HandoverError(f"cannot take over {address}: {answer.reason}")
        log.info("%s: took over from pid %d", address, self.pid)
        return _own(sock, address), _control_socket(fds[0])

    def close(self) -> None:
        self.conv.close()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def _take(
    control: Address, target: Address, kind: int, timeout: float
) -> tuple[socket.socket, _Predecessor] | None:
    """The listener from the process that serves ``target``, or None if none offers it."""
    conv = _connect(control, target, "take over")
    if conv is None:
        return None
    pidfd = -1
    try:
        conv.settimeout(timeout)
        try:
            _send(conv, Message("take", type=type_name(kind), version=VERSION))
        except OSError:
            pass  # it refused us at once and hung up: its answer is still there to read
        try:
            answer, fds = _receive_with_fds(conv, ("listener", "error"), timeout)
        except _Closed:
            raise _Gone from None  # it died before passing the listener: start fresh
        except ProtocolError as exc:
            raise HandoverError(f"cannot take over {target}: {_reason(exc)}") from None
        sock = _listening_socket(answer, fds, kind, target)
        # Its pid from what it says: SO_PEERCRED names the process that created the control
        # socket, which may have handed it over since. (Same uid or root: trusted.)
        try:
            pidfd = os.pidfd_open(answer.pid)
        except OSError:
            pidfd = -1  # gone already: we hold the only listener
        except BaseException:
            sock.close()
            raise
        return sock, _Predecessor(conv, answer.pid, pidfd)
    except BaseException:
        if pidfd >= 0:
            os.close(pidfd)
        conv.close()
        raise


class _Gone(Exception):
    """The serving process died before it passed the listener."""


def _bind_fresh(
    opts: ListenOptions, bind: Bind, died_at: float | None
) -> tuple[socket.socket, Claim | None]:
    """Claim the path. After a serving process died mid-conversation (``died_at``), its
    listener may outlive the conversation by a moment (a dying process's descriptors close
    one by one): a live socket at the path is looked at again until EXIT_GRACE has passed."""
    while True:
        try:
            return bind(opts)
        except AddressInUse:
            if died_at is None or time.monotonic() - died_at > EXIT_GRACE:
                raise
        time.sleep(0.005)  # bounded by EXIT_GRACE: the kernel finishing an exit


def _own(sock: socket.socket, address: Address) -> Claim | None:
    """The socket file, now that the previous process has let it go (or died). Past that
    point we serve whatever happens: nobody else does. A file that is no longer this
    socket's (another user swapped it meanwhile) is not ours to remove at exit, and is
    left alone."""
    try:
        return adopt(sock, address)
    except UdsError as exc:
        log.warning("%s: serving on without owning the socket file: %s", address, exc)
        return None


def _control_socket(fd: int) -> socket.socket | None:
    """The predecessor's control socket, if it is one (else it is closed, and we make ours)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        os.close(fd)
        return None
    if (
        sock.family != socket.AF_UNIX
        or base_type(sock) != socket.SOCK_SEQPACKET
        or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    ):
        sock.close()
        return None
    return sock


def _control_listener(
    control: Address, inherited: socket.socket | None
) -> tuple[socket.socket, Claim]:
    """The control socket to serve, and the claim on its file."""
    if inherited is not None:
        try:
            owned = adopt(inherited, control)
        except UdsError as exc:
            log.info("%s: making a new one (%s)", control, exc)
            inherited.close()
        else:
            inherited.setblocking(False)
            return inherited, owned
    sock = socket.socket(socket.AF_UNIX, _SEQPACKET)
    try:
        owned = claim(sock, control, mode=0o600, backlog=MAX_CONVERSATIONS)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock, owned


def _listening_socket(answer: Message, fds: list[int], kind: int, target: Address) -> socket.socket:
    """The descriptor received, if it is what we asked for; else close it and say why."""
    if answer.op == "error":
        raise HandoverError(f"cannot take over {target}: {answer.reason}")
    fd = fds[0]
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        os.close(fd)
        raise HandoverError(
            f"cannot take over {target}: the serving process passed a descriptor that is not "
            "a socket"
        ) from None
    problem = ""
    if sock.family != socket.AF_UNIX:
        problem = "not a Unix socket"
    elif base_type(sock) != kind:
        problem = f"a {type_name(base_type(sock))} socket, not {type_name(kind)}"
    elif kind != socket.SOCK_DGRAM and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        problem = "not listening"
    elif not is_bound_at(sock, target):
        # Whatever served that control socket is not the server of this path. Nothing was
        # said to be ready: that process goes on serving.
        problem = "not the socket at that path (a stray handover socket next to it?)"
    if problem:
        sock.close()
        raise HandoverError(
            f"cannot take over {target}: the serving process passed a socket that is {problem}"
        )
    return sock


# -- the serving process's half ------------------------------------------------------------


class _Conversation:
    __slots__ = ("deadline", "pid", "sock", "uid")

    def __init__(self, sock: socket.socket, pid: int, uid: int, deadline: float) -> None:
        self.sock = sock
        self.pid = pid
        self.uid = uid
        self.deadline = deadline


class _Upgrade:
    """A successor this process started (``upgrade``), and who asked for it. Once it has
    taken over it lives on as our child, without a Popen object to warn that it still runs
    when we exit; one that fails is reaped here."""

    __slots__ = ("asker", "deadline", "pid", "pidfd")

    def __init__(self, pid: int, asker: _Conversation | None, deadline: float) -> None:
        self.pid = pid
        self.asker = asker
        self.deadline = deadline
        self.pidfd = os.pidfd_open(pid)

    def end(self, kill: bool) -> str:
        """Reap it (killing it first if ``kill``); how it ended, for messages."""
        try:
            if kill:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            _, status = os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            return "ended (reaped elsewhere)"  # SIGCHLD ignored by the program, say
        if os.WIFSIGNALED(status):
            return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
        return f"exited with status {os.waitstatus_to_exitcode(status)}"


class _Offer:
    """The control socket and the thread that answers on it while we serve."""

    def __init__(
        self,
        upgrader: Upgrader,
        control: Address,
        kind: int,
        timeout: float,
        inherited: socket.socket | None = None,
    ) -> None:
        """Serve the control socket at ``control``: the one ``inherited`` from the previous
        process (whose file is adopted, or, if that fails, replaced), else a fresh one."""
        self._upgrader = upgrader
        self._control = control
        self._kind = kind
        self._timeout = timeout
        self._sock, self._claim = _control_listener(control, inherited)
        self._wakeup = WakeUp()
        self._closing = False
        self._upgrade_asked = False
        self._pending: list[_Conversation] = []
        self._successor: _Conversation | None = None
        self._upgrade: _Upgrade | None = None
        # Out of descriptors, a request stays queued and the control socket readable: it is
        # not watched until _accept_at (see udskit.accepting), or the thread would spin.
        self._backoff = Backoff()
        self._accept_at: float | None = None
        self._thread = threading.Thread(target=self._run, name="udskit-handover", daemon=True)

    @property
    def _where(self) -> Address:
        return self._upgrader.address

    def start(self) -> None:
        self._thread.start()

    def request_upgrade(self) -> None:
        self._upgrade_asked = True
        self._wakeup.wake()

    def close(self) -> None:
        self._closing = True
        self._wakeup.wake()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(_JOIN_TIMEOUT)
        elif not self._thread.is_alive() and self._thread.ident is None:
            self._end("the server is shutting down")

    # -- the thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._closing:
                self._step()
        except Exception:
            log.exception("%s: the handover thread failed; handover is off", self._where)
        finally:
            handed = self._upgrader.successor_pid
            self._end(
                f"handed over to pid {handed}; try again"
                if handed
                else "the server is shutting down"
            )

    def _step(self) -> None:
        conversations = self._conversations()
        poller = select.poll()
        poller.register(self._wakeup.fd, select.POLLIN)
        if self._accept_at is not None and time.monotonic() >= self._accept_at:
            self._accept_at = None  # the back-off is over: look again
        if self._accept_at is None:
            poller.register(self._sock, select.POLLIN)
        for conv in conversations:
            poller.register(conv.sock, select.POLLIN)
        if self._upgrade is not None:
            poller.register(self._upgrade.pidfd, select.POLLIN)
        deadlines = [conv.deadline for conv in conversations]
        if self._upgrade is not None:
            deadlines.append(self._upgrade.deadline)
        if self._accept_at is not None:
            deadlines.append(self._accept_at)
        wait = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
        ready = {fd for fd, _ in poller.poll(None if wait is None else wait * 1000 + 1)}
        if self._wakeup.fd in ready:
            self._wakeup.drain()
        if self._closing:
            return
        if self._upgrade_asked:
            self._upgrade_asked = False
            self._start_upgrade(None)
        if self._sock.fileno() in ready:
            self._accept()
        for conv in conversations:
            if conv.sock.fileno() in ready:
                self._on_message(conv)
            elif time.monotonic() >= conv.deadline:
                self._timed_out(conv)
            if self._upgrader.handed_over:
                self._closing = True
                return
        if self._upgrade is not None:
            self._check_upgrade(self._upgrade.pidfd in ready)

    def _conversations(self) -> list[_Conversation]:
        found = list(self._pending)
        if self._successor is not None:
            found.append(self._successor)
        return found

    def _accept(self) -> None:
        for _ in range(MAX_CONVERSATIONS):
            try:
                sock, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                verdict = classify(exc)
                if verdict is AcceptVerdict.RETRY:
                    continue  # that asker gave up while queued
                if verdict is AcceptVerdict.BACK_OFF:
                    pause = self._backoff.failed(exc, f"{self._where} (handover socket)")
                    self._accept_at = time.monotonic() + pause
                    return
                log.warning("%s: handover socket: accept failed: %s", self._where, exc)
                return
            self._backoff.succeeded(f"{self._where} (handover socket)")
            sock.settimeout(self._timeout)
            cred = peer_cred(sock)
            if cred.uid not in (os.geteuid(), 0):
                log.warning(
                    "%s: refused a handover to pid %d, uid %d: only this user or root may take "
                    "over",
                    self._where,
                    cred.pid,
                    cred.uid,
                )
                self._refuse(
                    sock, f"uid {cred.uid} may not take over; only uid {os.geteuid()} or root"
                )
                continue
            if len(self._conversations()) >= MAX_CONVERSATIONS:
                self._refuse(sock, "too many handover requests at once; try again")
                continue
            conv = _Conversation(sock, cred.pid, cred.uid, time.monotonic() + HELLO_TIMEOUT)
            self._pending.append(conv)

    def _on_message(self, conv: _Conversation) -> None:
        is_successor = conv is self._successor
        expected = ("ready",) if is_successor else ("take", "upgrade")
        try:
            message, fds = _receive_with_fds(conv.sock, expected, 0)
        except (ProtocolError, OSError) as exc:
            if is_successor:
                log.warning(
                    "%s: the handover to pid %d failed (%s); still serving",
                    self._where,
                    conv.pid,
                    _reason(exc),
                )
            elif not isinstance(exc, _Closed):
                log.warning(
                    "%s: bad handover request from pid %d: %s", self._where, conv.pid, _reason(exc)
                )
            self._drop(conv, None if is_successor or isinstance(exc, _Closed) else _reason(exc))
            return
        del fds  # decode() let through descriptors only with a listener, which we never get
        if message.op == "ready":
            self._hand_over(conv)
        elif message.op == "take":
            self._on_take(conv, message)
        else:
            self._pending.remove(conv)
            self._start_upgrade(conv)

    def _on_take(self, conv: _Conversation, message: Message) -> None:
        ours = type_name(self._kind)
        reason = ""
        if self._successor is not None:
            reason = (
                f"pid {self._successor.pid} is taking over {self._where} now; try again when "
                "it is done"
            )
        elif self._upgrade is not None and not _descends_from(conv.pid, self._upgrade.pid):
            # The process we started takes over, not whoever comes first meanwhile (it would
            # then take over from that one, a second handover nobody asked for).
            reason = (
                f"an upgrade of {self._where} (pid {self._upgrade.pid}) is under way; try "
                "again when it is done"
            )
        elif message.version != VERSION:
            reason = f"handover protocol version {message.version} (this server speaks {VERSION})"
        elif message.type != ours:
            reason = f"{self._where} serves type={ours}, not type={message.type}"
        if reason:
            self._drop(conv, reason)
            return
        self._pending.remove(conv)
        listener = self._upgrader.socket
        try:
            _send(conv.sock, Message("listener", type=ours, pid=os.getpid()), (listener.fileno(),))
        except OSError as exc:
            log.warning("%s: handover to pid %d failed: %s", self._where, conv.pid, _reason(exc))
            conv.sock.close()
            return
        conv.deadline = time.monotonic() + self._timeout
        self._successor = conv
        log.info("%s: handing the listener to pid %d", self._where, conv.pid)

    def _hand_over(self, conv: _Conversation) -> None:
        self._successor = None
        if self._upgrader._released.is_set():
            self._drop(conv, "the server is shutting down")
            return
        try:
            # With the control socket: requests queued in its backlog, and those made from
            # now on, wait there for the successor (never ENOENT or ECONNREFUSED).
            _send(conv.sock, Message("stopped", pid=os.getpid()), (self._sock.fileno(),))
        except OSError as exc:
            log.warning(
                "%s: pid %d left as it said it was ready (%s); still serving",
                self._where,
                conv.pid,
                _reason(exc),
            )
            conv.sock.close()
            return
        conv.sock.close()
        self._claim.disown()
        self._sock.close()  # our copy only: the successor accepts on it now
        self._upgrader._give_up(conv.pid)
        upgrade = self._upgrade
        if upgrade is not None:
            self._upgrade = None
            self._answer_upgrade(upgrade, Message("upgraded", pid=conv.pid, old=os.getpid()))
            os.close(upgrade.pidfd)

    def _timed_out(self, conv: _Conversation) -> None:
        if conv is self._successor:
            log.warning(
                "%s: pid %d did not say it was ready within %g s; still serving",
                self._where,
                conv.pid,
                self._timeout,
            )
            self._drop(conv, f"not ready within {self._timeout:g} s; the server goes on serving")
        else:
            self._drop(conv, f"no request within {HELLO_TIMEOUT:g} s")

    # -- upgrades: a successor this process starts ---------------------------------------
    def _start_upgrade(self, asker: _Conversation | None) -> None:
        reason = ""
        if self._upgrader.command is None:
            reason = (
                f"the server at {self._where} (pid {os.getpid()}) cannot start its successor "
                "itself; start the new version with handover"
            )
        elif self._upgrade is not None or self._successor is not None:
            reason = f"a handover of {self._where} is already under way"
        if reason:
            if asker is None:
                log.warning("%s: cannot upgrade: %s", self._where, reason)
            else:
                _answer(asker.sock, Message("error", reason=reason))
            return
        command = self._upgrader.command
        assert command is not None
        try:
            # A session of its own (a Ctrl-C for the old one is not for it), stdin from
            # /dev/null, the rest of our descriptors closed on exec (Python's default).
            pid = os.posix_spawnp(
                command[0],
                command,
                os.environ,
                file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)],
                setsid=True,
            )
        except OSError as exc:
            reason = f"cannot start {command[0]}: {os.strerror(exc.errno or 0).lower()}"
            log.warning("%s: upgrade failed: %s", self._where, reason)
            if asker is not None:
                _answer(asker.sock, Message("error", reason=reason))
            return
        log.info("%s: upgrading: started pid %d", self._where, pid)
        # The child's own handover has its READY_TIMEOUT; allow it that, and its start.
        self._upgrade = _Upgrade(pid, asker, time.monotonic() + UPGRADE_TIMEOUT)

    def _check_upgrade(self, exited: bool) -> None:
        upgrade = self._upgrade
        assert upgrade is not None
        if exited:
            reason = (
                f"the new process (pid {upgrade.pid}) {upgrade.end(kill=False)} before taking "
                "over; see its output"
            )
        elif time.monotonic() >= upgrade.deadline:
            upgrade.end(kill=True)
            reason = (
                f"the new process (pid {upgrade.pid}) did not take over within "
                f"{UPGRADE_TIMEOUT:g} s; stopped it"
            )
        else:
            return
        self._upgrade = None
        os.close(upgrade.pidfd)
        log.warning("%s: upgrade failed: %s; still serving", self._where, reason)
        self._answer_upgrade(upgrade, Message("error", reason=reason))

    def _answer_upgrade(self, upgrade: _Upgrade, answer: Message) -> None:
        if upgrade.asker is not None:
            _answer(upgrade.asker.sock, answer)

    # -- endings ---------------------------------------------------------------------------
    def _refuse(self, sock: socket.socket, reason: str) -> None:
        _answer(sock, Message("error", reason=reason))

    def _drop(self, conv: _Conversation, reason: str | None) -> None:
        if conv is self._successor:
            self._successor = None
        elif conv in self._pending:
            self._pending.remove(conv)
        if reason is None:
            conv.sock.close()
        else:
            _answer(conv.sock, Message("error", reason=reason))

    def _end(self, reason: str) -> None:
        """Answer everyone still waiting, close the control socket, remove its file."""
        for conv in self._conversations():
            _answer(conv.sock, Message("error", reason=reason))
        self._pending.clear()
        self._successor = None
        upgrade, self._upgrade = self._upgrade, None
        if upgrade is not None:
            # Started for an upgrade that ends here: stopped and reaped, not left to take
            # over from nobody (or to linger as a zombie of ours).
            upgrade.end(kill=True)
            self._answer_upgrade(upgrade, Message("error", reason=reason))
            os.close(upgrade.pidfd)
        self._claim.release()
        self._sock.close()
        self._wakeup.close()


# -- the wire ------------------------------------------------------------------------------


class _Closed(ProtocolError):
    """The other side closed the conversation (or died)."""


def _send(sock: socket.socket, message: Message, fds: Sequence[int] = ()) -> None:
    sock.sendmsg([encode(message)], rights(fds, len(fds)), socket.MSG_NOSIGNAL)


def _answer(sock: socket.socket, message: Message) -> None:
    """Send a last message and close; the peer may be gone already."""
    try:
        sock.setblocking(False)
        _send(sock, message)
    except OSError:
        pass
    finally:
        sock.close()


def _receive(sock: socket.socket, expected: tuple[str, ...], timeout: float) -> Message:
    message, fds = _receive_with_fds(sock, expected, timeout)
    close_fds(fds)
    return message


def _receive_with_fds(
    sock: socket.socket, expected: tuple[str, ...], timeout: float
) -> tuple[Message, list[int]]:
    """One control message (``timeout`` 0: one that is there now). A broken one closes any
    descriptors that came with it and raises ProtocolError."""
    if timeout:
        sock.settimeout(timeout)
    try:
        # Close-on-exec from the start: a listener received without it would be inherited
        # by every program the successor runs (its own successor, --exec commands).
        packet, ancdata, flags, _ = sock.recvmsg(MAX_MESSAGE + 1, ancillary_size(1), RECV_FLAGS)
    except TimeoutError:
        raise ProtocolError(f"no answer within {timeout:g} s") from None
    except BlockingIOError:
        raise ProtocolError("nothing to read") from None
    except ConnectionResetError:
        # It closed with a message of ours unread (it refused us at once): Linux reports
        # that first, and what it sent before it closed is still queued behind the error.
        try:
            packet, ancdata, flags, _ = sock.recvmsg(
                MAX_MESSAGE + 1, ancillary_size(1), socket.MSG_DONTWAIT | RECV_FLAGS
            )
        except OSError:
            packet, ancdata, flags = b"", [], 0
    try:
        fds = unpack(ancdata, flags, "the handover peer", max_fds=1).fds
    except ControlDataError as exc:
        raise ProtocolError(str(exc)) from None
    if flags & socket.MSG_TRUNC:
        close_fds(fds)
        raise ProtocolError(f"handover message longer than {MAX_MESSAGE} bytes")
    if not packet and not fds:
        raise _Closed("the other process closed the handover conversation")
    try:
        return decode(packet, len(fds), expected), list(fds)
    except ProtocolError:
        close_fds(fds)
        raise


#: How many parents up /proc is followed to tell whether a process descends from the one an
#: upgrade started (a wrapper such as ``sh -c`` or a launcher in between): more is no
#: wrapper chain, and is not looked at.
_ANCESTRY: Final = 8


def _descends_from(pid: int, ancestor: int) -> bool:
    """Whether ``pid`` is ``ancestor`` or one of its descendants (within _ANCESTRY)."""
    for _ in range(_ANCESTRY):
        if pid == ancestor:
            return True
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                # pid (comm) state ppid ...: comm may hold spaces and parentheses.
                pid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
        if pid <= 1:
            return False
    return False


def _readable(fd: int, timeout: float = 0.0) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def _exited(pidfd: int, broken: BaseException) -> bool:
    """Whether the process of ``pidfd`` has exited, now that the conversation with it broke
    with ``broken``. A pidfd is readable once its process has exited; a conversation that
    ended (a dying process's descriptors close before its pidfd says so) waits EXIT_GRACE
    for that, one that went wrong otherwise (garbage, no answer in time) does not."""
    if pidfd < 0:
        return True  # it had exited before we could open one
    ended = isinstance(broken, (_Closed, OSError)) and not isinstance(broken, TimeoutError)
    return _readable(pidfd, EXIT_GRACE if ended else 0.0)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, UdsError):
        return os.strerror(exc.errno or 0).lower() if exc.errno else "connection lost"
    return str(exc)
