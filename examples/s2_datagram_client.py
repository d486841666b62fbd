"""S2: an interactive datagram client: every line typed is one datagram; ``DONE`` stops
the server (and this client).

    python s2_datagram_client.py PATH     # send stdin's lines to the server at PATH
    python s2_datagram_client.py          # demo: a printing server and canned lines

Start the server first: ``python s1_datagram_print_until_done.py PATH``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
from collections.abc import Iterable

import udskit


def send_lines(path: str, lines: Iterable[str]) -> None:
    # A datagram client gets its own private socket file (so a server could answer);
    # udskit creates it in a 0700 directory and removes both on close.
    with udskit.connect(path, type="dgram") as client:
        print(f"client: connected to {path}; DONE stops the server", flush=True)
        for line in lines:
            text = line.rstrip("\n")
            if text:
                client.send(text.encode())
                print(f"client: sent {text!r}", flush=True)
            if text == "DONE":
                return


def demo() -> None:
    with tempfile.TemporaryDirectory(prefix="udskit-") as directory:
        path = os.path.join(directory, "print.sock")
        with udskit.listen(path, type="dgram") as server:

            def print_until_done() -> None:
                for datagram in server:
                    print(f"server: received {datagram.data.decode()!r}")
                    if datagram.data == b"DONE":
                        return

            printer = threading.Thread(target=print_until_done)
            printer.start()
            send_lines(path, ["hello\n", "\n", "one line, one datagram\n", "DONE\n"])
            printer.join()


if __name__ == "__main__":
    try:
        if len(sys.argv) > 1:
            send_lines(sys.argv[1], sys.stdin)
        else:
            demo()
    except udskit.UdsError as exc:
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:
        print()
