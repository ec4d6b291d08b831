"""What the command groups share: the usage error and the common options."""

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


def add_archive_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--archive", metavar="FILE", help="a bigbench-1.0.0.tar.gz you already have"
    )


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
