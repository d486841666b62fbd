"""S6: SOCK_SEQPACKET is ordered and reliable like a stream, and keeps message boundaries
like datagrams: every ``send()`` arrives as exactly one ``recv()``, with no framing.

    python s6_seqpacket_boundaries.py

The client sends all its messages before reading anything; the server still receives them
one by one, never merged or split.
"""

from __future__ import annotations

import os
import tempfile
import threading

import udskit

MESSAGES = [b"one", b"two, a little longer", b"three" * 1000, b"4"]


def count_and_echo(channel: udskit.Channel) -> None:
    for message in channel:
        print(f"server: one message of {len(message)} bytes")
        channel.send(message)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="udskit-") as directory:
        path = os.path.join(directory, "packets.sock")
        with udskit.Server(path, count_and_echo, type="seqpacket") as server:
            thread = threading.Thread(target=server.serve_forever)
            thread.start()
            with udskit.connect(path, type="seqpacket", timeout=10) as client:
                for message in MESSAGES:
                    client.send(message)
                replies = [client.recv() for _ in MESSAGES]
            print(f"client: sent {len(MESSAGES)} messages, got {len(replies)} back")
            print(f"client: boundaries kept: {replies == MESSAGES}")
            server.stop()
            thread.join()


if __name__ == "__main__":
    main()
