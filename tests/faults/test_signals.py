"""SIGTERM and SIGINT stop ``udskit.serve()`` cleanly: exit status 0, no traceback, socket
file removed, connected clients released; the previous signal handlers come back."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import udskit
from udskit import Channel, ConnectionClosed

from ..conftest import READY_TIMEOUT, wait_connectable
from ..integration.children import fork, reap

#: A server program: the library's serve() with an echo handler, nothing else.
SERVER = """
import sys
import udskit

def echo(channel):
    for message in channel:
        channel.send(message)

udskit.serve(sys.argv[1], echo, type=sys.argv[2])
print("serve returned", flush=True)
"""

KINDS = {
    "stream": socket.SOCK_STREAM,
    "seqpacket": socket.SOCK_SEQPACKET,
    "dgram": socket.SOCK_DGRAM,
}


@pytest.mark.parametrize("kind", ["stream", "seqpacket", "dgram"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_serve_cleanly(sockdir: Path, signum: int, kind: str) -> None:
    path = sockdir / "app.sock"
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    with subprocess.Popen(
        [sys.executable, "-c", SERVER, os.fspath(path), kind],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    ) as proc:
        try:
            wait_connectable(path, KINDS[kind])
            with udskit.connect(path, type=kind, timeout=READY_TIMEOUT) as client:
                client.send(b"before the signal")
                assert client.recv() == b"before the signal"
                # A connected client, its handler blocked in recv(): the stop must not wait
                # for it to leave.
                proc.send_signal(signum)
                out, err = proc.communicate(timeout=READY_TIMEOUT)
                if kind != "dgram":
                    with pytest.raises(ConnectionClosed):
                        client.recv()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, err.decode()
    assert out.decode() == "serve returned\n"
    assert err.decode() == "", "no traceback, no warning"
    assert not path.exists(), "the socket file is removed"
    assert os.listdir(sockdir) == []


#: Servers whose handler has the signal delivered to its own thread, as the kernel may:
#: serve() with its own signal handling, and a MessageServer whose program installs its own
#: handler and calls serve_forever().
SIGNALLED_IN_A_HANDLER = {
    "serve": """
import signal, sys, threading
import udskit

def handler(channel):
    for message in channel:
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
        channel.send(message)

udskit.serve(sys.argv[1], handler)
print("serve returned", flush=True)
""",
    "serve_forever": """
import signal, sys, threading
import udskit

def handler(conn, message):
    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)

server = udskit.MessageServer(sys.argv[1], handler, workers=1)
signal.signal(signal.SIGTERM, lambda *_: server.stop())
server.serve_forever()
print("serve returned", flush=True)
""",
}


@pytest.mark.parametrize("how", sorted(SIGNALLED_IN_A_HANDLER))
def test_a_signal_delivered_to_a_handlers_thread_stops_the_server(sockdir: Path, how: str) -> None:
    """The main thread sleeps in poll(); Python runs the signal handler only there, so the
    signal must also wake it (signal.set_wakeup_fd), whichever thread the kernel chose."""
    path = sockdir / "app.sock"
    with subprocess.Popen(
        [sys.executable, "-c", SIGNALLED_IN_A_HANDLER[how], os.fspath(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        try:
            wait_connectable(path)
            with udskit.connect(path, timeout=READY_TIMEOUT) as client:
                client.send(b"signal yourself")
                out, err = proc.communicate(timeout=READY_TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert (proc.returncode, out.decode(), err.decode()) == (0, "serve returned\n", "")
    assert not path.exists()


def test_serve_in_process_restores_the_previous_handlers(sockdir: Path) -> None:
    path = sockdir / "app.sock"
    received: list[bytes] = []

    def handler(channel: Channel) -> None:
        for message in channel:
            received.append(message)
            if message == b"stop":
                os.kill(os.getpid(), signal.SIGTERM)  # as `kill` from a shell would

    def previous_term(signum: int, frame: object) -> None:
        raise AssertionError("serve() should have handled SIGTERM")

    def client() -> None:
        wait_connectable(path)
        with udskit.connect(path) as channel:
            channel.send(b"hello")
            channel.send(b"stop")

    old_term = signal.signal(signal.SIGTERM, previous_term)
    old_int = signal.getsignal(signal.SIGINT)
    try:
        pid = fork(client)
        udskit.serve(path, handler)  # returns when the handler's SIGTERM arrives
        assert reap(pid) == 0
        assert signal.getsignal(signal.SIGTERM) is previous_term
        assert signal.getsignal(signal.SIGINT) is old_int
    finally:
        signal.signal(signal.SIGTERM, old_term)
    assert received == [b"hello", b"stop"]
    assert not path.exists()
