"""``capplug mcp``: capplug's selection tools for MCP clients, over stdio."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from capplug.cli._common import UsageError, add_device_option
from capplug.models import DEFAULT_SCORER

__all__ = ["add_parser"]


def add_parser(sub: Any) -> None:
    """``capplug mcp``."""
    mcp = sub.add_parser(
        "mcp",
        help="serve score, rank and best-of-n as MCP tools over stdio (needs capplug[mcp])",
        description=(
            "A Model Context Protocol server on standard input and output, for agents and MCP "
            "clients: tools score, rank and select (best of n through capplug's selection core); "
            "judge with --feedback; lookup_adapter with --store."
        ),
    )
    mcp.add_argument(
        "--scorer",
        default=DEFAULT_SCORER,
        metavar="REF",
        help=f"scorer checkpoint (default: {DEFAULT_SCORER})",
    )
    mcp.add_argument(
        "--feedback",
        nargs="?",
        const=True,
        default=None,
        metavar="FILE",
        help="record each select so it can be judged (the judge tool): in FILE, or by default "
        "in $CAPPLUG_FEEDBACK_DB or feedback.sqlite3 in the capplug home",
    )
    mcp.add_argument("--store", metavar="DIR", help="an adapter store: adds lookup_adapter")
    mcp.add_argument("--base", metavar="REF", help="the adapter store's base model")
    add_device_option(mcp)
    mcp.set_defaults(run=_run_mcp)


def _run_mcp(args: argparse.Namespace) -> int:
    try:
        import mcp  # noqa: F401 - checked before the scorer loads
    except ImportError as exc:
        raise UsageError(
            f"`capplug mcp` needs the MCP SDK: pip install 'capplug[mcp]' ({exc})"
        ) from exc
    from capplug.scoring import Scorer
    from capplug.selection import Reranker
    from capplug.serve.mcp import create_mcp_server

    # stdout carries the protocol: everything else goes to stderr.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, force=True)
    reranker = Reranker(Scorer.from_pretrained(args.scorer, device=args.device))
    server = create_mcp_server(
        scorer=reranker, feedback=args.feedback, store=args.store, base_model=args.base
    )
    server.run(transport="stdio")
    return 0
