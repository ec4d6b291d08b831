"""Two zero_shot_choice results side by side, on the same examples.

For each column both runs have (say, the scorer before and after training), the mean accuracy in
each run over tasks and over families, and the difference with a 95% interval from a paired
bootstrap over the examples within their tasks (the same draws for both runs).

    python -m benchmarks.compare_choice BEFORE.json AFTER.json [--columns scorer fused-plain]

Both results must keep per-example hits (zero_shot_choice writes them) over the same tasks and
examples: the chance column, which depends on the examples alone, must agree example by example,
or the comparison stops and names the first task where it does not. Typical use: a new scorer
against the bundled one on a train fold it never saw (`--split train --fold K`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._report import ComparisonError, load_result, resampled_means
from benchmarks.zero_shot_choice import LABELS


def load(path: Path) -> dict[str, Any]:
    result = load_result(path, "zero_shot_choice")
    if any("per_example" not in row for row in result["tasks"].values()):
        raise ComparisonError(f"{path}: no per-example hits (an older result); run it again")
    return result


def check_same_examples(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """The tasks both results share, in order; raises unless their examples agree."""
    tasks = [t for t in before["tasks"] if t in after["tasks"]]
    if not tasks:
        raise ComparisonError("the two results share no task")
    for task in tasks:
        a, b = before["tasks"][task]["per_example"], after["tasks"][task]["per_example"]
        if a["chance"] != b["chance"]:
            raise ComparisonError(f"{task}: the two results were not run on the same examples")
    return tasks


def compare(
    before: dict[str, Any], after: dict[str, Any], columns: Sequence[str], resamples: int = 2000
) -> dict[str, Any]:
    """Per column: the means of both runs over tasks and over families, and the paired
    bootstrap interval of the difference of the task means (points)."""
    tasks = check_same_examples(before, after)
    families: dict[str, list[str]] = {}
    for task in tasks:
        families.setdefault(after["tasks"][task].get("family", task), []).append(task)
    out: dict[str, Any] = {"tasks": len(tasks), "families": len(families), "columns": {}}
    for column in columns:
        if not all(column in r["tasks"][t]["per_example"] for r in (before, after) for t in tasks):
            raise ComparisonError(f"both results need the column {column!r} on every task")
        paired = [
            {
                "before": before["tasks"][t]["per_example"][column],
                "after": after["tasks"][t]["per_example"][column],
            }
            for t in tasks
        ]
        means = resampled_means(paired, resamples)
        diff = 100 * (means["after"] - means["before"])

        def by_family(run: dict[str, Any], c: str = column) -> float:
            return float(
                np.mean(
                    [np.mean([run["tasks"][t][c] for t in names]) for names in families.values()]
                )
            )

        out["columns"][column] = {
            "before": 100 * float(np.mean([before["tasks"][t][column] for t in tasks])),
            "after": 100 * float(np.mean([after["tasks"][t][column] for t in tasks])),
            "before_by_family": 100 * by_family(before),
            "after_by_family": 100 * by_family(after),
            "interval": [float(x) for x in np.percentile(diff, [2.5, 97.5])],
            "tasks_better": sum(
                after["tasks"][t][column] > before["tasks"][t][column] for t in tasks
            ),
            "tasks_worse": sum(
                after["tasks"][t][column] < before["tasks"][t][column] for t in tasks
            ),
        }
    return out


def lines(result: dict[str, Any]) -> list[str]:
    out = [
        f"{result['tasks']} tasks in {result['families']} families; 95% intervals of after − "
        "before from 2,000 paired bootstrap resamples of the examples within their tasks.",
        "",
        "| column | before | after | after − before | interval | by family: before | after "
        "| tasks better / worse |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | --- |",
    ]
    for column, c in result["columns"].items():
        lo, hi = c["interval"]
        out.append(
            f"| {LABELS.get(column, column)} | {c['before']:.1f} | {c['after']:.1f} | "
            f"{c['after'] - c['before']:+.1f} | {lo:+.1f} to {hi:+.1f} | "
            f"{c['before_by_family']:.1f} | {c['after_by_family']:.1f} | "
            f"{c['tasks_better']} / {c['tasks_worse']} |"
        )
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--columns", nargs="+", default=["scorer"])
    args = parser.parse_args(argv)
    try:
        result = compare(load(args.before), load(args.after), args.columns)
    except ComparisonError as error:
        parser.error(str(error))
    print("\n".join(lines(result)))
    return result


if __name__ == "__main__":
    main()
