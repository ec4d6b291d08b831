"""Two rerank_generation results side by side, on the same candidates.

Per task, one selector's Rouge-L in each run beside the best baseline, zero-shot and oracle, then
the difference of the two runs' means with a 95% interval from a paired bootstrap over the test
examples (the same draws for both runs), and each run's share of the gap to the oracle.

    python -m benchmarks.compare_rerank BEFORE.json AFTER.json [--selector adapted] [--tasks ...]

Both results must keep per-example scores (rerank_generation writes them) and have seen the same
candidates: their beam-search, self-scoring and oracle picks must agree example by example, or
the comparison stops and names the first task where they do not. Typical use: a choice about
adaptation, run twice from copies of `benchmarks/` on one candidate cache.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._report import ComparisonError, load_result, resampled_means
from benchmarks.rerank_generation import BASELINES, LABELS, percent, summarise

SAME_CANDIDATES = (*BASELINES, "oracle")  # selectors that depend on the candidates alone


def load(path: Path) -> dict[str, Any]:
    return load_result(path, "rerank_generation")


def compare(
    before: dict[str, Any],
    after: dict[str, Any],
    *,
    selector: str = "adapted",
    tasks: list[str] | None = None,
    names: tuple[str, str] = ("before", "after"),
) -> list[str]:
    """The side-by-side table and the paired difference, as Markdown lines."""
    common = [t for t in before["tasks"] if t in after["tasks"]]
    tasks = tasks or common
    if missing := [t for t in tasks if t not in common]:
        raise ComparisonError(f"not in both results: {', '.join(missing)}")
    if not tasks:
        raise ComparisonError("the two results share no task")
    rows = []
    for task in sorted(tasks):
        a, b = before["tasks"][task], after["tasks"][task]
        if "per_example" not in a or "per_example" not in b:
            raise ComparisonError(f"{task}: a result has no per-example scores (rerun it)")
        if selector not in a["per_example"] or selector not in b["per_example"]:
            raise ComparisonError(f"{task}: a result has no {selector!r} selector")
        for name in SAME_CANDIDATES:
            if name not in a["per_example"] or name not in b["per_example"]:
                continue  # results from before the selector existed (mbr)
            if a["per_example"][name] != b["per_example"][name]:
                raise ComparisonError(
                    f"{task}: the runs saw different candidates ({LABELS[name]} differs)"
                )
        rows.append((task, a, b))

    title = LABELS[selector]
    lines = [
        f"| task | best baseline | zero-shot | {title}, {names[0]} | {title}, {names[1]} | oracle |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for task, a, b in rows:
        best = max(a[c] for c in BASELINES if c in a)
        lines.append(
            f"| {task} | {best:.1f} | {a['scorer']:.1f} | {a[selector]:.1f} | "
            f"{b[selector]:.1f} | {a['oracle']:.1f} |"
        )
    mean_a, best, closed_a = summarise([a for _, a, _ in rows])
    mean_b, _, closed_b = summarise([b for _, _, b in rows])
    lines.append(
        f"| **mean** | **{best:.1f}** | **{mean_a['scorer']:.1f}** | **{mean_a[selector]:.1f}** | "
        f"**{mean_b[selector]:.1f}** | **{mean_a['oracle']:.1f}** |"
    )
    lines += [
        "",
        "Best baseline: per task, the best of beam search and self-scoring on that task; in the "
        "mean row, the best of their means over the tasks, the baseline the gap is measured from.",
    ]
    means = resampled_means(
        [
            {"before": a["per_example"][selector], "after": b["per_example"][selector]}
            for _, a, b in rows
        ]
    )
    lo, hi = np.percentile(means["after"] - means["before"], [2.5, 97.5])
    diffs = [b[selector] - a[selector] for _, a, b in rows]
    n = sum(len(a["per_example"][selector]) for _, a, _ in rows)
    lines += [
        "",
        f"{names[1]} - {names[0]}: {mean_b[selector] - mean_a[selector]:+.2f} points over "
        f"{len(rows)} task{'s' * (len(rows) != 1)} (better on {sum(d > 0 for d in diffs)}, worse on "
        f"{sum(d < 0 for d in diffs)}); 95% interval {lo:+.2f} to {hi:+.2f}, from 2,000 paired "
        f"bootstrap resamples of the {n} test examples within their tasks.",
    ]
    if selector in closed_a and selector in closed_b:
        lines.append(
            f"Gap to the oracle closed: {percent(closed_a[selector])} ({names[0]}) -> "
            f"{percent(closed_b[selector])} ({names[1]})."
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--selector", default="adapted", choices=[c for c in LABELS])
    parser.add_argument("--tasks", nargs="*", help="a subset of the tasks both results hold")
    parser.add_argument(
        "--names", nargs=2, default=("before", "after"), help="how to call the two runs"
    )
    args = parser.parse_args()
    try:
        lines = compare(
            load(args.before),
            load(args.after),
            selector=args.selector,
            tasks=args.tasks,
            names=tuple(args.names),
        )
    except ComparisonError as error:
        parser.exit(2, f"compare_rerank: {error}\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
