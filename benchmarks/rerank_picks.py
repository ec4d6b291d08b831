"""What the scorers pick on one rerank_generation task, candidate by candidate.

For each test instruction of TASK: its reference, and the candidate that the zero-shot scorer
and the adapted scorer (adapted exactly as rerank_generation adapts it) pick, with its Rouge-L;
then the picks each selector makes most often. Reads the same candidate cache as
rerank_generation and draws nothing: run that first.

    python -m benchmarks.rerank_picks TASK [--limit 30] [--adapt-examples 16] [--width 60]
"""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task", help="a dev generation task, as rerank_generation names it")
    parser.add_argument("--scorer", default="capplug-default")
    parser.add_argument("--limit", type=int, default=30, help="test examples")
    parser.add_argument("--adapt-examples", type=int, default=16, help="0 skips adaptation")
    parser.add_argument("--adapt-epochs", type=float, default=ADAPT_EPOCHS)
    parser.add_argument("--adapt-lr", type=float, default=ADAPT_LR)
    parser.add_argument("--adapt-rank-weight", type=float, default=ADAPT_RANK_WEIGHT)
    parser.add_argument("--seed", type=int, default=0, help="the candidate cache's seed")
    parser.add_argument("--width", type=int, default=60, help="characters shown per candidate")
    args = parser.parse_args()
    if args.task not in dev_tasks():
        parser.error("TASK must be a dev.rerank_generation or dev.instruction_to_adapter task")
    test, train = split(args.task, args.limit)
    adapt_examples = adaptation_examples(args.task, train, args.adapt_examples)
    cache = CandidateCache(args.task, args.seed)
    if missing := cache.missing(test + adapt_examples):
        parser.exit(
            2,
            f"rerank_picks: {len(missing)} instructions have no cached candidates; run "
            f"rerank_generation.py --tasks {args.task} --limit {args.limit} --adapt-examples "
            f"{args.adapt_examples} --generate-only first\n",
        )
    from capplug import Scorer

    selectors: dict[str, object] = {"zero-shot": Scorer.from_pretrained(args.scorer)}
    if adapt_examples:
        selectors["adapted"] = adapt_scorer(
            args.scorer,
            adapt_examples,
            cache,
            args.task,
            rank_weight=args.adapt_rank_weight,
            epochs=args.adapt_epochs,
            learning_rate=args.adapt_lr,
        )
    print("\n".join(picks_report(args.task, selectors, cache, test, args.width)))


if __name__ == "__main__":
    main()
