"""The threaded ``Server``: many clients at once, ``max_clients`` holding the rest in the
backlog, ``stop()`` from a handler (S1), and its lifecycle."""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import resource
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import udskit
from udskit import AddressInUse, Channel, ConnectionClosed, Server

from .conformance import Background

#: How long a test waits for a reply, an event or the server thread before failing.
PATIENCE = 20.0

#: How long the server gets to (wrongly) start a handler past max_clients.
NOT_STARTED_WAIT = 0.2

CLIENTS = 24
ROUNDS = 20


def echo(channel: Channel) -> None:
    for message in channel:
        channel.send(message)


class Serving:
    """A Server running in a thread for the length of a ``with`` block."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.thread = threading.Thread(target=server.serve_forever)

    def __enter__(self) -> Server:
        self.thread.start()
        return self.server

    def __exit__(self, *exc_info: object) -> None:
        self.server.stop()
        self.thread.join(PATIENCE)
        assert not self.thread.is_alive(), "the server did not stop"


@pytest.fixture
def path(sockdir: Path) -> Iterator[Path]:
    yield sockdir / "app.sock"
    assert not (sockdir / "app.sock").exists(), "the server removes its socket file"


@pytest.mark.parametrize("kind", ["stream", "seqpacket", "dgram"])
def test_many_concurrent_clients(path: Path, kind: str) -> None:
    def client(number: int) -> None:
        with udskit.connect(path, type=kind, timeout=PATIENCE) as channel:
            for i in range(ROUNDS):
                message = b"client %d message %d" % (number, i)
                channel.send(message)
                assert channel.recv() == message

    with Serving(Server(path, echo, type=kind)):
        helpers = [Background(client, n) for n in range(CLIENTS)]
        for helper in helpers:
            helper.join()


def test_max_clients_holds_the_next_client_in_the_backlog(path: Path) -> None:
    started: queue.Queue[bytes] = queue.Queue()
    release = {name: threading.Event() for name in (b"A", b"B", b"C", b"D")}

    def handler(channel: Channel) -> None:
        name = channel.recv()
        started.put(name)
        assert release[name].wait(PATIENCE)
        channel.send(b"bye " + name)

    def next_started() -> bytes:
        return started.get(timeout=PATIENCE)

    # backlog=1: the kernel queues two pending connections, and refuses a third
    # (non-blocking) with EAGAIN; that is how we see the server leave them queued.
    server = Server(path, handler, max_clients=2, backlog=1)
    clients: dict[bytes, Channel] = {}
    try:
        with Serving(server):
            for name in (b"A", b"B"):
                clients[name] = udskit.connect(path, timeout=PATIENCE)
                clients[name].send(name)
            assert {next_started(), next_started()} == {b"A", b"B"}
            assert server.active_clients == 2
            for name in (b"C", b"D"):  # connect() completes: they wait in the backlog
                clients[name] = udskit.connect(path, timeout=PATIENCE)
                clients[name].send(name)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK) as probe:
                assert probe.connect_ex(os.fspath(path)) == errno.EAGAIN, (
                    "the backlog should be full: C and D not accepted while A and B run"
                )
            # An over-eager server would start C's handler within this wait; a correct one
            # never does (the wait bounds how long a broken server has to show itself).
            with pytest.raises(queue.Empty):
                started.get(timeout=NOT_STARTED_WAIT)
            release[b"A"].set()
            assert clients[b"A"].recv() == b"bye A"
            assert next_started() == b"C"  # A's slot went to the first in the backlog
            release[b"B"].set()
            assert next_started() == b"D"
            release[b"C"].set()
            release[b"D"].set()
            for name in (b"B", b"C", b"D"):
                assert clients[name].recv() == b"bye " + name
    finally:
        for event in release.values():
            event.set()
        for channel in clients.values():
            channel.close()


@pytest.mark.parametrize("kind", ["dgram", "stream"])
def test_stop_from_inside_a_handler(path: Path, kind: str) -> None:
    """S1: print each datagram until one equals DONE, then stop and remove the socket."""
    seen: list[bytes] = []
    server: Server

    def until_done(channel: Channel) -> None:
        for message in channel:
            seen.append(message)
            if message == b"DONE":
                server.stop()
                return

    server = Server(path, until_done, type=kind)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        with udskit.connect(path, type=kind) as client:
            for message in (b"one", b"two", b"three", b"DONE"):
                client.send(message)
        thread.join(PATIENCE)
        assert not thread.is_alive(), "DONE stopped the server"
    finally:
        server.stop()
        thread.join(PATIENCE)
    assert seen == [b"one", b"two", b"three", b"DONE"]


def test_stop_releases_clients_still_connected(path: Path) -> None:
    in_handler = threading.Event()

    def waits_forever(channel: Channel) -> None:
        in_handler.set()
        channel.recv()  # blocks until stop() shuts the connection down

    with Serving(Server(path, waits_forever)) as server:
        client = udskit.connect(path)
        assert in_handler.wait(PATIENCE)
        assert server.active_clients == 1
    # Serving's exit stopped the server within PATIENCE although the client never left.
    with client, pytest.raises(ConnectionClosed):
        client.recv()


def test_server_errors_surface_at_construction(path: Path) -> None:
    with udskit.listen(path), pytest.raises(AddressInUse):
        Server(path, echo)
    with pytest.raises(TypeError, match="handler must be callable"):
        Server(path, "echo")  # type: ignore[arg-type]
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="max_clients must be a positive integer"):
            Server(path, echo, max_clients=bad)  # type: ignore[arg-type]
    assert not path.exists()


def test_server_closed_without_serving(path: Path) -> None:
    with Server(path, echo, type="seqpacket") as server:
        assert path.exists()
        assert server.listener.type == "seqpacket"
        assert str(server.address) == str(path)
    assert not path.exists()
    server.close()  # idempotent


def test_serve_forever_runs_once(path: Path) -> None:
    server = Server(path, echo)
    with Serving(server):
        with udskit.connect(path, timeout=PATIENCE) as client:
            client.send(b"up")
            assert client.recv() == b"up"
        with pytest.raises(RuntimeError, match="can run once"):
            server.serve_forever()


def test_datagram_server_survives_a_truncated_datagram(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        Serving(Server(path, echo, type="dgram", max_frame=64)),
        udskit.connect(path, type="dgram", timeout=PATIENCE) as client,
    ):
        client.send(b"x" * 65)
        client.send(b"fits")
        assert client.recv() == b"fits"
    assert "arrived truncated" in caplog.text


def test_server_with_a_policy_refuses_and_goes_on(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    nobody_allowed = udskit.Policy(uids={os.getuid() + 4242})
    with Serving(Server(path, echo, allow=nobody_allowed)):
        with udskit.connect(path, timeout=PATIENCE) as client:
            with contextlib.suppress(ConnectionClosed):  # the refusal may come first
                client.send(b"hello")
            with pytest.raises(ConnectionClosed):
                client.recv()
        assert "refused peer" in caplog.text


def _counting(calls: list[int]) -> Callable[[Channel], None]:
    def handler(channel: Channel) -> None:
        calls.append(1)
        echo(channel)

    return handler


def test_abstract_and_seqpacket_server() -> None:
    calls: list[int] = []
    name = f"@udskit-test-{os.getpid()}-server"
    policy = udskit.Policy.same_user_only()
    with Serving(Server(name, _counting(calls), type="seqpacket", allow=policy)):
        for _ in range(3):
            with udskit.connect(name, type="seqpacket", timeout=PATIENCE) as client:
                client.send(b"abstract")
                assert client.recv() == b"abstract"
    assert len(calls) == 3


#: Descriptor numbers past select()'s FD_SETSIZE (1024): a busy process reaches them.
HIGH_FD = 1100


@pytest.mark.parametrize("kind", ["stream", "dgram"])
def test_server_created_when_descriptors_run_high(path: Path, kind: str) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < HIGH_FD + 100:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below {HIGH_FD + 100}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, HIGH_FD + 100), hard))
    fillers: list[int] = []
    try:
        anchor = os.open(os.devnull, os.O_RDONLY)
        fillers.append(anchor)
        while fillers[-1] < HIGH_FD:  # bounded by HIGH_FD
            fillers.append(os.dup(anchor))
        with Serving(Server(path, echo, type=kind)) as server:
            assert server.listener.fileno() > 1024
            with udskit.connect(path, type=kind, timeout=PATIENCE) as client:
                client.send(b"high")
                assert client.recv() == b"high"
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_stop_waits_one_grace_period_for_all_stuck_handlers(
    path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Handlers that ignore the end of their connection get one grace period between them,
    not one each: stop() shuts every socket down, then waits once for all of them."""
    grace = 0.5
    stuck = 6
    monkeypatch.setattr(udskit.server, "SHUTDOWN_GRACE", grace)
    release = threading.Event()
    inside = threading.Semaphore(0)

    def stubborn(channel: Channel) -> None:
        inside.release()
        release.wait(PATIENCE)  # ignores the shutdown of its connection

    server = Server(path, stubborn)
    serving = threading.Thread(target=server.serve_forever, name="serving")
    clients = [udskit.connect(path) for _ in range(stuck)]
    try:
        serving.start()
        for _ in range(stuck):
            assert inside.acquire(timeout=PATIENCE)
        started = time.monotonic()
        server.stop()
        serving.join(PATIENCE)
        took = time.monotonic() - started
        assert not serving.is_alive()
        assert server.active_clients == stuck  # left behind, still running
    finally:
        release.set()
        for client in clients:
            client.close()
    assert grace * 0.9 <= took < stuck * grace / 2, f"stop took {took:.2f} s"
    assert f"{stuck} handler(s) still running" in caplog.text


