"""The library's messages in the words of the command line.

The library names its keywords as a Python caller writes them (``type='seqpacket'``,
``framing='length'``, ``bind=``); each of these has a command-line option. Every error the
command prints passes through :func:`in_cli_words` (at the entry point, ``main``), the one
place that rewrites them, so that the message says what to type in a shell.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["in_cli_words"]

#: ``keyword=`` or ``keyword='value'`` for the keywords that have an option of the same
#: name and meaning; not part of a longer name (``sock.type=``, ``subtype=``).
_KEYWORD: Final = re.compile(r"(?<![\w.])(type|framing|bind)=(?:'([^']*)')?")


def in_cli_words(text: str) -> str:
    """``text`` with ``type='seqpacket'`` as ``--type seqpacket`` and ``bind=`` as
    ``--bind``."""
    return _KEYWORD.sub(_option, text)


def _option(match: re.Match[str]) -> str:
    name, value = match.group(1), match.group(2)
    return f"--{name}" if value is None else f"--{name} {value}"
