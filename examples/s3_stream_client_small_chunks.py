"""S3: a stream client sends a message and reads the echo back in small pieces.

    python s3_stream_client_small_chunks.py               # demo: echo server and client
    python s3_stream_client_small_chunks.py PATH [TEXT]   # the client alone

For the client alone, start a raw echo server first: ``udskit serve --echo PATH``.

With ``framing="raw"`` a stream has no message boundaries, as with plain sockets:
``recv()`` returns whatever bytes have arrived, so the client loops until it has as many
as it sent. With udskit's default framing (``"length"``), one ``recv()`` is one message.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading

import udskit

MESSAGE = "This is the message. It will be echoed back!"


def echo_in_pieces(channel: udskit.Channel) -> None:
    for data in channel:  # on a raw stream: whatever arrived
        for start in range(0, len(data), 16):  # send it back 16 bytes at a time
            channel.send(data[start : start + 16])


def read_echo(path: str, text: str) -> None:
    message = text.encode()
    with udskit.connect(path, framing="raw", timeout=10) as client:
        client.send(message)
        print(f"client: sent {len(message)} bytes")
        received = b""
        while len(received) < len(message):
            piece = client.recv()
            print(f"client: received {piece!r}")
            received += piece
    print(f"client: the echo is complete and equal: {received == message}")


def demo() -> None:
    with tempfile.TemporaryDirectory(prefix="udskit-") as directory:
        path = os.path.join(directory, "echo.sock")
        with udskit.Server(path, echo_in_pieces, framing="raw") as server:
            thread = threading.Thread(target=server.serve_forever)
            thread.start()
            read_echo(path, MESSAGE)
            server.stop()
            thread.join()


if __name__ == "__main__":
    try:
        if len(sys.argv) > 1:
            read_echo(sys.argv[1], " ".join(sys.argv[2:]) or MESSAGE)
        else:
            demo()
    except udskit.UdsError as exc:
        sys.exit(f"error: {exc}")
