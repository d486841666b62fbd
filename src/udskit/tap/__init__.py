"""Watch the traffic of a live Unix socket, as tcpdump does for TCP: ``udskit tap PATH``.

:func:`start` puts a relay in front of the server's socket without a moment where PATH is
missing (see :mod:`udskit.tap.interpose`), relays every new connection (or datagram) to the
server with the client's own credentials (:mod:`udskit.tap.credentials`), and reports what
crosses it as :class:`Event` values; :meth:`Tap.stop` puts the server's socket back.
:class:`Conversation` (sans-IO) decodes what was relayed for display, :class:`Printer`
writes it as text or JSON lines, and :class:`PcapWriter` as a capture Wireshark reads.
"""

from .core import Tap, start
from .decode import FRAMINGS, Conversation, Framing, Shown, preview_text, show_packet
from .events import Closed, Data, Direction, Event, Notice, Opened, PassedFd, Refused
from .interpose import restore_displaced
from .pcap import PcapWriter
from .render import Printer

__all__ = [
    "FRAMINGS",
    "Closed",
    "Conversation",
    "Data",
    "Direction",
    "Event",
    "Framing",
    "Notice",
    "Opened",
    "PassedFd",
    "PcapWriter",
    "Printer",
    "Refused",
    "Shown",
    "Tap",
    "preview_text",
    "restore",
    "show_packet",
    "start",
]

restore = restore_displaced
