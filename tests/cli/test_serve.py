"""``udskit serve``: every action, framing and socket type, with plain-socket clients."""

from __future__ import annotations

import grp
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.cli.conftest import (
    COMMAND_TIMEOUT,
    UDSKIT,
    Background,
    one_line_error,
    require,
    serve,
    udskit,
)
from tests.conftest import wait_connectable
from udskit import Address
from udskit.cli._exec import EXEC_CLIENT_GONE_GRACE

KINDS = {"stream": socket.SOCK_STREAM, "seqpacket": socket.SOCK_SEQPACKET}


def talk(path: Path, data: bytes, kind: int = socket.SOCK_STREAM) -> bytes:
    """Connect, send, half-close, read everything until the server closes."""
    with socket.socket(socket.AF_UNIX, kind) as client:
        client.settimeout(20)
        client.connect(os.fspath(path))
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := client.recv(65536):
            got += chunk
        return got


def recv_line(client: socket.socket) -> bytes:
    got = b""
    while not got.endswith(b"\n"):
        chunk = client.recv(65536)
        assert chunk, f"closed after {got!r}"
        got += chunk
    return got


def dgram_client(directory: Path, name: str = "client.sock") -> socket.socket:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    client.bind(os.fspath(directory / name))
    client.settimeout(20)
    return client


@pytest.mark.parametrize(
    ("action", "expected"),
    [
        (["--echo"], b"hello\n"),
        (["--upper"], b"HELLO\n"),
        (["--reply", "thank you!"], b"thank you!\n"),
        (["--exec", "tr a-z A-Z"], b"HELLO\n"),
    ],
)
def test_actions_on_a_raw_stream(
    sockdir: Path, background: list[Background], action: list[str], expected: bytes
) -> None:
    path = sockdir / "s.sock"
    server = serve(background, path, *action)
    assert talk(path, b"hello\n") == expected
    assert server.stop() == 0
    assert not path.exists()


def test_print_writes_what_arrives(sockdir: Path, background: list[Background]) -> None:
    path = sockdir / "p.sock"
    server = serve(background, path, "--print")
    assert talk(path, b"one\ntwo\n") == b""
    server.read_until(b"one\ntwo\n")
    assert server.stop() == 0


def test_lines_framing_answers_each_line(sockdir: Path, background: list[Background]) -> None:
    path = sockdir / "l.sock"
    serve(background, path, "--reply", "ok", "--framing", "lines")
    assert talk(path, b"a\nb\nc") == b"ok\nok\nok\n"  # the last line needs no newline


def test_length_framing(sockdir: Path, background: list[Background]) -> None:
    path = sockdir / "f.sock"
    serve(background, path, "--upper", "--framing", "length")
    frames = b"".join(struct.pack(">I", len(m)) + m for m in (b"ab\ncd", b"", b"x"))
    got = talk(path, frames)
    assert got == b"".join(struct.pack(">I", len(m)) + m for m in (b"AB\nCD", b"", b"X"))


def test_seqpacket_keeps_boundaries(sockdir: Path, background: list[Background]) -> None:
    path = sockdir / "q.sock"
    serve(background, path, "--type", "seqpacket", "--echo")
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as client:
        client.settimeout(20)
        client.connect(os.fspath(path))
        for message in (b"one", b"two", b"three"):
            client.send(message)
        assert [client.recv(100) for _ in range(3)] == [b"one", b"two", b"three"]


@pytest.mark.parametrize(
    ("action", "expected"),
    [
        (["--echo"], b"hi"),
        (["--upper"], b"HI"),
        (["--reply", "R"], b"R"),
        (["--exec", "rev"], b"ih"),
    ],
)
def test_datagram_actions_answer_the_sender(
    sockdir: Path, background: list[Background], action: list[str], expected: bytes
) -> None:
    path = sockdir / "d.sock"
    serve(background, path, "--type", "dgram", *action)
    with dgram_client(sockdir) as client:
        client.sendto(b"hi", os.fspath(path))
        reply, sender = client.recvfrom(100)
    assert reply == expected
    assert sender == os.fspath(path)  # replies come from the path itself (socat checks it)


def test_exec_with_lines_framing_runs_one_command_per_connection(
    sockdir: Path, background: list[Background]
) -> None:
    path = sockdir / "e.sock"
    serve(background, path, "--exec", "sort", "--framing", "lines")
    assert talk(path, b"b\na\nc\n") == b"a\nb\nc\n"
    assert talk(path, b"z\ny\n") == b"y\nz\n"


