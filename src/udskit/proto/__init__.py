"""Sans-IO message framing: bytes in, messages out, bytes back.

Nothing in this package touches a descriptor or imports ``socket`` or ``asyncio`` (a test
checks that). The blocking and asyncio layers only loop around it.
"""

from .framing import (
    CLOSED,
    DEFAULT_MAX_FRAME,
    DEFAULT_MAX_LINE,
    HEADER,
    NEED_DATA,
    Closed,
    Control,
    Decoder,
    Framing,
    LengthPrefixed,
    Lines,
    NeedData,
    Raw,
    make_framing,
)

__all__ = [
    "CLOSED",
    "Closed",
    "Control",
    "DEFAULT_MAX_FRAME",
    "DEFAULT_MAX_LINE",
    "HEADER",
    "NEED_DATA",
    "Decoder",
    "Framing",
    "LengthPrefixed",
    "Lines",
    "NeedData",
    "Raw",
    "make_framing",
]
