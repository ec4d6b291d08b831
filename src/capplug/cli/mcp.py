"""``capplug mcp``: capplug's selection tools for MCP clients, over stdio."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from capplug.cli._common import (
    UsageError,
    add_device_option,
    add_feedback_options,
    check_feedback_options,
)
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
            "judge with --feedback (and --task-scorers with --auto-adapt N to adapt a task's "
            "scorer as judgements arrive); lookup_adapter with --store."
        ),
    )
    mcp.add_argument(
        "--scorer",
        default=DEFAULT_SCORER,
        metavar="REF",
        help=f"scorer checkpoint (default: {DEFAULT_SCORER})",
    )
    add_feedback_options(
        mcp,
        recorded="each select's candidates and choice",
        judged="the judge tool, with its selection_id",
        scored="each select",
    )
    mcp.add_argument("--store", metavar="DIR", help="an adapter store: adds lookup_adapter")
    mcp.add_argument("--base", metavar="REF", help="the adapter store's base model")
    add_device_option(mcp)
    mcp.set_defaults(run=_run_mcp)


def _run_mcp(args: argparse.Namespace) -> int:
    check_feedback_options(args)
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
    from capplug.training.auto_adapt import as_auto_adapter

    reranker = Reranker(
        Scorer.from_pretrained(args.scorer, device=args.device),
        feedback=args.feedback,
        task_scorers=args.task_scorers,
    )
    reranker.auto_adapter = as_auto_adapter(
        args.auto_adapt, reranker.feedback, reranker.task_scorers, owner="capplug mcp"
    )
    server = create_mcp_server(scorer=reranker, store=args.store, base_model=args.base)
    server.run(transport="stdio")
    return 0