def test_exec_on_seqpacket(sockdir: Path, background: list[Background]) -> None:
    path = sockdir / "eq.sock"
    serve(background, path, "--type", "seqpacket", "--exec", "tr a-z A-Z")
    assert talk(path, b"abc", socket.SOCK_SEQPACKET) == b"ABC"


@pytest.mark.parametrize("pieces", [[b"hello\nDONE\n"], [b"hello\nDO", b"NE\n"], [b"DONE"]])
def test_until_stops_and_removes_the_socket(
    sockdir: Path, background: list[Background], pieces: list[bytes]
) -> None:
    path = sockdir / "u.sock"
    server = serve(background, path, "--print", "--until", "DONE")
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(os.fspath(path))
        for piece in pieces:
            client.sendall(piece)
        client.shutdown(socket.SHUT_WR)
        assert server.wait() == 0
    assert server.out == b"".join(pieces)
    assert not path.exists()


def test_until_needs_the_whole_message(sockdir: Path, background: list[Background]) -> None:
    path = sockdir / "u.sock"
    server = serve(background, path, "--echo", "--until", "DONE")
    assert talk(path, b"DONE?\nNOT DONE\n") == b"DONE?\nNOT DONE\n"
    assert talk(path, b"more\n") == b"more\n"  # still serving
    assert server.stop() == 0


def test_until_on_datagrams(sockdir: Path, background: list[Background]) -> None:
    path = sockdir / "ud.sock"
    server = serve(background, path, "--type", "dgram", "--print", "--until", "DONE")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client:
        client.sendto(b"hello", os.fspath(path))
        client.sendto(b"DONE\n", os.fspath(path))  # as nc sends a typed line
    assert server.wait() == 0
    assert server.out == b"hello\nDONE\n"
    assert not path.exists()


def test_once_serves_one_client(sockdir: Path, background: list[Background]) -> None:
    path = sockdir / "o.sock"
    server = serve(background, path, "--once", "--upper")
    assert talk(path, b"first\n") == b"FIRST\n"
    assert server.wait() == 0
    assert not path.exists()


