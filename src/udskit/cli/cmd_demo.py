"""``udskit demo``: eight everyday Unix-socket scenarios, run for real, in under a minute.

Every step is a real ``udskit`` command (a child process, ``python -m udskit``) talking over
real sockets in a fresh temporary directory; what each one printed is checked, and the
tour says what happened. The commands are shown as you would type them, relative to that
directory, so each scenario can be replayed by hand.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Final

from udskit import inspect

from ._output import Output
from ._signals import exit_on_termination

HELP = "a one-minute tour: eight everyday scenarios, run for real in a temporary directory"
EXAMPLE = """\
  udskit demo
  udskit demo --keep        keep the directory, to look at it afterwards
"""

#: Longest any one step may take. Every step takes milliseconds; this only turns a hang
#: (a bug) into a failed scenario instead of a tour that never ends.
STEP_TIMEOUT: Final = 20.0

#: Where the notes after the demo's commands start, so that they line up.
_NOTE_COLUMN: Final = 34

#: Back-off while waiting for a demo server to accept connections.
_POLL_FIRST: Final = 0.005
_POLL_MAX: Final = 0.1


class DemoFailure(Exception):
    """A scenario did not do what it should; the message says what happened instead."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary directory and say where it is"
    )


def run(args: argparse.Namespace) -> int:
    directory = tempfile.mkdtemp(prefix="udskit-demo-")
    tour = _Tour(directory, Output())
    try:
        with exit_on_termination():
            failed = tour.run(SCENARIOS)
    finally:
        tour.stop_all()
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    if args.keep:
        tour.say(f"the directory is kept: {directory}")
    return 1 if failed else 0


