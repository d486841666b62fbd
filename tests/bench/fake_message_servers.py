"""Stand-ins for udskit.MessageServer and udskit.aio.start_message_server, with the API the
udskit-msg contenders are written against, built on udskit.Server and udskit.aio's
start_server: a peer process importing this module runs the contenders' own echo_server
before the real servers land."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import udskit
import udskit.aio
from udskit.bench.contenders import udskit_msg
from udskit.bench.contenders.udskit_msg import echo_server

__all__ = ["echo_server"]


class MessageServer(udskit.Server):
    def __init__(
        self,
        address: Any,
        handler: Callable[[udskit.Channel, bytes], bytes | None],
        *,
        workers: int = 0,
        max_clients: int | None = None,
        **listen_options: Any,
    ) -> None:
        def serve(channel: udskit.Channel) -> None:
            for message in channel:
                reply = handler(channel, message)
                if reply is not None:
                    channel.send(reply)

        super().__init__(address, serve, max_clients=max_clients, **listen_options)


async def start_message_server(
    address: Any,
    handler: Callable[[udskit.aio.Channel, bytes], Any],
    *,
    max_clients: int | None = None,
    **listen_options: Any,
) -> udskit.aio.Server:
    async def serve(channel: udskit.aio.Channel) -> None:
        async for message in channel:
            reply = handler(channel, message)
            if inspect.isawaitable(reply):
                reply = await reply
            if reply is not None:
                await channel.send(reply)

    return await udskit.aio.start_server(address, serve, max_clients=max_clients, **listen_options)


if not hasattr(udskit, udskit_msg.SERVER):
    setattr(udskit, udskit_msg.SERVER, MessageServer)
if not hasattr(udskit.aio, udskit_msg.AIO_SERVER):
    setattr(udskit.aio, udskit_msg.AIO_SERVER, start_message_server)
