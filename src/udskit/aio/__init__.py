"""udskit for asyncio: the blocking API's endpoints, on the standard event loop or uvloop.

``listen``, ``connect``, ``pair`` and ``serve`` take the blocking API's options and keep its
semantics (safe claim of the socket file, peer credentials, access policy, descriptor
passing, the same errors) for stream, seqpacket and datagram sockets. Channels read and write
the socket straight from the event loop, around the same sans-IO framing; ``await send()``
applies backpressure when the peer does not read. ``run(main)`` runs a coroutine on uvloop
when it is installed (``pip install 'udskit[fast]'``), else on asyncio's own loop.

See docs/aio.md for examples, the backpressure rule and the buffer sizes.
"""

from .channel import Channel
from .connecting import connect, pair
from .listening import DatagramListener, Listener, listen
from .loops import new_event_loop, run, uvloop_available
from .messageserver import MessageServer, serve_messages, start_message_server
from .server import Server, serve, start_server

__all__ = [
    "Channel",
    "DatagramListener",
    "Listener",
    "MessageServer",
    "Server",
    "connect",
    "listen",
    "new_event_loop",
    "pair",
    "run",
    "serve",
    "serve_messages",
    "start_message_server",
    "start_server",
    "uvloop_available",
]
