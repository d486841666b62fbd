"""S1: a datagram server prints every datagram until one is ``DONE``, then removes its
socket file.

    python s1_datagram_print_until_done.py         # demo: server and client, temporary dir
    python s1_datagram_print_until_done.py PATH    # the server alone, on PATH

Run the server alone in one terminal, and send it datagrams from another with
``python s2_datagram_client.py PATH`` (or ``udskit connect --type dgram PATH``).

The tutorial version unlinks PATH before ``bind()`` whatever it is, even a running
server's socket. ``udskit.listen`` refuses a live socket, reclaims a stale one, and on
close removes the file only if it is still the one this server created.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading

import udskit


def print_until_done(server: udskit.DatagramListener) -> None:
    for datagram in server:
        text = datagram.data.decode(errors="replace")
        peer = datagram.peer  # None only for a datagram without credentials
        who = f"pid {peer.pid} (uid {peer.uid})" if peer else "a sender without credentials"
        print(f"server: {text!r} from {who}")
        if datagram.data == b"DONE":
            return


def serve(path: str) -> None:
    with udskit.listen(path, type="dgram") as server:
        print(f"server: listening on {path}; send DONE to stop me", flush=True)
        print_until_done(server)
    print(f"server: stopped; socket file removed: {not os.path.exists(path)}")


def demo() -> None:
    with tempfile.TemporaryDirectory(prefix="udskit-") as directory:
        path = os.path.join(directory, "print.sock")
        with udskit.listen(path, type="dgram") as server:
            printer = threading.Thread(target=print_until_done, args=(server,))
            printer.start()
            with udskit.connect(path, type="dgram") as client:
                for text in ("hello", "each datagram is one message", "DONE"):
                    client.send(text.encode())
            printer.join()
        print(f"server: stopped; socket file removed: {not os.path.exists(path)}")


if __name__ == "__main__":
    try:
        if len(sys.argv) > 1:
            serve(sys.argv[1])
        else:
            demo()
    except udskit.UdsError as exc:
        sys.exit(f"error: {exc}")