class _Tour:
    def __init__(self, directory: str, out: Output) -> None:
        self.directory = directory
        self._out = out
        self._servers: list[subprocess.Popen[bytes]] = []

    # -- printing -------------------------------------------------------------------------
    def say(self, text: str = "") -> None:
        self._out.write((text + "\n").encode())

    def show(self, command: str, note: str = "") -> None:
        """A command as typed, with a note in a column of its own (as a shell comment)."""
        self.say(f"    $ {command:<{_NOTE_COLUMN}}  # {note}" if note else f"    $ {command}")

    def saw(self, text: str) -> None:
        self.say(f"      {text}")

    # -- running --------------------------------------------------------------------------
    def run(self, scenarios: Sequence[tuple[str, str, Callable[[_Tour], str]]]) -> int:
        started = time.monotonic()
        self.say(f"udskit demo: eight everyday scenarios, run for real in {self.directory}")
        self.say("(each $ line is a command you can type there yourself)")
        failed = 0
        for key, title, scenario in scenarios:
            if self._out.closed:
                return failed  # nobody reads our output any more: the rest is for no one
            self.say()
            self.say(f"{key}  {title}")
            try:
                verdict = scenario(self)
            except (DemoFailure, OSError, subprocess.SubprocessError) as exc:
                failed += 1
                self.say(f"    FAILED: {exc}")
            else:
                self.say(f"    ok: {verdict}")
            finally:
                self.stop_all()
        self.say()
        took = time.monotonic() - started
        if failed:
            self.say(f"{failed} of {len(scenarios)} scenarios FAILED ({took:.1f} s)")
        else:
            self.say(f"all {len(scenarios)} scenarios worked ({took:.1f} s)")
        return failed

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def udskit(
        self, *args: str, stdin: bytes = b"", expect: int | None = 0
    ) -> subprocess.CompletedProcess[bytes]:
        """Run one udskit command to completion; check its exit status."""
        result = subprocess.run(
            [sys.executable, "-m", "udskit", *args],
            input=stdin,
            capture_output=True,
            cwd=self.directory,
            timeout=STEP_TIMEOUT,
            check=False,
        )
        if expect is not None and result.returncode != expect:
            raise DemoFailure(
                f"'udskit {' '.join(args)}' exited with {result.returncode}, not {expect}: "
                + (result.stderr.decode(errors="replace").strip() or "(no message)")
            )
        return result

    def spawn(self, *args: str) -> subprocess.Popen[bytes]:
        """Start a udskit command in the background, stdin, stdout and stderr piped to us."""
        process = subprocess.Popen(
            [sys.executable, "-m", "udskit", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=self.directory,
        )
        self._servers.append(process)
        return process

    def start(self, *args: str, address: str) -> subprocess.Popen[bytes]:
        """Start a udskit server in the background and wait until ``address`` listens."""
        process = self.spawn(*args)
        deadline = time.monotonic() + STEP_TIMEOUT
        pause = _POLL_FIRST
        while not _listening(self.path(address)):
            if process.poll() is not None:
                raise DemoFailure(f"'udskit {' '.join(args)}' exited: {_stderr(process)}")
            if time.monotonic() > deadline:
                raise DemoFailure(f"{address} did not accept connections in {STEP_TIMEOUT:g} s")
            time.sleep(pause)  # back-off between readiness probes
            pause = min(pause * 2, _POLL_MAX)
        return process

    def finish(
        self, process: subprocess.Popen[bytes], *, interrupt: bool = True
    ) -> tuple[bytes, bytes]:
        """Stop a background command (SIGTERM, as Ctrl-C would); return stdout and stderr."""
        if interrupt and process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            out, err = _communicate(process, STEP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            _communicate(process, None)
            raise DemoFailure(f"pid {process.pid} did not stop") from None
        if process.returncode != 0:
            raise DemoFailure(f"pid {process.pid} exited with {process.returncode}")
        return out, err

    def stop_all(self) -> None:
        for process in self._servers:
            if process.poll() is None:
                process.kill()
            _communicate(process, None)
        self._servers.clear()


def _communicate(process: subprocess.Popen[bytes], timeout: float | None) -> tuple[bytes, bytes]:
    """Wait for ``process`` and take its output, whether or not we closed its stdin."""
    if process.stdin is not None:
        if not process.stdin.closed:
            process.stdin.close()
        process.stdin = None
    out, err = process.communicate(timeout=timeout)
    return out or b"", err or b""


def _listening(path: str) -> bool:
    """True once a socket listens (or, for datagrams, is bound) at ``path``. Read from
    /proc/net/unix rather than by connecting, which the server would count as a client."""
    if not os.path.exists(path):
        return False
    return any(
        entry.path == path and entry.state in ("listening", "bound")
        for entry in inspect.list_sockets(os.path.dirname(path), with_owners=False)
    )


def _stderr(process: subprocess.Popen[bytes]) -> str:
    assert process.stderr is not None
    return process.stderr.read().decode(errors="replace").strip() or "(no message)"


def _expect(what: str, got: bytes, wanted: bytes) -> None:
    if got != wanted:
        raise DemoFailure(f"{what}: expected {wanted!r}, got {got!r}")


def _gone(tour: _Tour, name: str) -> None:
    if os.path.lexists(tour.path(name)):
        raise DemoFailure(f"{name} is still there")


# -- the scenarios ------------------------------------------------------------------------
def s1(tour: _Tour) -> str:
    tour.show("udskit serve --type dgram --print --until DONE s1.sock &")
    server = tour.start(
        "serve", "--type", "dgram", "--print", "--until", "DONE", "s1.sock", address="s1.sock"
    )
    tour.show("printf 'hello\\nDONE\\n' | udskit connect --type dgram s1.sock")
    tour.udskit("connect", "--type", "dgram", "s1.sock", stdin=b"hello\nDONE\n")
    printed, _ = tour.finish(server, interrupt=False)
    _expect("the server printed", printed, b"hello\nDONE\n")
    _gone(tour, "s1.sock")
    for line in printed.decode().splitlines():
        tour.saw(f"server printed: {line}")
    return "the server stopped by itself at DONE (exit 0) and removed s1.sock"


def s2(tour: _Tour) -> str:
    tour.show("udskit serve --type dgram --upper --until DONE s2.sock &")
    server = tour.start(
        "serve", "--type", "dgram", "--upper", "--until", "DONE", "s2.sock", address="s2.sock"
    )
    tour.show("udskit connect --type dgram s2.sock", "typing one line at a time")
    client = tour.spawn("connect", "--type", "dgram", "s2.sock")
    assert client.stdin is not None
    assert client.stdout is not None
    for line in (b"hello", b"DONE"):
        client.stdin.write(line + b"\n")
        client.stdin.flush()
        answer = client.stdout.readline()  # before the next line is typed
        _expect(f"the reply to {line.decode()}", answer, line.upper() + b"\n")
        tour.saw(f"typed {line.decode():<6} -> the server answered {answer.decode().strip()}")
    client.stdin.close()
    tour.finish(client, interrupt=False)
    tour.finish(server, interrupt=False)
    _gone(tour, "s2.sock")
    return "each line went out as one datagram, answered before the next; DONE stopped the server"


def s3(tour: _Tour) -> str:
    message = "This is the message. This will be echoed back!"
    tour.show("udskit serve --echo s3.sock &")
    server = tour.start("serve", "--echo", "s3.sock", address="s3.sock")
    tour.show(f"udskit send --reply s3.sock '{message}'")
    result = tour.udskit("send", "--reply", "s3.sock", message)
    _expect("the echo", result.stdout, message.encode() + b"\n")
    tour.saw(f"received: {result.stdout.decode().strip()}")
    tour.finish(server)
    _gone(tour, "s3.sock")
    return "the whole message came back; on Ctrl-C (SIGTERM here) the server removed s3.sock"


def s4(tour: _Tour) -> str:
    child = 'read msg <&$UDSKIT_FD; echo "child got: $msg; hello from the child" >&$UDSKIT_FD'
    tour.show(f"echo 'Hello from parent!' | udskit pair -- sh -c '{child}'")
    result = tour.udskit("pair", "--", "sh", "-c", child, stdin=b"Hello from parent!\n")
    _expect(
        "the child's answer",
        result.stdout,
        b"child got: Hello from parent!; hello from the child\n",
    )
    tour.saw(f"received: {result.stdout.decode().strip()}")
    return "the child used the inherited end of a socket pair (fd in $UDSKIT_FD) to answer"


def s5(tour: _Tour) -> str:
    tour.show("udskit serve --reply 'thank you!' --backlog 128 s5.sock &")
    server = tour.start(
        "serve", "--reply", "thank you!", "--backlog", "128", "s5.sock", address="s5.sock"
    )
    clients = []
    for n in (1, 2, 3):
        tour.show(f"echo 'message {n}' | udskit connect s5.sock &")
        clients.append(tour.spawn("connect", "s5.sock"))
    for n, client in enumerate(clients, 1):
        out, _ = client.communicate(f"message {n}\n".encode(), timeout=STEP_TIMEOUT)
        _expect(f"client {n}'s reply", out, b"thank you!\n")
        tour.saw(f"client {n} received: {out.decode().strip()}")
    tour.finish(server)
    return "three clients at once, each answered with the fixed reply"


def s6(tour: _Tour) -> str:
    tour.show("udskit serve --type seqpacket --echo s6.sock &")
    server = tour.start("serve", "--type", "seqpacket", "--echo", "s6.sock", address="s6.sock")
    tour.show("udskit send --type seqpacket --reply s6.sock one two three")
    result = tour.udskit("send", "--type", "seqpacket", "--reply", "s6.sock", "one", "two", "three")
    _expect("the echoes", result.stdout, b"one\ntwo\nthree\n")
    tour.saw("received: " + ", ".join(result.stdout.decode().split()))
    tour.finish(server)
    return "three messages sent back to back came back as three messages, in order"


def s7(tour: _Tour) -> str:
    tour.show("udskit serve --upper -v s7.sock &")
    server = tour.start("serve", "--upper", "-v", "s7.sock", address="s7.sock")
    tour.show("echo 'who am i?' | udskit connect --bind client.sock s7.sock")
    result = tour.udskit("connect", "--bind", "client.sock", "s7.sock", stdin=b"who am i?\n")
    _expect("the answer", result.stdout, b"WHO AM I?\n")
    tour.saw(f"received: {result.stdout.decode().strip()}")
    _, said = tour.finish(server)
    seen = [line for line in said.decode(errors="replace").splitlines() if "client pid=" in line]
    if len(seen) != 1 or f"uid={os.geteuid()}" not in seen[0] or "client.sock" not in seen[0]:
        raise DemoFailure(f"the server's -v line does not show our uid and path: {seen}")
    tour.saw(f"server said: {seen[0]}")
    _gone(tour, "client.sock")
    return "the server learnt the client's pid and uid from the kernel, and its bound path"


def s8(tour: _Tour) -> str:
    tour.show("udskit serve --echo s8.sock &")
    first = tour.start("serve", "--echo", "s8.sock", address="s8.sock")
    tour.show("udskit serve --echo s8.sock", "a second server, same path")
    refused = tour.udskit("serve", "--echo", "s8.sock", expect=1)
    tour.saw(refused.stderr.decode(errors="replace").strip())
    tour.show(f"kill -9 {first.pid}", "the server crashes")
    first.kill()
    first.wait()
    tour.show("udskit doctor s8.sock")
    doctor = tour.udskit("doctor", "s8.sock", expect=1)
    stale = [line for line in doctor.stdout.decode().splitlines() if "stale" in line]
    if not stale:
        raise DemoFailure("doctor did not recognise the stale socket file")
    tour.saw(stale[0].strip())
    tour.show("udskit serve --echo s8.sock &", "reclaims the stale file")
    second = tour.start("serve", "--echo", "s8.sock", address="s8.sock")
    tour.show("udskit send --reply s8.sock 'Hello, world!' 'My name is Tom!'")
    result = tour.udskit("send", "--reply", "s8.sock", "Hello, world!", "My name is Tom!")
    _expect("the echoes", result.stdout, b"Hello, world!\nMy name is Tom!\n")
    for line in result.stdout.decode().splitlines():
        tour.saw(f"received: {line}")
    tour.finish(second)
    with open(tour.path("notes.txt"), "w") as f:
        f.write("not a socket\n")
    tour.show("udskit serve --echo notes.txt", "a regular file is in the way")
    blocked = tour.udskit("serve", "--echo", "notes.txt", expect=1)
    tour.saw(blocked.stderr.decode(errors="replace").strip())
    if not os.path.isfile(tour.path("notes.txt")):
        raise DemoFailure("notes.txt was touched")
    return "a live socket is never taken over, a stale one is reclaimed, a file is never deleted"


SCENARIOS: Final = (
    ("1", "a datagram server prints each datagram until DONE, then removes its socket", s1),
    ("2", "an interactive datagram client: each line one datagram, DONE stops the server", s2),
    ("3", "a stream client sends a message and reads the echo", s3),
    ("4", "a socket pair between a parent and its child process", s4),
    ("5", "a stream server answers every message with a fixed reply", s5),
    ("6", "seqpacket: reliable, ordered, message boundaries kept", s6),
    ("7", "the server learns who the client is; the client binds its own path", s7),
    ("8", "the socket file's life: live, crashed, reclaimed, and a file in the way", s8),
)
