"""S4: a socket pair shared by a parent and its forked child; each side sends and answers.

    python s4_socketpair_fork.py

``udskit.pair()`` returns two connected Channels. After ``fork()`` each process closes the
end it does not use, so that either side sees the other's exit as end of stream. (With
``multiprocessing``, pass one end to the child process as an argument instead.)
"""

from __future__ import annotations

import os
import sys

import udskit


def child(channel: udskit.Channel) -> None:
    message = channel.recv()
    print(f"child {os.getpid()}: message from parent: {message.decode()!r}", flush=True)
    channel.send(b"Hello from child!")


def parent(channel: udskit.Channel, child_pid: int) -> None:
    channel.send(b"Hello from parent!")
    response = channel.recv()
    print(f"parent {os.getpid()}: response from child {child_pid}: {response.decode()!r}")


def main() -> int:
    parent_end, child_end = udskit.pair()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            parent_end.close()
            with child_end:
                child(child_end)
            status = 0
        finally:
            os._exit(status)  # never return into the parent's code
    child_end.close()
    with parent_end:
        parent(parent_end, pid)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main())
