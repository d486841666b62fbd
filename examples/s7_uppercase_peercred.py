"""S7: an uppercase echo server that learns each client's uid from the kernel
(SO_PEERCRED), and a client that binds its own socket path before connecting.

    python s7_uppercase_peercred.py                               # demo, temporary dir
    python s7_uppercase_peercred.py serve PATH                    # the server alone
    python s7_uppercase_peercred.py connect PATH CLIENT_PATH [TEXT...]   # the client

The tutorial server stat()s the client's socket file to guess its uid, then unlinks it.
Here ``channel.peer`` holds pid, uid and gid as the kernel vouches for them, and the
client's own path is removed by the client when it closes.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading

import udskit


def upper(channel: udskit.Channel) -> None:
    print(f"server: client {channel.peer} (from the kernel), bound at {channel.address}")
    for message in channel:
        channel.send(message.upper())


def client(path: str, client_path: str, texts: list[str]) -> None:
    with udskit.connect(path, bind=client_path, timeout=10) as channel:
        print(f"client: bound to {client_path}; the server runs as {channel.peer}")
        for text in texts:
            channel.send(text.encode())
            print(f"client: sent {text!r}, got back {channel.recv().decode()!r}")
    print(f"client: {client_path} removed on close: {not os.path.exists(client_path)}")


def demo() -> None:
    with tempfile.TemporaryDirectory(prefix="udskit-") as directory:
        path = os.path.join(directory, "upper.sock")
        with udskit.Server(path, upper) as server:
            thread = threading.Thread(target=server.serve_forever)
            thread.start()
            client(path, os.path.join(directory, "client.sock"), ["hello", "shout it"])
            server.stop()
            thread.join()


if __name__ == "__main__":
    try:
        if sys.argv[1:2] == ["serve"] and len(sys.argv) == 3:
            print(f"server: serving {sys.argv[2]} (Ctrl-C stops it)", flush=True)
            udskit.serve(sys.argv[2], upper)
        elif sys.argv[1:2] == ["connect"] and len(sys.argv) >= 4:
            client(sys.argv[2], sys.argv[3], sys.argv[4:] or ["hello"])
        elif len(sys.argv) == 1:
            demo()
        else:
            sys.exit(__doc__)
    except udskit.UdsError as exc:
        sys.exit(f"error: {exc}")
