"""udskit: Unix domain sockets done right.

Safe socket files, peer credentials and access policy, descriptor passing, stream,
seqpacket and datagram sockets, a threaded server, and clear errors.
"""

from .address import Address
from .channel import Channel
from .connecting import connect, pair
from .connection import Connection
from .creds import PeerCred, Policy
from .errors import (
    AddressError,
    AddressInUse,
    ConnectError,
    ConnectionClosed,
    FrameTooLarge,
    HandoverError,
    PeerRejected,
    ProtocolError,
    SocketFileError,
    Timeout,
    UdsError,
)
from .handover import Upgrader
from .listening import Datagram, DatagramListener, Listener, listen
from .messageserver import MessageServer, serve_messages
from .server import Server, serve

__version__ = "0.1.0"

__all__ = [
    "Address",
    "AddressError",
    "AddressInUse",
    "Channel",
    "ConnectError",
    "Connection",
    "ConnectionClosed",
    "Datagram",
    "DatagramListener",
    "FrameTooLarge",
    "HandoverError",
    "Listener",
    "MessageServer",
    "PeerCred",
    "PeerRejected",
    "Policy",
    "ProtocolError",
    "Server",
    "SocketFileError",
    "Timeout",
    "UdsError",
    "Upgrader",
    "__version__",
    "connect",
    "listen",
    "pair",
    "serve",
    "serve_messages",
]
