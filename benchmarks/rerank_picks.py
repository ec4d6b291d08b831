"""What the scorers pick on one rerank_generation task, candidate by candidate.

For each test instruction of TASK: its reference, and the candidate that the zero-shot scorer
and the adapted scorer (adapted exactly as rerank_generation adapts it) pick, with its Rouge-L;
then the picks each selector makes most often. Reads the same candidate cache as
rerank_generation and draws nothing: run that first. Tasks come from the task pool (--data PATH;
default $CAPPLUG_DATA, then ../shared/data beside the checkout).

    python -m benchmarks.rerank_picks TASK [--data PATH] [--limit 30] [--adapt-examples 16]
        [--width 60]
"""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np

from benchmarks._tasks import add_data_option, open_data
from benchmarks.rerank_generation import (
    ADAPT_EPOCHS,
    ADAPT_LR,
    ADAPT_RANK_WEIGHT,
    CandidateCache,
    adapt_scorer,
    adaptation_examples,
    dev_tasks,
    split,
)
from capplug.data.labels import rouge_l
from capplug.errors import DataError


def picks_report(
    task: str, selectors: dict[str, object], cache: CandidateCache, test: list, width: int
) -> list[str]:
    """One line per test example (reference, then each selector's pick and its Rouge-L) and
    each selector's five most frequent picks."""

    def show(text: str) -> str:
        flat = " ".join(text.split())
        return repr(flat if len(flat) <= width else flat[: width - 1] + "…")

    frequent: dict[str, Counter] = {name: Counter() for name in selectors}
    lines = [f"{task}: {len(test)} test instructions", ""]
    for example in test:
        texts = [c["text"] for c in cache.get(example)]
        rouge = [rouge_l(t, example.targets) for t in texts]
        parts = [f"reference {show(example.targets[0])}"]
        for name, scorer in selectors.items():
            best = int(np.argmax(scorer.score(example.prompt, texts)))
            frequent[name][" ".join(texts[best].split())] += 1
            parts.append(f"{name} {show(texts[best])} ({100 * rouge[best]:.0f})")
        lines.append(" | ".join(parts))
    for name, counts in frequent.items():
        lines += ["", f"{name}, most frequent picks:"]
        lines += [f"  {n:3d} x {show(text)}" for text, n in counts.most_common(5)]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "task", help="a dev generation task (bigbench/tense, or tense), as rerank_generation runs"
    )
    parser.add_argument("--scorer", default="capplug-default")
    parser.add_argument("--limit", type=int, default=30, help="test examples")
    parser.add_argument("--adapt-examples", type=int, default=16, help="0 skips adaptation")
    parser.add_argument("--adapt-epochs", type=float, default=ADAPT_EPOCHS)
    parser.add_argument("--adapt-lr", type=float, default=ADAPT_LR)
    parser.add_argument("--adapt-rank-weight", type=float, default=ADAPT_RANK_WEIGHT)
    parser.add_argument("--seed", type=int, default=0, help="the candidate cache's seed")
    parser.add_argument("--width", type=int, default=60, help="characters shown per candidate")
    add_data_option(parser)
    args = parser.parse_args(argv)
    pool = open_data(args, parser)
    try:
        allowed = dev_tasks(pool)
    except DataError as exc:
        parser.error(str(exc))
    try:
        task = pool.resolve(args.task)
    except KeyError as exc:
        parser.error(f"TASK: {exc.args[0]}")
    if task not in allowed:
        parser.error(
            "TASK must be a dev.rerank_generation or dev.instruction_to_adapter task: "
            + ", ".join(allowed)
        )
    test, train = split(pool, task, args.limit)
    adapt_examples = adaptation_examples(task, train, args.adapt_examples)
    cache = CandidateCache(task, args.seed)
    if missing := cache.missing(test + adapt_examples):
        data = f" --data {args.data}" if args.data else ""
        parser.exit(
            2,
            f"rerank_picks: {len(missing)} instructions have no cached candidates; run "
            f"python -m benchmarks.rerank_generation{data} --tasks {task} --limit {args.limit} "
            f"--adapt-examples {args.adapt_examples} --generate-only first\n",
        )
    from capplug import Scorer

    selectors: dict[str, object] = {"zero-shot": Scorer.from_pretrained(args.scorer)}
    if adapt_examples:
        selectors["adapted"] = adapt_scorer(
            args.scorer,
            adapt_examples,
            cache,
            task,
            rank_weight=args.adapt_rank_weight,
            epochs=args.adapt_epochs,
            learning_rate=args.adapt_lr,
        )
    print("\n".join(picks_report(task, selectors, cache, test, args.width)))


if __name__ == "__main__":
    main()
