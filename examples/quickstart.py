"""Quick start: an echo server and a client over a Unix socket in a temporary directory.

Prints what crossed the socket and who was on the other end (from SO_PEERCRED).
Run: python examples/quickstart.py
"""

from __future__ import annotations

import os
import tempfile
import threading

import udskit


def echo(channel: udskit.Channel) -> None:
    peer = channel.peer
    name = peer.process_name if peer is not None else "?"
    print(f"server: client connected: {peer} ({name})")
    for message in channel:
        print(f"server: received {message!r}, echoing it back")
        channel.send(message)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="udskit-") as directory:
        path = os.path.join(directory, "echo.sock")
        with udskit.Server(path, echo) as server:
            thread = threading.Thread(target=server.serve_forever)
            thread.start()
            mode = oct(os.stat(path).st_mode & 0o777)
            print(f"server: listening on {path} (mode {mode})")
            with udskit.connect(path, timeout=5) as client:
                print(f"client: connected; the server is {client.peer}")
                for text in (b"hello", b"over a Unix socket"):
                    client.send(text)
                    print(f"client: sent {text!r}, got back {client.recv()!r}")
            server.stop()
            thread.join()
        print(f"server: stopped; socket file removed: {not os.path.exists(path)}")


if __name__ == "__main__":
    main()
