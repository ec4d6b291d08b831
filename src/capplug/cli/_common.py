"""What the command groups share: the usage error and the common options (``--data`` is
:func:`capplug.data.pool.add_data_option`, shared with the benchmarks)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from capplug.models import DEFAULT_HYPERNETWORK


class UsageError(Exception):
    """Bad input from the command line; printed as one line, exit status 2."""


def add_device_option(parser: Any) -> None:
    """``--device``, on a parser or an argument group."""
    parser.add_argument("--device", help="cpu, cuda, ... (default: the GPU if there is one)")


def add_bind_options(parser: argparse.ArgumentParser, *, port: int) -> None:
    """A server's ``--host`` and ``--port``; the server command checks them."""
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: 127.0.0.1, this machine only)",
    )
    parser.add_argument("--port", type=int, default=port, help=f"port to bind (default: {port})")


def add_api_key_option(
    parser: argparse.ArgumentParser, *, header: str = "Authorization: Bearer KEY"
) -> None:
    """A server's own ``--api-key`` (default: $CAPPLUG_API_KEY), sent in ``header``."""
    parser.add_argument(
        "--api-key",
        default=os.environ.get("CAPPLUG_API_KEY") or None,
        metavar="KEY",
        help=f"require '{header}' (default: $CAPPLUG_API_KEY); needed to bind anywhere but a "
        "loopback address",
    )


def add_hypernet_option(parser: argparse.ArgumentParser) -> None:
    """``--hypernet`` (default: the bundled one) and ``--device``."""
    parser.add_argument(
        "--hypernet",
        default=DEFAULT_HYPERNETWORK,
        metavar="REF",
        help=f"hypernetwork folder (default: the bundled {DEFAULT_HYPERNETWORK})",
    )
    add_device_option(parser)


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1; got {text!r}")
    return value


def add_feedback_options(
    parser: argparse.ArgumentParser, *, recorded: str, judged: str, scored: str
) -> None:
    """``--feedback [FILE]``, ``--task-scorers [DIR]`` and ``--auto-adapt N``: what a server
    records (``recorded``), how its clients judge it (``judged``) and what the task scorers
    score (``scored``); :func:`check_feedback_options` checks them together."""
    parser.add_argument(
        "--feedback",
        nargs="?",
        const=True,
        default=None,
        metavar="FILE",
        help=f"record {recorded} so clients can judge them ({judged}): in FILE, or without FILE "
        "in $CAPPLUG_FEEDBACK_DB or feedback.sqlite3 in the capplug home (default: record "
        "nothing)",
    )
    parser.add_argument(
        "--task-scorers",
        nargs="?",
        const=True,
        default=None,
        metavar="DIR",
        help=f"score {scored} with the task scorer adapted to its task (capplug adapt "
        "--from-feedback --task-scorers) where the guard allowed one: in DIR, or without DIR in "
        "$CAPPLUG_TASK_SCORERS or task-scorers in the capplug home; new ones are used without a "
        "restart (default: the scorer alone)",
    )
    parser.add_argument(
        "--auto-adapt",
        type=positive_int,
        metavar="N",
        help="with --feedback and --task-scorers: adapt a task's scorer as judgements arrive, "
        "with no command to run (what capplug adapt --from-feedback --task-scorers does, in a "
        "background thread): once a task has 8 judged selections, and again after every N more",
    )


def check_feedback_options(args: argparse.Namespace) -> None:
    if args.auto_adapt is not None and (args.feedback is None or args.task_scorers is None):
        raise UsageError(
            "--auto-adapt needs --feedback (where judgements go) and --task-scorers (where the "
            "adapted scorers go)"
        )
