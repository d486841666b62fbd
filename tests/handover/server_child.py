"""A server process for the handover tests, run as ``python server_child.py FLAVOUR PATH TYPE``.

FLAVOUR is one of ``server``, ``messageserver``, ``aioserver``, ``aiomessageserver`` (the
four servers, each with ``handover=True``) or ``upgrader`` (a bare :class:`udskit.Upgrader`
that says ready when told on stdin). Every reply is ``PID:MESSAGE``, so a client can tell
which process served it.

It reports on stdout, one line each: ``listening`` once it holds the listener (taken over
or claimed), ``error TYPE: MESSAGE`` if creating the server failed, ``returned`` once
serving ended, and last ``leaked [fd, ...]``: descriptors open at the end that were not at
the start. udskit's log goes to stdout too, each line prefixed ``log:``. SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import select
import signal
import socket
import sys
import threading
from typing import Any

import udskit
import udskit.aio
import udskit.handover

PID = os.getpid()


def say(text: str) -> None:
    sys.stdout.write(text.replace("\n", " ") + "\n")
    sys.stdout.flush()


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def reply_to(message: bytes) -> bytes:
    return f"{PID}:".encode() + message


def conversational(dgram: bool) -> Any:
    def handler(channel: udskit.Channel) -> None:
        while True:
            try:
                message = channel.recv()
            except udskit.ConnectionClosed:
                return
            channel.send(reply_to(message))
            if dgram:
                return

    return handler


def aio_conversational(dgram: bool) -> Any:
    async def handler(channel: Any) -> None:
        while True:
            try:
                message = await channel.recv()
            except udskit.ConnectionClosed:
                return
            await channel.send(reply_to(message))
            if dgram:
                return

    return handler


def per_message(conn: udskit.Connection, message: bytes) -> None:
    conn.send(reply_to(message))


def run(args: argparse.Namespace, options: dict[str, Any]) -> None:
    dgram = args.type == "dgram"
    if args.flavour == "server":
        server: Any = udskit.Server(args.path, conversational(dgram), **options)
        serve_blocking(server)
    elif args.flavour == "messageserver":
        serve_blocking(udskit.MessageServer(args.path, per_message, **options))
    elif args.flavour in ("aioserver", "aiomessageserver"):
        asyncio.run(serve_aio(args, options))
    else:
        bare_upgrader(args)


def serve_blocking(server: Any) -> None:
    say("listening")
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    server.serve_forever()
    say("returned")


async def serve_aio(args: argparse.Namespace, options: dict[str, Any]) -> None:
    dgram = args.type == "dgram"
    try:
        if args.flavour == "aioserver":
            server: Any = await udskit.aio.start_server(
                args.path, aio_conversational(dgram), **options
            )
        else:
            server = await udskit.aio.start_message_server(args.path, per_message, **options)
    except udskit.UdsError as exc:
        say(f"error {type(exc).__name__}: {exc}")
        return
    say("listening")
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, server.stop)
    await server.serve_forever()
    say("returned")


def bare_upgrader(args: argparse.Namespace) -> None:
    """A framework's own server loop on an Upgrader (stream or seqpacket): ``ready`` on stdin
    says ready, and then it accepts, in a thread; ``upgrade`` calls upgrade(); ``close`` (or
    EOF) stops it. Once handed over, it stops accepting, finishes its clients and returns."""
    upgrader = udskit.Upgrader(
        args.path,
        type=args.type,
        ready_timeout=args.ready_timeout,
        mode=args.mode,
        command=json.loads(args.command) if args.command else None,
    )
    say(f"listening {upgrader.previous_pid}")
    handed_r, handed_w = os.pipe()
    upgrader.on_handed_over(lambda: os.write(handed_w, b"!"))
    stop_r, stop_w = os.pipe()
    clients: list[threading.Thread] = []
    accepting = threading.Thread(target=accept_loop, args=(upgrader.socket, stop_r, clients))
    try:
        while True:
            ready, _, _ = select.select([sys.stdin, handed_r], [], [])
            if handed_r in ready:
                say(f"handed over to {upgrader.successor_pid}")
                break
            command = sys.stdin.readline().strip()
            if command == "upgrade":
                upgrader.upgrade()
                continue
            if command != "ready":
                break
            try:
                upgrader.ready()
            except udskit.HandoverError as exc:
                say(f"error HandoverError: {exc}")
                break
            accepting.start()  # like udskit's servers: it accepts once it has said ready
            say("ready")
    finally:
        os.write(stop_w, b"!")
        if accepting.ident is not None:
            accepting.join()
        for client in clients:
            client.join(30)
        upgrader.close()
        for fd in (handed_r, handed_w, stop_r, stop_w):
            os.close(fd)
    say("returned")


def serve_one(channel: udskit.Channel) -> None:
    with channel:
        conversational(False)(channel)


def accept_loop(listener: socket.socket, stop: int, clients: list[threading.Thread]) -> None:
    listener.setblocking(False)
    while True:
        ready, _, _ = select.select([listener, stop], [], [])
        if stop in ready:
            return
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            continue
        conn.setblocking(True)
        thread = threading.Thread(target=serve_one, args=(udskit.Channel(conn),))
        thread.start()
        clients.append(thread)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("flavour")
    parser.add_argument("path")
    parser.add_argument("type")
    parser.add_argument("--drain-timeout", type=float, default=None)
    parser.add_argument("--ready-timeout", type=float, default=30.0)
    parser.add_argument("--owner", type=int, default=None)
    parser.add_argument("--max-clients", type=int, default=None)
    parser.add_argument("--hello-timeout", type=float, default=None)
    parser.add_argument("--command", default="", help="the successor's argv, as JSON")
    parser.add_argument("--mode", type=lambda text: int(text, 8), default=0o640)
    args = parser.parse_args()
    logging.basicConfig(
        stream=sys.stdout, level=logging.INFO, format="log: %(levelname)s %(message)s"
    )
    if args.hello_timeout is not None:  # a named limit, shortened for a test
        udskit.handover.HELLO_TIMEOUT = args.hello_timeout  # type: ignore[misc]
    before = open_fds()
    options: dict[str, Any] = {"type": args.type, "handover": True, "mode": args.mode}
    if args.drain_timeout is not None:
        options["drain_timeout"] = args.drain_timeout
    if args.owner is not None:
        options["owner"] = args.owner
    if args.max_clients is not None:
        options["max_clients"] = args.max_clients
    try:
        run(args, options)
    except udskit.UdsError as exc:
        say(f"error {type(exc).__name__}: {exc}")
    say(f"leaked {sorted(open_fds() - before)}")


if __name__ == "__main__":
    main()
