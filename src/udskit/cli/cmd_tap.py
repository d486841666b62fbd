"""``udskit tap PATH``: watch the traffic of a live Unix socket, as tcpdump does for TCP."""

from __future__ import annotations

import argparse
import contextlib
import signal
import threading
import time
from types import FrameType
from typing import Final

from udskit import tap
from udskit.proto.framing import DEFAULT_MAX_FRAME
from udskit.tap.pcap import DEFAULT_PORT, PcapWriter
from udskit.tap.render import DEFAULT_MAX_BYTES, Printer

from ._options import add_drain_timeout, positive_int, seconds
from ._output import Output, err
from .main import EXIT_FAILURE, EXIT_OK, UsageError

HELP = "watch the messages of a live Unix socket (relay in front of its server, like tcpdump)"

EXAMPLE = """\
  udskit tap /run/app/gunicorn.sock                 HTTP requests and responses, decoded
  udskit tap --framing lines /tmp/echo.sock         one line per text line
  udskit tap --json --count 10 /run/app.sock        ten messages as JSON lines, then stop
  udskit tap --pcap app.pcap --pcap-port 80 /run/app.sock && tshark -r app.pcap
  udskit tap --restore /run/app.sock                put back a socket a killed tap left aside

Only connections made after the tap starts are seen. Ctrl-C or SIGTERM stops it: the
server's socket goes back in place at once, and relayed connections are left to finish,
for at most --drain-timeout seconds (Ctrl-C again cuts them at once)."""

#: How often the waiting main thread looks at --duration and the server's state; a
#: signal or --count wakes it at once.
_TICK: Final = 0.2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="PATH", help="the socket file of a running server")
    parser.add_argument(
        "--type",
        choices=("stream", "seqpacket", "dgram"),
        help="insist on this socket type (default: the server's, whatever it is)",
    )
    parser.add_argument(
        "--framing",
        choices=tap.FRAMINGS,
        default="auto",
        help="how to cut and decode the bytes for display (default: auto)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("-x", "--hex", action="store_true", help="also a hex dump of every read")
    parser.add_argument(
        "--max-bytes",
        type=int,
        default=DEFAULT_MAX_BYTES,
        metavar="N",
        help=f"show at most N bytes of each payload, 0 for all (default {DEFAULT_MAX_BYTES}); "
        "the relay always passes everything",
    )
    parser.add_argument("--pcap", metavar="FILE", help="also write a pcap capture to FILE")
    parser.add_argument(
        "--pcap-port",
        type=positive_int,
        default=DEFAULT_PORT,
        metavar="PORT",
        help=f"the server's TCP/UDP port in the capture, which picks Wireshark's dissector "
        f"(default {DEFAULT_PORT}: HTTP)",
    )
    parser.add_argument("--count", type=positive_int, metavar="N", help="stop after N messages")
    parser.add_argument("--duration", type=seconds, metavar="S", help="stop after S seconds")
    add_drain_timeout(parser, "once stopped, let relayed connections finish", ", then cut them")
    parser.add_argument(
        "--restore",
        action="store_true",
        help="put back the server's socket that a killed tap left aside, and exit",
    )


class _Stop:
    """Why and when to stop: signals, --count, --duration, the server going away."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signals = 0

    def signalled(self, signum: int, frame: FrameType | None) -> None:
        self.signals += 1
        self.event.set()


def run(args: argparse.Namespace) -> int:
    if args.restore:
        print(tap.restore(args.path), flush=True)
        return EXIT_OK
    if args.max_bytes < 0:
        raise ValueError(f"--max-bytes must be 0 or more, not {args.max_bytes}")
    max_bytes = args.max_bytes or DEFAULT_MAX_FRAME
    if args.pcap and not _have_dpkt():
        raise UsageError("--pcap needs dpkt, which the tap extra brings: pip install 'udskit[tap]'")
    stop = _Stop()
    out = Output()
    started = time.time()
    printer: Printer | None = None
    pcap_file = open(args.pcap, "wb") if args.pcap else None  # noqa: SIM115 (closed below)
    pcap: PcapWriter | None = None
    # The printer needs the socket type, known once the tap has started; the relay may
    # report a client before then: its events wait for the printer (in the tap's queue).
    ready = threading.Event()
    previous = {sig: signal.signal(sig, stop.signalled) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:

        def show(data: bytes) -> None:
            if not out.write(data):
                stop.event.set()  # nobody reads our output any more: stop, as --count does

        def on_event(event: tap.Event) -> None:
            if isinstance(event, tap.Notice):
                # The first notice says what is tapped: with how to stop, for a terminal.
                err(event.text + ("; Ctrl-C to stop" if event.text.startswith("tapping ") else ""))
                return
            ready.wait()
            if pcap is not None:
                pcap(event)
            if printer is not None:
                printer(event)

        running = tap.start(args.path, on_event, type=args.type)
        try:
            printer = Printer(
                show,
                start=started,
                framing=args.framing,
                max_bytes=max_bytes,
                as_json=args.json,
                hex_dump=args.hex,
                packets=running.type != "stream",
                count=args.count,
                done=stop.event.set,
            )
            if pcap_file is not None:
                pcap = PcapWriter(pcap_file, port=args.pcap_port, datagrams=running.type == "dgram")
        finally:
            ready.set()
        return _watch(running, stop, args.duration, args.drain_timeout)
    finally:
        for sig, handler in previous.items():
            with contextlib.suppress(ValueError):
                signal.signal(sig, handler)
        if pcap_file is not None:
            pcap_file.close()


def _have_dpkt() -> bool:
    try:
        import dpkt  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        return False
    return True


def _watch(running: tap.Tap, stop: _Stop, duration: float | None, drain: float) -> int:
    try:
        deadline = None if duration is None else time.monotonic() + duration
        while not stop.event.is_set() and not running.server_gone and not running.bypassed:
            wait = _TICK if deadline is None else min(_TICK, deadline - time.monotonic())
            if wait <= 0:
                break
            stop.event.wait(wait)
        stop.event.clear()
        running.restore()
        signals = stop.signals
        if running.active:
            err(
                f"waiting for {running.active} relayed connections to end, at most {drain:g} s "
                "(Ctrl-C cuts them)"
            )
        cut_at: float | None = time.monotonic() + drain
        while not running.drain(_TICK):
            if stop.signals > signals:
                running.cut()
            elif cut_at is not None and time.monotonic() >= cut_at:
                err(f"cutting {running.active} relayed connections still open after {drain:g} s")
                running.cut()
                cut_at = None
    except BaseException:
        running.stop(grace=0)  # the server's socket back, whatever went wrong here
        raise
    running.stop()
    if running.server_gone or running.bypassed:
        return EXIT_FAILURE
    return EXIT_OK
