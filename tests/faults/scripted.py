"""A real socket whose writes follow a script: short writes, errors, and exceptions that land
after part of a message went out. The other end is a real socket, so what the peer receives
is exactly what the kernel was given."""

from __future__ import annotations

import os
import socket
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

from udskit import Channel, ConnectionClosed

#: Bound on every wait, so that a regression fails instead of hanging.
WAIT = 10.0

#: One step of a script, for one send()/sendmsg() call:
#:   "ok"                 the call goes through untouched;
#:   ("short", n)         at most n bytes go out (as a signal interrupting a blocking write);
#:   exc                  the call raises ``exc`` with nothing sent (a timeout, EAGAIN);
#:   ("after", n, exc)    n bytes go out, then ``exc`` is raised (a signal handler raising
#:                        just after the write returned).
Step = Any


def tagged(tag: int, size: int) -> bytes:
    """A message of ``size`` bytes that says which it is in every part of it, so that a
    spliced or shortened one is never mistaken for another."""
    head = f"<{tag}:{size}>".encode()
    return (head * (size // len(head) + 1))[:size]


def _cut(buffers: Iterable[Any], limit: int) -> list[memoryview]:
    out: list[memoryview] = []
    for buf in buffers:
        view = memoryview(buf).cast("B")
        if limit <= 0:
            break
        out.append(view[:limit])
        limit -= len(out[-1])
    return out


class ScriptedSocket(socket.socket):
    """Wraps a real connected socket's descriptor; send() and sendmsg() follow ``script``,
    then behave normally once it runs out."""

    def __init__(
        self, real: socket.socket, script: Sequence[Step], reads: Sequence[Step] = ()
    ) -> None:
        super().__init__(real.family, real.type, fileno=real.detach())
        self.script: deque[Step] = deque(script)
        # For reads: "ok"; ("after", exc): read, then raise; ("short", n): read at most n
        # bytes (as a signal cuts a MSG_WAITALL read short); exc: raise, reading nothing.
        self.reads: deque[Step] = deque(reads)
        self.calls = 0

    def recvmsg_into(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        step = self.reads.popleft() if self.reads else "ok"
        if isinstance(step, BaseException):
            raise step
        if step != "ok" and step[0] == "short":
            return super().recvmsg_into(_cut(args[0], step[1]), *args[1:], **kwargs)
        got = super().recvmsg_into(*args, **kwargs)
        if step != "ok":
            raise step[1]  # the bytes were read, and are now in nobody's hands
        return got

    def recv_into(self, *args: Any, **kwargs: Any) -> int:  # type: ignore[override]
        # A stream channel that can receive no descriptors reads with recv_into().
        step = self.reads.popleft() if self.reads else "ok"
        got = super().recv_into(*args, **kwargs)
        if step != "ok":
            raise step[1]
        return got

    def _step(self) -> Step:
        self.calls += 1
        return self.script.popleft() if self.script else "ok"

    def send(self, data: Any, flags: int = 0) -> int:  # type: ignore[override]
        return self.sendmsg([data], [], flags)

    def sendmsg(  # type: ignore[override]
        self,
        buffers: Iterable[Any],
        ancdata: Iterable[Any] = (),
        flags: int = 0,
        address: Any = None,
    ) -> int:
        step = self._step()
        buffers = list(buffers)
        if isinstance(step, BaseException):
            raise step
        if step == "ok":
            return self._real_sendmsg(buffers, ancdata, flags, address)
        if step[0] == "short":
            return self._real_sendmsg(_cut(buffers, step[1]), ancdata, flags, address)
        _, n, exc = step
        self._real_sendmsg(_cut(buffers, n), ancdata, flags, address)
        raise exc

    def _real_sendmsg(
        self, buffers: list[Any], ancdata: Iterable[Any], flags: int, address: Any
    ) -> int:
        if address is None:
            return super().sendmsg(buffers, list(ancdata), flags)
        return super().sendmsg(buffers, list(ancdata), flags, address)


def scripted_pair(kind: int, script: Sequence[Step]) -> tuple[ScriptedSocket, socket.socket]:
    """A socketpair of ``kind``: the scripted end, and the plain other end."""
    left, right = socket.socketpair(socket.AF_UNIX, kind)
    return ScriptedSocket(left, script), right


class Drain(threading.Thread):
    """Receives everything on ``receiver`` until the stream ends (descriptors closed), so
    that a sender never waits for a reader."""

    def __init__(self, receiver: Channel) -> None:
        super().__init__()
        self.receiver = receiver
        self.got: list[bytes] = []
        self.start()

    def run(self) -> None:
        while True:
            try:
                data, fds = self.receiver.recv_fds()
            except ConnectionClosed:
                return
            for fd in fds:
                os.close(fd)
            self.got.append(data)

    def result(self) -> list[bytes]:
        self.join(WAIT)
        assert not self.is_alive()
        return self.got


class ServingInThread:
    """``server`` (a Server or MessageServer, its listener's socket already replaced by a
    scripted one) serving in a thread; ``error`` is what ``serve_forever()`` raised, if
    anything. Leaving the block stops and closes it."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve)

    def _serve(self) -> None:
        try:
            self.server.serve_forever()
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> ServingInThread:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.stop()
        self.thread.join(WAIT)
        self.server.close()
        assert not self.thread.is_alive(), "the server did not stop"
