"""The ``udskit`` command line (argparse front; imports only the public API)."""

from .main import main

__all__ = ["main"]
