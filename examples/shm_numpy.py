"""Pass NumPy arrays between two processes through shared memory.

The parent sends a 1000 x 1000 array of float64 (8 MB) twice: once with ``send()`` (one
copy, into the channel's shared pool) and once built in place in a ``loan()`` (no copy at
all). The child reads each one in place with ``recv_view()`` and ``numpy.frombuffer`` (no
copy either) and answers with its sum. Needs numpy (``pip install numpy``).

Run: python examples/shm_numpy.py
"""

from __future__ import annotations

import os

import numpy as np

import udskit

SHAPE = (1000, 1000)
DTYPE = np.float64


def child(channel: udskit.Channel) -> None:
    for _ in range(2):
        with channel.recv_view() as view:  # read-only, in the parent's shared memory
            array = np.frombuffer(view, dtype=DTYPE).reshape(SHAPE)
            total = float(array.sum())
            # The slot goes back to the parent once the view and every array made from it
            # are gone: the end of `with` releases the view, `del` the array.
            del array
        channel.send(repr(total).encode())


def main() -> None:
    parent, other = udskit.pair(shared_memory=True)
    pid = os.fork()
    if pid == 0:
        parent.close()
        with other:
            child(other)
        os._exit(0)
    other.close()
    with parent:
        print(f"shared memory in use: {parent.shared_memory}")

        data = np.arange(SHAPE[0] * SHAPE[1], dtype=DTYPE).reshape(SHAPE)
        parent.send(data)  # above the threshold: copied into the pool, not the socket
        print(f"sent with send(): sum is {parent.recv().decode()}")

        loan = parent.loan(data.nbytes)  # a free part of the pool, ours to fill
        filled = np.frombuffer(loan, dtype=DTYPE).reshape(SHAPE)
        filled[:] = 1.0
        del filled  # after send() the buffer is the receiver's: nothing may write to it
        parent.send(loan)
        print(f"sent with loan(): sum is {parent.recv().decode()}")
    _, status = os.waitpid(pid, 0)
    print(f"child exited with {os.waitstatus_to_exitcode(status)}")


if __name__ == "__main__":
    main()
