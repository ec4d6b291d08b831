"""``capplug score``: score one instruction's responses, or a JSONL file line by line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from typing import IO, Any

from capplug.cli._common import UsageError, add_device_option
from capplug.models import DEFAULT_SCORER


def add_parser(sub: Any) -> None:
    """Add this module's commands to the ``capplug`` subparsers."""
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
    add_device_option(score)
    score.add_argument("--json", action="store_true", help="print JSON instead of a table")
    score.set_defaults(run=_run_score)


_BULK_CHUNK = 64


def _run_score(args: argparse.Namespace) -> int:
    if args.input is None:
        if args.instruction is None or not args.response:
            raise UsageError(
                "give --instruction TEXT and at least one --response TEXT, or --input FILE"
            )
    elif args.instruction is not None or args.response:
        raise UsageError("--input cannot be combined with --instruction/--response")

    # Open the input before loading a model, so a wrong path fails at once.
    handle: IO[str] | None = None
    if args.input == "-":
        handle = sys.stdin
    elif args.input is not None:
        try:
            handle = open(args.input, encoding="utf-8")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise UsageError(f"--input: cannot read {args.input}: {exc.strerror}") from exc

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
            raise UsageError(f"{name}:{number}: not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict) or "instruction" not in row:
            raise UsageError(f"{name}:{number}: each line must be an object with 'instruction'")
        if "responses" in row:
            responses = row["responses"]
            if (
                not isinstance(responses, list)
                or not responses
                or not all(isinstance(r, str) for r in responses)
            ):
                raise UsageError(
                    f"{name}:{number}: 'responses' must be a non-empty list of strings"
                )
        elif not isinstance(row.get("response"), str):
            raise UsageError(f"{name}:{number}: give 'responses' (a list) or 'response' (a string)")
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
