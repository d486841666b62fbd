"""Entry point: parse arguments, dispatch to a subcommand, turn errors into one line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import udskit


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="udskit",
        description="Unix domain sockets done right.",
        epilog="example: udskit --version",
    )
    parser.add_argument("--version", action="version", version=f"udskit {udskit.__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    parser.parse_args(argv)
    parser.print_help(sys.stdout)
    return 0
