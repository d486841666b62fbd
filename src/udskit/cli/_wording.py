"""The library's messages in the words of the command line.

The library names its keywords as a Python caller writes them (``type='seqpacket'``,
``framing='length'``, ``bind=``); each of these has a command-line option. Every error the
command prints passes through :func:`in_cli_words` (at the entry point, ``main``), the one
place that rewrites them, so that the message says what to type in a shell. Python's
notation for bytes (``bytearray(b'...')``, which some libraries put in their messages)
means nothing in a shell either: :func:`without_reprs` shows just the text.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["in_cli_words", "without_reprs"]

#: ``keyword=`` or ``keyword='value'`` for the keywords that have an option of the same
#: name and meaning: a word of its own (after a space or at the start, and followed by a
#: space, punctuation or the end), never part of a longer name (``sock.type=``,
#: ``subtype=``) nor of a path the user gave (``/srv/type=x/app.sock``).
_KEYWORD: Final = re.compile(
    r"(?:(?<=\s)|^)(type|framing|bind|allow|owner|group)=(?:'([^'\s/]*)')?(?=[\s,;:)]|$)"
)

#: Keywords whose options have other names: ``allow=`` (a whole access policy) is
#: spelt on the command line as the options that build one.
_RENAMED: Final = {"allow": "--allow-uid/--allow-gid"}

#: The limit the library names bare ("over max_frame (N bytes)", "raise max_frame"), as a
#: word of its own (not inside a path or a longer name): --max-frame sets it. (A line's
#: limit too: a channel's 'lines' framing names it max_frame, as the caller set it.)
_LIMIT: Final = re.compile(r"(?:(?<=[\s(])|^)max_frame(?=[\s,;:)=]|$)")


#: A bytes or bytearray repr: ``bytearray(b'...')`` anywhere, and ``b'...'``/``b"..."`` as
#: a word of its own (so a path such as ``b'x'.sock`` or ``/srv/b'x'/a`` stays as it is).
_BYTES_REPR: Final = re.compile(
    r"""(?<![\w])bytearray\((b(['"])((?:\\.|(?!\2).)*)\2)\)"""
    r"""|(?:(?<=[\s(])|^)b(['"])((?:\\.|(?!\4).)*)\4(?=[\s,;:)]|$)"""
)


def in_cli_words(text: str) -> str:
    """``text`` with ``type='seqpacket'`` as ``--type seqpacket``, ``bind=`` as ``--bind``,
    ``allow=`` as ``--allow-uid/--allow-gid``, ``max_frame`` as ``--max-frame``, and bytes
    shown as text (see :func:`without_reprs`)."""
    text = _KEYWORD.sub(_option, without_reprs(text))
    return _LIMIT.sub("--max-frame", text)


def without_reprs(text: str) -> str:
    """``text`` with Python's bytes notation reduced to the quoted text:
    ``illegal status line: bytearray(b'HEAD / HTTP/1.1')`` reads
    ``illegal status line: 'HEAD / HTTP/1.1'`` (escapes such as ``\\r\\n`` stay)."""
    return _BYTES_REPR.sub(_quoted, text)


def _quoted(match: re.Match[str]) -> str:
    inner = match.group(3) if match.group(1) is not None else match.group(5)
    return f"'{inner}'"


def _option(match: re.Match[str]) -> str:
    name, value = match.group(1), match.group(2)
    option = _RENAMED.get(name, f"--{name}")
    return option if value is None else f"{option} {value}"
