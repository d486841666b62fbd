"""The seed scenarios of DESIGN §1, from the command line, in the forms given there."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tests.cli.conftest import UDSKIT, Background, one_line_error, serve, udskit


def test_s1_datagram_server_prints_until_done(sockdir: Path, background: list[Background]) -> None:
    path = sockdir / "s1.sock"
    server = serve(background, path, "--type", "dgram", "--print", "--until", "DONE")
    sent = udskit("send", "--type", "dgram", path, "This is the message.", "DONE")
    assert sent.code == 0, sent.err
    assert server.wait() == 0
    assert server.out == b"This is the message.\nDONE\n"
    assert not path.exists()


def test_s2_datagram_client_reads_lines(sockdir: Path, background: list[Background]) -> None:
    path = sockdir / "s2.sock"
    server = serve(background, path, "--type", "dgram", "--print", "--until", "DONE")
    result = udskit("connect", "--type", "dgram", path, stdin=b"first\nsecond\nDONE\n")
    assert result.code == 0, result.err
    assert server.wait() == 0  # DONE stopped the server
    assert server.out == b"first\nsecond\nDONE\n"
    assert not path.exists()


def test_s3_stream_client_reads_the_echo(sockdir: Path, background: list[Background]) -> None:
    path = sockdir / "s3.sock"
    serve(background, path, "--echo")
    message = "This is the message.  This will be echoed back!"
    result = udskit("send", "--reply", path, message)
    assert (result.code, result.out) == (0, message.encode() + b"\n")
    piped = udskit("connect", path, stdin=message.encode())
    assert piped.out == message.encode()


def test_s4_pair_between_parent_and_child() -> None:
    child = (
        "import os, socket\n"
        "end = socket.socket(fileno=int(os.environ['UDSKIT_FD']))\n"
        "message = end.recv(1024)\n"
        "end.sendall(b'Message from parent: ' + message + b'Hello from child!!\\n')\n"
    )
    result = udskit("pair", "--", sys.executable, "-c", child, stdin=b"Hello from parent!\n")
    assert result.code == 0, result.err
    assert result.out == b"Message from parent: Hello from parent!\nHello from child!!\n"


def test_s5_fixed_reply_to_many_clients(sockdir: Path, background: list[Background]) -> None:
    path = sockdir / "uds_socket3.txt"
    serve(background, path, "--reply", "thank you!", "--backlog", "128")
    clients = [Background([*UDSKIT, "connect", path]) for _ in range(5)]
    background.extend(clients)
    for n, client in enumerate(clients):  # all connected at once
        client.write(b"%d\n" % n)
    for client in clients:
        client.read_until(b"thank you!\n")
        assert client.wait() == 0


def test_s6_seqpacket_everywhere(sockdir: Path, background: list[Background]) -> None:
    path = sockdir / "s6.sock"
    serve(background, path, "--type", "seqpacket", "--echo")
    sent = udskit("send", "--type", "seqpacket", "--reply", path, "two\nlines", "one")
    assert sent.out == b"two\nlines\none\n"  # a message with a newline stays one message
    typed = udskit("connect", "--type", "seqpacket", path, stdin=b"a\nb\n")
    assert typed.out == b"a\nb\n"
    assert udskit("wait", "--type", "seqpacket", path).code == 0
    assert udskit("doctor", "--type", "seqpacket", path).code == 0


def test_s7_server_learns_the_client_uid(sockdir: Path, background: list[Background]) -> None:
    path = sockdir / "foo.socket"
    server = serve(background, path, "--upper", "-v")
    client_path = sockdir / "client.socket"
    result = udskit("connect", "--bind", client_path, path, stdin=b"abc\n")
    assert result.out == b"ABC\n"
    said = server.read_until(b"client.socket\n", stream="stderr").decode()
    assert f"uid={os.geteuid()} gid={os.getegid()}" in said
    assert f"address={client_path}" in said
    assert not client_path.exists()  # the client removed its own socket file


def test_s8_safe_socket_file(sockdir: Path, background: list[Background]) -> None:
    path = sockdir / "socket.sock"
    live = serve(background, path, "--echo")
    refused = one_line_error(udskit("serve", "--echo", path), 1)
    assert f"a live server owns it: pid {live.pid}" in refused
    assert f"uid {os.geteuid()}" in refused
    echoed = udskit("send", "--reply", path, "Hello, world!", "My name is Tom!")
    assert echoed.out == b"Hello, world!\nMy name is Tom!\n"
    live.process.kill()
    live.process.wait()
    reclaimed = serve(background, path, "--echo")  # the stale file is reclaimed
    assert udskit("send", "--reply", path, "again").out == b"again\n"
    assert reclaimed.stop() == 0
    assert not path.exists()
    path.write_text("not a socket")
    assert "is in the way" in one_line_error(udskit("serve", "--echo", path), 1)
    assert path.read_text() == "not a socket"


def test_s11_long_paths_work(sockdir: Path, background: list[Background]) -> None:
    deep = sockdir / ("x" * 50) / ("y" * 50)
    deep.mkdir(parents=True)
    path = deep / "server.sock"
    assert len(os.fsencode(path)) > 108
    serve(background, path, "--echo")
    assert udskit("send", "--reply", path, "far away").out == b"far away\n"
    assert udskit("connect", path, stdin=b"piped\n").out == b"piped\n"
    assert udskit("wait", path).code == 0


def test_s11_errors_name_path_length_and_limit(sockdir: Path) -> None:
    name = "n" * 100 + ".sock"
    path = sockdir / name
    line = one_line_error(udskit("serve", "--echo", path), 1)
    assert str(path) in line
    assert f"{len(os.fsencode(path))} bytes" in line
    assert "sun_path holds 107" in line
    huge = "/tmp/" + "d/" * 2100 + "s.sock"
    usage = one_line_error(udskit("send", huge, "x"), 2)
    assert "limited to 4095 bytes (PATH_MAX)" in usage