def test_once_then_wait_then_send_as_documented(sockdir: Path) -> None:
    """The documented pattern, in a shell: wait's readiness probe (a connection that
    leaves without a byte) does not use up --once; the send that follows is served."""
    script = (
        'udskit() { "$PY" -m udskit "$@"; }\n'
        "udskit serve --echo --once once.sock &\n"
        "udskit wait once.sock && udskit send --reply once.sock hello\n"
        'wait $! && echo "server done"\n'
    )
    done = subprocess.run(
        ["sh", "-c", script],
        cwd=sockdir,
        env={**os.environ, "PY": sys.executable},
        capture_output=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    assert done.stderr == b""
    assert done.stdout == b"hello\nserver done\n"
    assert not (sockdir / "once.sock").exists()


def test_once_ends_when_the_client_leaves_before_its_echo(
    sockdir: Path, background: list[Background]
) -> None:
    path = sockdir / "gone.sock"
    server = serve(background, path, "--once", "--echo")
    # Hold the server still while a client connects, sends and leaves: when it runs
    # again, the client is gone before the echo can reach it.
    server.process.send_signal(signal.SIGSTOP)
    try:
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(os.fspath(path))
            client.sendall(b"hi\n")
    finally:
        server.process.send_signal(signal.SIGCONT)
    assert server.wait() == 0
    assert not path.exists()


def test_many_clients_at_once(sockdir: Path, background: list[Background]) -> None:
    path = sockdir / "m.sock"
    serve(background, path, "--echo", "--framing", "lines")
    clients = []
    try:
        for n in range(20):  # all connected before any is answered
            client = socket.socket(socket.AF_UNIX)
            client.settimeout(20)
            client.connect(os.fspath(path))
            clients.append(client)
            client.sendall(b"client %d\n" % n)
        for n, client in enumerate(clients):
            assert recv_line(client) == b"client %d\n" % n
    finally:
        for client in clients:
            client.close()


def test_max_clients_queues_the_rest(sockdir: Path, background: list[Background]) -> None:
    path = sockdir / "mc.sock"
    serve(background, path, "--echo", "--framing", "lines", "--max-clients", "1")
    with socket.socket(socket.AF_UNIX) as first, socket.socket(socket.AF_UNIX) as second:
        for client in (first, second):
            client.settimeout(20)
            client.connect(os.fspath(path))  # the second waits in the backlog
        first.sendall(b"1\n")
        assert recv_line(first) == b"1\n"
        second.sendall(b"2\n")
        first.close()  # frees the one slot
        assert recv_line(second) == b"2\n"


def test_verbose_names_each_peer(sockdir: Path, background: list[Background]) -> None:
    path = sockdir / "v.sock"
    socat = require("socat")
    server = serve(background, path, "--echo", "-v")
    client = Background([socat, "-t", "20", "-", f"UNIX-CONNECT:{path}"])
    background.append(client)
    client.write(b"x\n")
    client.read_until(b"x\n")
    said = server.read_until(b"process=socat", stream="stderr").decode()
    line = next(text for text in said.splitlines() if "client pid=" in text)
    assert line == (
        f"udskit: client pid={client.pid} uid={os.geteuid()} gid={os.getegid()} process=socat"
    )
    assert client.wait() == 0


def test_verbose_names_the_port_a_tcp_listener_got(background: list[Background]) -> None:
    server = Background([*UDSKIT, "serve", "--echo", "-v", "tcp:127.0.0.1:0"])
    background.append(server)
    said = server.read_until(b"Ctrl-C stops", stream="stderr").decode()
    where = said.split("serving ", 1)[1].split(" ", 1)[0]
    port = Address.parse(where).port
    assert port != 0, said
    with socket.create_connection(("127.0.0.1", port), timeout=COMMAND_TIMEOUT) as client:
        client.sendall(b"over tcp")
        assert client.recv(64) == b"over tcp"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--owner", "0", "tcp:127.0.0.1:0"], "--owner sets the owner of a socket file"),
        (["--group", "0", "@udskit-no-file"], "pass --allow-uid/--allow-gid to choose who"),
        (["--allow-uid", "0", "tcp:127.0.0.1:0"], "TCP clients carry no credentials"),
    ],
)
def test_options_that_need_a_socket_file_are_refused_without_one(
    args: list[str], message: str
) -> None:
    said = one_line_error(udskit("serve", "--echo", *args), 2)
    assert message in said, said


@pytest.mark.parametrize("action", [["--echo"], ["--print"]])
def test_verbose_says_an_unbound_datagram_sender_cannot_be_answered(
    sockdir: Path, background: list[Background], action: list[str]
) -> None:
    """socat UNIX-SENDTO sends from an unbound socket: nothing can reach it, so an echo is
    dropped; -v says so (and says nothing of the kind where no reply is due)."""
    path = sockdir / "dv.sock"
    socat = require("socat")
    server = serve(background, path, "--type", "dgram", *action, "-v")
    sender = Background([socat, "-u", "-", f"UNIX-SENDTO:{path}"])
    background.append(sender)
    sender.write(b"hello\n")
    # socat stays until its input ends, so that the server can name its process; err()
    # writes each line in one write: the read that brings its start brings all of it
    said = server.read_until(b"datagram pid=", stream="stderr").decode()
    assert sender.wait() == 0
    assert server.stop() == 0
    line = next(text for text in (said + server.err).splitlines() if "datagram pid=" in text)
    head = f"udskit: datagram pid={sender.pid} uid={os.geteuid()} gid={os.getegid()} process=socat"
    if action == ["--print"]:
        assert line == head
    else:
        assert line == head + (
            " (unbound sender: it cannot be answered; a client must bind an address to get replies)"
        )


def test_hexdump_shows_both_directions(sockdir: Path, background: list[Background]) -> None:
    path = sockdir / "x.sock"
    server = serve(background, path, "--upper", "-x")
    assert talk(path, b"hello\n") == b"HELLO\n"
    server.stop()
    assert "< pid " in server.err
    assert "68 65 6c 6c 6f 0a" in server.err
    assert "|hello.|" in server.err
    assert "|HELLO.|" in server.err


def test_mode_and_group(sockdir: Path, background: list[Background]) -> None:
    path = sockdir / "g.sock"
    group = "nogroup" if os.geteuid() == 0 else str(os.getegid())
    serve(background, path, "--echo", "--mode", "660", "--group", group)
    info = path.stat()
    assert stat.S_IMODE(info.st_mode) == 0o660
    if os.geteuid() == 0:
        assert info.st_gid == grp.getgrnam("nogroup").gr_gid


