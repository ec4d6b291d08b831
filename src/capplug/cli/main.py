"""The ``capplug`` command: the parser, built from one module per command group, and its run."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from capplug import __version__
from capplug.cli import adapters, data, feedback, mcp, models, score, serve, store, training
from capplug.cli._common import UsageError
from capplug.errors import CapplugError

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``capplug`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = "ERROR" if args.quiet else args.log_level.upper()
    if args.quiet:
        os.environ["TQDM_DISABLE"] = "1"  # progress bars (tqdm) stay quiet too
    logging.basicConfig(level=getattr(logging, level), format="%(message)s")
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except (UsageError, CapplugError, ValueError, TypeError, FileNotFoundError) as exc:
        print(f"capplug: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("capplug: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree; each group adds its own commands."""
    parser = argparse.ArgumentParser(
        prog="capplug",
        description="Score and rerank LLM responses with a small cross-encoder.",
    )
    parser.add_argument("--version", action="version", version=f"capplug {__version__}")
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=("debug", "info", "warning", "error"),
        help="what capplug logs to standard error (default: warning)",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="errors only: no warnings, no progress bars"
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for group in (score, training, data, models, serve, adapters, store, feedback, mcp):
        group.add_parser(sub)
    return parser