def test_a_queue_of_clients_is_accepted_in_batches(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Clients already queued are accepted ACCEPT_BATCH per wake-up, not one each."""
    monkeypatch.setattr(udskit.server, "ACCEPT_BATCH", 4)
    wakeups = 0
    batches: list[int] = []  # for each client started, the wake-up that accepted it
    real_wait = Server._wait

    def counting_wait(server: Server, timeout: float | None = None) -> list[int]:
        nonlocal wakeups
        ready = real_wait(server, timeout)
        wakeups += 1
        return ready

    real_start = Server._start_client

    def recording_start(server: Server, listener: udskit.Listener, conn: socket.socket) -> None:
        batches.append(wakeups)
        real_start(server, listener, conn)

    monkeypatch.setattr(Server, "_wait", counting_wait)
    monkeypatch.setattr(Server, "_start_client", recording_start)
    server = Server(path, echo)
    clients = [udskit.connect(path, timeout=PATIENCE) for _ in range(10)]  # all queued
    try:
        with Serving(server):
            for number, client in enumerate(clients):
                client.send(b"%d" % number)
                assert client.recv() == b"%d" % number
    finally:
        for client in clients:
            client.close()
    assert batches == [1] * 4 + [2] * 4 + [3] * 2


def test_max_clients_defaults_to_the_named_limit_and_none_lifts_it(path: Path) -> None:
    import inspect

    import udskit.aio
    from udskit.cli.main import build_parser
    from udskit.server import DEFAULT_MAX_CLIENTS

    for function in (Server, udskit.serve, udskit.aio.Server, udskit.aio.start_server):
        default = inspect.signature(function).parameters["max_clients"].default
        assert default == DEFAULT_MAX_CLIENTS, function
    assert udskit.aio.server.DEFAULT_MAX_CLIENTS == DEFAULT_MAX_CLIENTS
    args = build_parser().parse_args(["serve", os.fspath(path), "--echo"])
    assert args.max_clients == DEFAULT_MAX_CLIENTS
    with Serving(Server(path, echo, max_clients=None)) as server:
        with udskit.connect(path, timeout=PATIENCE) as client:
            client.send(b"unlimited")
            assert client.recv() == b"unlimited"
        assert server._max_clients is None


def _own_stack_size() -> int:
    """The calling thread's stack size, as glibc's pthread_getattr_np() reports it."""
    import ctypes

    libc = ctypes.CDLL(None)
    libc.pthread_self.restype = ctypes.c_ulong
    attr = ctypes.create_string_buffer(128)  # pthread_attr_t is 56 bytes on x86_64
    assert libc.pthread_getattr_np(ctypes.c_ulong(libc.pthread_self()), attr) == 0
    try:
        where, size = ctypes.c_void_p(), ctypes.c_size_t()
        assert libc.pthread_attr_getstack(attr, ctypes.byref(where), ctypes.byref(size)) == 0
        return size.value
    finally:
        libc.pthread_attr_destroy(attr)


@pytest.mark.skipif(
    os.confstr("CS_GNU_LIBC_VERSION") is None, reason="pthread_getattr_np is glibc's"
)
def test_handler_threads_get_the_small_stack_and_the_process_default_stays(path: Path) -> None:
    sizes: queue.Queue[int] = queue.Queue()

    def measuring(channel: Channel) -> None:
        sizes.put(_own_stack_size())
        echo(channel)

    before = threading.stack_size(2 * 1024 * 1024)  # the program's own choice
    try:
        with Serving(Server(path, measuring)):
            with udskit.connect(path, timeout=PATIENCE) as client:
                client.send(b"x")
                assert client.recv() == b"x"
            assert threading.stack_size() == 2 * 1024 * 1024  # put back after each start
    finally:
        threading.stack_size(before)
    # glibc rounds up, and may count the guard page in.
    assert udskit.server.HANDLER_STACK_SIZE <= sizes.get(timeout=PATIENCE) < 2 * 1024 * 1024


def test_a_client_whose_thread_cannot_start_is_closed_and_serving_goes_on(
    path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import _thread
    import types

    failures = [RuntimeError("can't start new thread")]

    def start_new_thread(function: Callable[..., object], args: tuple[object, ...]) -> int:
        if failures:
            raise failures.pop()
        return _thread.start_new_thread(function, args)

    fake = types.SimpleNamespace(start_new_thread=start_new_thread, stack_size=_thread.stack_size)
    monkeypatch.setattr(udskit.server, "_thread", fake)
    with Serving(Server(path, echo)) as server:
        with udskit.connect(path, timeout=PATIENCE) as refused, pytest.raises(ConnectionClosed):
            refused.recv()
        with udskit.connect(path, timeout=PATIENCE) as served:
            served.send(b"next one")
            assert served.recv() == b"next one"
        assert server.active_clients <= 1
    assert "can't start new thread" in caplog.text
