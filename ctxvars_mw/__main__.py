"""``python -m ctxvars_mw``: the command line (``demo``, ``demo --tour``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .errors import ConfigurationError


def _port(value: str) -> int:
    port = int(value)
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError("the port must be between 1 and 65535")
    return port


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m ctxvars_mw``."""
    parser = argparse.ArgumentParser(
        prog="python -m ctxvars_mw",
        description="ctxvars_mw: one immutable user context per request, for any ASGI app.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="serve the FastAPI example with demo tokens for the five tiers",
        description=(
            "Serve examples/fastapi_app.py with an in-memory setup and print ready-to-paste "
            "curl commands with demo tokens; with --tour, run a scripted tour in-process."
        ),
    )
    demo.add_argument(
        "--tour", action="store_true", help="run the scripted tour in-process (no server)"
    )
    demo.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    demo.add_argument("--port", type=_port, default=8000, help="port to bind (default 8000)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    from . import demo

    try:
        if args.tour:
            demo.tour()
        else:
            demo.serve(args.host, args.port)
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # pragma: no cover - Ctrl+C while serving
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
