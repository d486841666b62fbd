"""S8: an echo server that refuses to start when a live server owns its path, reclaims a
stale socket file, and never touches a file that is not a socket; and a client that sends
several messages and reads each echo.

    python s8_echo_refuses_live_socket.py                         # demo, temporary dir
    python s8_echo_refuses_live_socket.py serve PATH              # the server alone
    python s8_echo_refuses_live_socket.py connect PATH TEXT...    # the client alone

Start ``serve PATH`` twice: the second refuses, naming the first one's pid and uid.
Kill the first with ``kill -9``: the next ``serve PATH`` reclaims the stale file.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import threading

import udskit


def echo(channel: udskit.Channel) -> None:
    for message in channel:
        channel.send(message)


def client(path: str, texts: list[str]) -> None:
    with udskit.connect(path, timeout=10) as channel:
        for text in texts:
            channel.send(text.encode())
            print(f"client: sent {text!r}, echo {channel.recv().decode()!r}")


def demo(directory: str) -> None:
    path = os.path.join(directory, "echo.sock")
    with udskit.Server(path, echo) as server:
        thread = threading.Thread(target=server.serve_forever)
        thread.start()
        try:
            udskit.listen(path)
        except udskit.AddressInUse as exc:
            print(f"second server refused: {exc}")
        client(path, ["Hello, world!", "My name is Tom!"])
        server.stop()
        thread.join()
    print(f"server stopped; socket file removed: {not os.path.exists(path)}")

    # What a crashed server leaves behind: a socket file that nobody listens on.
    with socket.socket(socket.AF_UNIX) as crashed:
        crashed.bind(path)
    with udskit.listen(path):
        print("stale socket file reclaimed: a new server listens on it")

    notes = os.path.join(directory, "notes.txt")
    content = "a regular file, not a socket"
    with open(notes, "w") as file:
        file.write(content)
    try:
        udskit.listen(notes)
    except udskit.SocketFileError as exc:
        print(f"non-socket refused: {exc}")
    with open(notes) as file:
        print(f"the regular file is untouched: {file.read() == content}")


if __name__ == "__main__":
    try:
        if sys.argv[1:2] == ["serve"] and len(sys.argv) == 3:
            print(f"server: echoing on {sys.argv[2]} (Ctrl-C stops it)", flush=True)
            udskit.serve(sys.argv[2], echo)
        elif sys.argv[1:2] == ["connect"] and len(sys.argv) >= 4:
            client(sys.argv[2], sys.argv[3:])
        elif len(sys.argv) == 1:
            with tempfile.TemporaryDirectory(prefix="udskit-") as directory:
                demo(directory)
        else:
            sys.exit(__doc__)
    except udskit.UdsError as exc:
        sys.exit(f"error: {exc}")
