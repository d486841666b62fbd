"""S5: a stream server (backlog 128) that answers every message with ``thank you!``.

    python s5_thank_you_server.py         # demo: the server and three clients
    python s5_thank_you_server.py PATH    # the server alone, until Ctrl-C (or SIGTERM)

Talk to the server alone with ``udskit send --framing length PATH hello --reply``.
Each client gets its own thread; Ctrl-C or SIGTERM stops the server cleanly and removes
its socket file.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading

import udskit

REPLY = b"thank you!"


def thank(channel: udskit.Channel) -> None:
    for message in channel:
        print(f"server: {message.decode(errors='replace')!r} from {channel.peer}", flush=True)
        channel.send(REPLY)


def serve(path: str) -> None:
    print(f"server: serving {path} (Ctrl-C stops it)", flush=True)
    udskit.serve(path, thank, backlog=128)
    print(f"server: stopped; socket file removed: {not os.path.exists(path)}")


def demo() -> None:
    with tempfile.TemporaryDirectory(prefix="udskit-") as directory:
        path = os.path.join(directory, "thanks.sock")
        with udskit.Server(path, thank, backlog=128) as server:
            thread = threading.Thread(target=server.serve_forever)
            thread.start()
            for number in range(1, 4):
                with udskit.connect(path, timeout=10) as client:
                    client.send(f"message from client {number}".encode())
                    print(f"client {number}: the server replied {client.recv().decode()!r}")
            server.stop()
            thread.join()
        print(f"server: stopped; socket file removed: {not os.path.exists(path)}")


if __name__ == "__main__":
    try:
        if len(sys.argv) > 1:
            serve(sys.argv[1])
        else:
            demo()
    except udskit.UdsError as exc:
        sys.exit(f"error: {exc}")
