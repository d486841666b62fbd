"""The contenders of ``udskit bench``: one module per way of moving messages."""

from .base import Contender, Transport
from .registry import ALL, BASELINE, get, names, native_build

__all__ = ["ALL", "BASELINE", "Contender", "Transport", "get", "names", "native_build"]