@pytest.mark.root
@pytest.mark.parametrize("kind", ["stream", "dgram"])
def test_owner(sockdir: Path, background: list[Background], kind: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root, to give the socket file away")
    path = sockdir / "o.sock"
    serve(background, path, "--type", kind, "--echo", "--owner", "nobody", "--mode", "640")
    info = path.lstat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (65534, 0o640)


def test_default_mode_is_owner_only(sockdir: Path, background: list[Background]) -> None:
    path = sockdir / "d.sock"
    serve(background, path, "--echo")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.root
def test_allow_uid_refuses_other_users(sockdir: Path, background: list[Background]) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root, to connect as a second uid")
    path = sockdir / "a.sock"
    socat = require("socat")
    server = serve(background, path, "--echo", "--mode", "666", "--allow-uid", "nobody")
    os.chmod(sockdir, 0o755)
    # root is refused: the server closes without answering (a reset, if our data is unread;
    # a broken pipe, if it closed before we sent)
    try:
        assert talk(path, b"root here\n") == b""
    except (ConnectionResetError, BrokenPipeError):
        pass
    # nobody is served (socat run as nobody: a peer with another uid, for real)
    guest = Background([socat, "-t", "20", "-", f"UNIX-CONNECT:{path}"], user=65534)
    background.append(guest)
    guest.write(b"nobody here\n")
    guest.read_until(b"nobody here\n")
    guest.close_stdin()
    assert guest.wait() == 0
    server.stop()
    assert "refused peer" in server.err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signals_stop_cleanly(sockdir: Path, background: list[Background], sig: int) -> None:
    path = sockdir / "sig.sock"
    server = serve(background, path, "--echo")
    with socket.socket(socket.AF_UNIX) as client:  # a client still connected
        client.connect(os.fspath(path))
        assert server.stop(sig) == 0
    assert not path.exists()
    assert server.err == ""


def test_refuses_a_live_socket_reclaims_a_stale_one(
    sockdir: Path, background: list[Background]
) -> None:
    path = sockdir / "live.sock"
    first = serve(background, path, "--echo")
    line = one_line_error(udskit("serve", "--echo", path), 1)
    assert f"a live server owns it: pid {first.pid}" in line
    first.process.kill()  # a crash: the file stays, nobody listens
    first.process.wait()
    assert path.is_socket()
    second = serve(background, path, "--upper")
    assert talk(path, b"back\n") == b"BACK\n"
    assert second.stop() == 0


def test_never_deletes_a_file_in_the_way(sockdir: Path) -> None:
    path = sockdir / "notes.txt"
    path.write_text("keep me\n")
    line = one_line_error(udskit("serve", "--echo", path), 1)
    assert "regular file is in the way" in line
    assert path.read_text() == "keep me\n"


def test_abstract_address(background: list[Background]) -> None:
    name = f"udskit-test-{os.getpid()}-{threading.get_ident()}"
    server = Background([*UDSKIT, "serve", "--echo", f"@{name}"])
    background.append(server)
    wait_connectable("\0" + name)
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(20)
        client.connect("\0" + name)
        client.sendall(b"abc")
        client.shutdown(socket.SHUT_WR)
        assert client.recv(100) == b"abc"
    assert server.stop() == 0
    assert "abstract names have no file permissions" in server.err  # warned, once
    # in the command's words: the options that restrict peers, not the library's keyword
    assert "--allow-uid/--allow-gid" in server.err
    assert "allow=" not in server.err


def test_a_command_that_cannot_start_is_one_line(
    sockdir: Path, background: list[Background]
) -> None:
    script = sockdir / "shout.sh"
    script.write_text("#!/bin/sh\ntr a-z A-Z\n")
    script.chmod(0o755)
    path = sockdir / "exec.sock"
    server = serve(background, path, "--exec", str(script))
    assert talk(path, b"one\n") == b"ONE\n"
    script.chmod(0o644)  # no longer executable: the next client's command cannot start
    try:
        assert talk(path, b"two\n") == b""
    except (ConnectionResetError, BrokenPipeError):
        pass  # closed with our bytes unread, or before we sent them
    script.chmod(0o755)
    assert talk(path, b"three\n") == b"THREE\n"  # and the server kept serving
    assert server.stop() == 0
    [line] = server.err.splitlines()
    assert line.startswith("udskit: pid ")
    assert line.endswith(f": permission denied: {script}")


@pytest.mark.parametrize("kind", ["stream", "dgram"])
def test_exec_commands_do_not_inherit_socket_activation(sockdir: Path, kind: str) -> None:
    """Socket-activated (LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES, the listener as fd 3),
    the server runs its --exec commands without those variables, as sd_listen_fds does."""
    path = sockdir / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, KINDS.get(kind, socket.SOCK_DGRAM))
    listener.bind(os.fspath(path))
    if kind == "stream":
        listener.listen()
    # A service manager in miniature: the listener as fd 3, LISTEN_PID the server's pid.
    activate = (
        "import os, sys; os.dup2(int(sys.argv[1]), 3); "
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1', LISTEN_FDNAMES='app'); "
        "os.execv(sys.executable, [sys.executable, '-m', 'udskit', *sys.argv[2:]])"
    )
    command = "sh -c 'env | grep ^LISTEN_ || echo no activation variables'"
    server = subprocess.Popen(
        [
            *(sys.executable, "-c", activate, str(listener.fileno())),
            *("serve", "--type", kind, "--once", "--exec", command, "fd:listen"),
        ],
        pass_fds=(listener.fileno(),),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    listener.close()  # the server has its own copy
    try:
        if kind == "stream":
            with socket.socket(socket.AF_UNIX) as client:
                client.settimeout(COMMAND_TIMEOUT)
                client.connect(os.fspath(path))
                client.shutdown(socket.SHUT_WR)  # nothing to say: the command speaks
                answer = client.recv(65536)
        else:
            with dgram_client(sockdir) as client:
                client.sendto(b"", os.fspath(path))
                answer = client.recv(65536)
        _, err = server.communicate(timeout=COMMAND_TIMEOUT)
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    assert answer == b"no activation variables\n"
    assert err == b""
    assert server.returncode == 0


def test_two_hundred_clients_at_once_are_all_answered(
    sockdir: Path, background: list[Background]
) -> None:
    path = sockdir / "many.sock"
    serve(background, path, "--echo", "--framing", "lines", "--backlog", "256")
    clients = []
    try:
        for n in range(200):  # all connected, and all have spoken, before any reads
            client = socket.socket(socket.AF_UNIX)
            client.settimeout(COMMAND_TIMEOUT)
            client.connect(os.fspath(path))
            client.sendall(b"client %d\n" % n)
            clients.append(client)
        for n, client in enumerate(clients):
            assert recv_line(client) == b"client %d\n" % n
    finally:
        for client in clients:
            client.close()


def test_exec_a_command_that_never_reads_does_not_stall_other_clients(
    sockdir: Path, background: list[Background]
) -> None:
    """One client's command stops reading its stdin while that client sends megabytes:
    that client waits (it is no longer read), the others are served meanwhile."""
    path = sockdir / "stall.sock"
    # The first line decides: "stall" never reads again; anything else is echoed.
    command = 'sh -c \'read first; [ "$first" = stall ] && exec sleep 30; echo "$first"\''
    server = serve(background, path, "--exec", command, "--framing", "lines")
    stalled = socket.socket(socket.AF_UNIX)
    stalled.settimeout(COMMAND_TIMEOUT)
    stalled.connect(os.fspath(path))
    flood_done = threading.Event()

    def flood() -> None:
        try:
            stalled.sendall(b"stall\n" + (b"y" * 1023 + b"\n") * 4096)  # 4 MiB
        except OSError:
            pass  # closed under it at the end of the test
        flood_done.set()

    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    try:
        for n in range(3):
            assert talk(path, b"hello %d\n" % n) == b"hello %d\n" % n
        assert not flood_done.is_set()  # the stalled client is held, not read on
    finally:
        stalled.shutdown(socket.SHUT_RDWR)  # wakes the blocked sendall
        sender.join(COMMAND_TIMEOUT)
        stalled.close()
    assert server.stop() == 0
    assert server.err == ""


@pytest.mark.parametrize("kind", ["stream", "seqpacket"])
def test_exec_a_command_whose_client_has_gone_is_ended(
    sockdir: Path, background: list[Background], kind: str
) -> None:
    """A command that neither writes nor ends with its stdin (``tail -f`` of a quiet
    file) would run on for nobody once its client has gone: it is ended; while a client
    that only half-closed still gets what its command writes later (above)."""
    path = sockdir / "quiet.sock"
    pidfile = sockdir / "command.pid"
    command = f"sh -c 'echo $$ > {pidfile}.tmp && mv {pidfile}.tmp {pidfile} && exec sleep 600'"
    server = serve(background, path, "--type", kind, "--exec", command)
    with socket.socket(socket.AF_UNIX, KINDS[kind]) as client:
        client.connect(os.fspath(path))
        client.sendall(b"\0\0\0\2hi" if kind == "stream" else b"hi")
        deadline = time.monotonic() + COMMAND_TIMEOUT
        while not pidfile.exists():  # the command has started
            assert time.monotonic() < deadline, "the command did not start"
            time.sleep(0.01)  # polling for a file, not synchronisation
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + EXEC_CLIENT_GONE_GRACE + COMMAND_TIMEOUT
    while _alive(pid):  # bounded: the deadline
        assert time.monotonic() < deadline, "the command runs on, its client gone"
        time.sleep(0.01)  # polling for the process to end, not synchronisation
    assert server.stop() == 0
    assert server.err == ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_stop_ends_a_datagram_command_still_running(
    sockdir: Path, background: list[Background]
) -> None:
    """A datagram's command runs beside the serving thread: SIGTERM stops the server at
    once, and ends the command (its datagram is not answered)."""
    path = sockdir / "slow.sock"
    pidfile = sockdir / "command.pid"
    command = f"sh -c 'echo $$ > {pidfile}.tmp && mv {pidfile}.tmp {pidfile} && exec sleep 30'"
    server = serve(background, path, "--type", "dgram", "--exec", command)
    with dgram_client(sockdir) as client:
        client.sendto(b"hi", os.fspath(path))
        deadline = time.monotonic() + COMMAND_TIMEOUT
        while not pidfile.exists():  # the command has started
            assert time.monotonic() < deadline, "the command did not start"
            time.sleep(0.01)  # polling for a file, not synchronisation
        pid = int(pidfile.read_text())
        assert server.stop() == 0
    assert server.err == ""
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # ended and reaped


def test_print_to_a_stdout_nobody_reads_holds_up_neither_the_server_nor_its_stop(
    sockdir: Path, background: list[Background]
) -> None:
    """--print writes beside the serving thread: while stdout is full (nobody reads the
    pipe), new clients are still taken in (-v names them) and SIGTERM still stops."""
    path = sockdir / "full.sock"
    server = serve(background, path, "--print", "-v")
    flood = socket.socket(socket.AF_UNIX)
    flood.settimeout(COMMAND_TIMEOUT)
    flood.connect(os.fspath(path))

    def send_more_than_a_pipe_holds() -> None:
        try:
            flood.sendall((b"x" * 1023 + b"\n") * 1024)  # 1 MiB; a pipe holds 64 KiB
        except OSError:
            pass  # shut down at the end of the test

    sender = threading.Thread(target=send_more_than_a_pipe_holds, daemon=True)
    sender.start()
    try:
        with socket.socket(socket.AF_UNIX) as late:
            late.connect(os.fspath(path))
            said = b""
            while said.count(b"client pid=") < 2:  # the flood's line, then the late one's
                said += server.read_until(b"\n", stream="stderr")
        assert server.stop() == 0  # its stdout is read from now on, so the stop can end
    finally:
        flood.shutdown(socket.SHUT_RDWR)
        sender.join(COMMAND_TIMEOUT)
        flood.close()


def test_exec_carries_megabytes_both_ways(sockdir: Path, background: list[Background]) -> None:
    """More than every buffer on the way (socket, queue to the command, pipe): the client
    is held back while the command catches up, and every byte comes back in order."""
    path = sockdir / "cat.sock"
    serve(background, path, "--exec", "cat")
    data = os.urandom(8 * 1024 * 1024)
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(COMMAND_TIMEOUT)
        client.connect(os.fspath(path))

        def send_all() -> None:
            client.sendall(data)
            client.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send_all, daemon=True)
        sender.start()
        got = bytearray()
        while chunk := client.recv(1 << 20):
            got += chunk
        sender.join(COMMAND_TIMEOUT)
    assert len(got) == len(data)
    assert got == data
