"""Zero-shot multiple choice on the dev tasks (docs/benchmarks.md, "Zero-shot choice").

For each task the task pool marks dev for zero_shot_choice, the first 200 examples with options
in file order: the instruction is the task's own prompt, each option of target_scores is a
candidate, the prediction is the highest-scoring option, and a hit is an option with the highest
target score. Methods:

- scorer: capplug's default scorer (or --scorer REF), no task data seen;
- fused-plain: the default selection, `Reranker()`, given the options as candidates with no
  log-probabilities (what a user comparing a few answers from APIs gets);
- fused (with lm): `Reranker(lm=...)`, where SmolLM2 judges each option and the weights for
  judged candidates apply;
- lm-sum / lm-mean: SmolLM2-135M-Instruct log-likelihood of each option given the prompt,
  summed and length-normalised (mean per token);
- cosine: cosine similarity of MiniLM sentence embeddings of instruction and option;
- chance: the expected accuracy of a uniform pick.

Tasks come from the task pool (--data PATH; default $CAPPLUG_DATA, then ../shared/data beside
the checkout). Where the pool's dev list is shorter than the original BIG-bench list, the report
says which tasks are left out. Per-method results are cached under $CAPPLUG_HOME/bench-cache, so
a rerun only computes what is missing (--fresh recomputes). Writes
benchmarks/results/zero_shot_choice.{json,md,png} (or into --results DIR).

    python -m benchmarks.zero_shot_choice [--data PATH] [--scorer REF]
        [--methods scorer,lm,cosine] [--limit 200] [--tasks ...] [--results DIR]

Choices are made on train tasks, never on dev: `--split train --fold K --out DIR` runs the same
protocol on the tasks with options of fold K of the pool's family-grouped train folds (`--folds
5`) and writes its report into DIR, leaving the committed dev results alone. Every report gives
95% paired-bootstrap intervals of the fused pick against option log-likelihood and of the scorer
against chance.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._report import bar_chart, resampled_means, task_table, write_results
from benchmarks._tasks import (
    add_data_option,
    dev_list,
    dev_list_lines,
    dev_tasks,
    open_data,
    resolve_tasks,
)
from capplug._cache import cache_home, write_json_atomic
from capplug.data import Example, Pool
from capplug.errors import DataError

RESULTS = Path(__file__).parent / "results"
BENCHMARK = "zero_shot_choice"
METHODS = ("scorer", "lm", "cosine")
LABELS = {
    "scorer": "capplug scorer",
    "fused": "capplug fused (Reranker(lm=...))",
    "fused-plain": "capplug fused, no LM (Reranker())",
    "lm-sum": "SmolLM2-135M log-lik (sum)",
    "lm-mean": "SmolLM2-135M log-lik (length-norm.)",
    "cosine": "MiniLM cosine",
    "chance": "chance",
}


def examples_of(pool: Pool, task: str, limit: int) -> list[Example]:
    """The task's first ``limit`` examples that have options, in file order."""
    chosen = [e for e in pool.load(task).examples if e.target_scores]
    return chosen[:limit]


def hits(examples: list[Example], option_scores: list[list[float]]) -> list[bool]:
    out = []
    for example, scores in zip(examples, option_scores, strict=True):
        options = list(example.target_scores)
        best = max(example.target_scores.values())
        pick = options[int(np.argmax(scores))]
        out.append(example.target_scores[pick] == best)
    return out


def picks_of(ranker: Any, examples: list[Example]) -> list[list[float]]:
    """Per example, 1.0 for the option ``ranker`` selects and 0.0 for the others."""
    picks = []
    for example in examples:
        keys = list(example.target_scores)
        chosen = ranker.select(example.prompt, keys).index
        picks.append([float(i == chosen) for i in range(len(keys))])
    return picks


def chance_rates(examples: list[Example]) -> list[float]:
    """Per example, the expected accuracy of a uniform pick among its options."""
    rates = []
    for example in examples:
        values = list(example.target_scores.values())
        rates.append(sum(v == max(values) for v in values) / len(values))
    return rates


def pairs_of(examples: list[Example]) -> tuple[list[str], list[str], list[int]]:
    prompts, options, sizes = [], [], []
    for example in examples:
        keys = list(example.target_scores)
        prompts += [example.prompt] * len(keys)
        options += keys
        sizes.append(len(keys))
    return prompts, options, sizes


def regroup(flat: list[float], sizes: list[int]) -> list[list[float]]:
    out, start = [], 0
    for size in sizes:
        out.append(flat[start : start + size])
        start += size
    return out


class Cache:
    def __init__(self, key: str, fresh: bool) -> None:
        self.path = cache_home() / "bench-cache" / f"zero_shot_choice-{key}.json"
        self.data: dict[str, Any] = (
            {} if fresh or not self.path.is_file() else json.loads(self.path.read_text())
        )

    def get(self, name: str) -> Any:
        return self.data.get(name)

    def put(self, name: str, value: Any) -> None:
        self.data[name] = value
        write_json_atomic(self.path, self.data)


def run(args: argparse.Namespace, pool: Pool) -> dict[str, Any]:
    tasks = args.tasks or dev_tasks(pool, BENCHMARK)
    data: dict[str, list[Example]] = {}
    skipped: dict[str, str] = {}
    for task in tasks:
        examples = examples_of(pool, task, args.limit)
        if examples:
            data[task] = examples
        else:
            skipped[task] = "no example has options (target_scores) to choose from"
            if args.split == "dev":
                print(f"skipping {task}: {skipped[task]}")
    if not data:
        raise SystemExit(
            f"zero_shot_choice: none of the tasks ({', '.join(tasks)}) has multiple-choice "
            f"examples in the task pool at {pool.root}"
        )
    scorer_id = _scorer_id(args.scorer)
    cache = Cache(hashlib.sha1(f"{args.limit}".encode()).hexdigest()[:8], args.fresh)
    per_task: dict[str, dict[str, float]] = {}
    timings: dict[str, float] = {}

    loaded: dict[str, Any] = {}

    def cached(method: str, key: str, compute: Any, size: int) -> Any:
        """A method's result for one task (``size`` pair scores) from the cache, else computed
        (and timed) and cached; a cached result of another size (other data) is recomputed."""
        value = cache.get(key)
        if value is None or len(value) != size:
            started = time.perf_counter()
            value = compute()
            timings[method] = timings.get(method, 0.0) + time.perf_counter() - started
            cache.put(key, value)
        return value

    def model(name: str, load: Any) -> Any:
        if name not in loaded:
            loaded[name] = load()
        return loaded[name]

    for task, examples in data.items():
        prompts, options, sizes = pairs_of(examples)
        per_example: dict[str, list[float]] = {"chance": chance_rates(examples)}
        if "scorer" in args.methods:
            flat = cached(
                "scorer",
                f"scorer:{scorer_id}:{task}",
                lambda p=prompts, o=options: model("scorer", _load_scorer(args.scorer)).score_pairs(
                    list(zip(p, o, strict=True))
                ),
                len(options),
            )
            per_example["scorer"] = hits(examples, regroup(flat, sizes))
            scores_flat = flat
        if "lm" in args.methods:
            flat = cached(
                "lm",
                f"lm:{args.lm}:{task}",
                lambda p=prompts, o=options: [
                    list(t[:2])
                    for t in model("lm", _load_lm(args.lm)).log_likelihood(
                        p, o, batch_size=8, progress=True
                    )
                ],
                len(options),
            )
            lm_flat = flat
            per_example["lm-sum"] = hits(examples, regroup([f[0] for f in flat], sizes))
            per_example["lm-mean"] = hits(examples, regroup([f[1] for f in flat], sizes))
        if "scorer" in args.methods:
            # The default selector as a user calls it: without a local LM, the options are a
            # few candidates with no log-probabilities; with one (Reranker(lm=...)), the LM
            # judges the options and the judged weights apply.
            pairs = list(zip(prompts, options, strict=True))
            scored = dict(zip(pairs, scores_flat, strict=True))
            per_example["fused-plain"] = hits(
                examples, picks_of(_fused_ranker(args.scorer, scored, None), examples)
            )
            if "lm" in args.methods:
                judged = dict(zip(pairs, lm_flat, strict=True))
                per_example["fused"] = hits(
                    examples, picks_of(_fused_ranker(args.scorer, scored, judged), examples)
                )
        if "cosine" in args.methods:
            flat = cached(
                "cosine",
                f"cosine:{task}",
                lambda p=prompts, o=options: _cosine(model("cosine", _load_encoder), p, o),
                len(options),
            )
            per_example["cosine"] = hits(examples, regroup(flat, sizes))
        row: dict[str, Any] = {"examples": len(examples), "family": pool.family(task)}
        row |= {c: float(np.mean(v)) for c, v in per_example.items()}
        print(task, {k: round(v, 3) for k, v in row.items() if k != "family"})
        row["per_example"] = {c: [float(x) for x in v] for c, v in per_example.items()}
        per_task[task] = row

    columns = [c for c in LABELS if all(c in r for r in per_task.values())]
    means = {c: float(np.mean([r[c] for r in per_task.values()])) for c in columns}
    # docs/benchmarks.md: the mean again without any task that alone moves it by over 2 points.
    movers = [
        t
        for t in per_task
        if len(per_task) > 1
        and any(
            abs(means[c] - np.mean([r[c] for u, r in per_task.items() if u != t])) > 0.02
            for c in columns
        )
    ]
    rest = [r for t, r in per_task.items() if t not in movers]
    without = {c: float(np.mean([r[c] for r in rest])) for c in columns} if movers and rest else {}
    return {
        "benchmark": BENCHMARK,
        "data": str(pool.root),
        "split": args.split,
        "fold": [args.fold, args.folds] if args.split == "train" else None,
        "dev_lists": [dev_list(pool, BENCHMARK)] if args.split == "dev" else [],
        "skipped": skipped,
        "scorer": args.scorer,
        "scorer_id": scorer_id,
        "lm": args.lm,
        "limit": args.limit,
        "tasks": per_task,
        "mean": means,
        "mean_without": {"tasks": movers, "mean": without} if without else {},
        "above_chance": {
            c: sum(r[c] > r["chance"] for r in per_task.values()) for c in columns if c != "chance"
        },
        "seconds": timings,
    }


# Each comparison: a column, and the columns it is measured against (the best of them, per
# resample): the targets are fused against option log-likelihood and the scorer against
# chance.
MARGINS = {
    "fused": ("lm-sum", "lm-mean"),
    "fused-plain": ("scorer",),
    "scorer": ("chance",),
}


def paired_intervals(result: dict[str, Any], resamples: int = 2000, seed: int = 0) -> dict:
    """95% paired-bootstrap intervals (points) of each ``MARGINS`` column over the best of its
    baselines, resampling every task's examples; empty for results without per-example hits."""
    tasks = [result["tasks"][name] for name in sorted(result["tasks"])]
    if not tasks or any("per_example" not in t for t in tasks):
        return {}
    means = resampled_means([t["per_example"] for t in tasks], resamples, seed)
    out = {}
    for column, baselines in MARGINS.items():
        present = [b for b in baselines if b in means]
        if column not in means or not present:
            continue
        best = max(present, key=lambda b: result["mean"][b])
        margin = 100 * (means[column] - np.max([means[b] for b in present], axis=0))
        out[column] = {
            "against": best,
            "margin": 100 * (result["mean"][column] - result["mean"][best]),
            "interval": tuple(float(x) for x in np.percentile(margin, [2.5, 97.5])),
        }
    return out


def interval_lines(result: dict[str, Any]) -> list[str]:
    intervals = paired_intervals(result)
    if not intervals:
        return []
    n = sum(t["examples"] for t in result["tasks"].values())
    lines = [
        f"95% intervals, from 2,000 paired bootstrap resamples of the {n} examples within their "
        "tasks:",
        "",
    ]
    for column, info in intervals.items():
        lo, hi = info["interval"]
        lines.append(
            f"- {LABELS[column]}: {info['margin']:+.1f} points against {LABELS[info['against']]}, "
            f"interval {lo:+.1f} to {hi:+.1f}."
        )
    return lines


def _fused_ranker(
    ref: str,
    scores: dict[tuple[str, str], float],
    log_likelihoods: dict[tuple[str, str], list[float]] | None,
) -> Any:
    """capplug's default selector, ``Reranker()``, or with a local LM, ``Reranker(lm=...)``,
    over already computed scorer scores and LM log-likelihoods (looked up, not rerun)."""
    from capplug.selection import Reranker, load_combiner

    class Scores:
        def score(self, instruction: str, responses: list[str]) -> list[float]:
            return [scores[(instruction, r)] for r in responses]

    class LogLikelihoods:
        def log_likelihood(self, instructions: list[str], texts: list[str]) -> list[tuple]:
            out = []
            for instruction, text in zip(instructions, texts, strict=True):
                total, mean = log_likelihoods[(instruction, text)]
                out.append((total, mean, round(total / mean) if mean else 0))
            return out

    lm = None if log_likelihoods is None else LogLikelihoods()
    return Reranker(Scores(), combiner=load_combiner(ref), lm=lm)


def _load_scorer(ref: str) -> Any:
    def load() -> Any:
        from capplug import Scorer

        return Scorer.from_pretrained(ref)

    return load


def _load_lm(ref: str) -> Any:
    def load() -> Any:
        from capplug.llms import LocalChatModel

        return LocalChatModel.from_pretrained(ref)

    return load


def _load_encoder() -> Any:
    from sentence_transformers import SentenceTransformer

    from capplug import resolve

    return SentenceTransformer(str(resolve("minilm")), device="cpu")


def _cosine(encoder: Any, prompts: list[str], options: list[str]) -> list[float]:
    a = encoder.encode(prompts, normalize_embeddings=True, batch_size=64)
    b = encoder.encode(options, normalize_embeddings=True, batch_size=64)
    return (a * b).sum(axis=1).tolist()


def _scorer_id(ref: str) -> str:
    from capplug import resolve

    folder = resolve(ref)
    weights = folder / "model.safetensors"
    stamp = (
        f"{folder}:{weights.stat().st_size}:{weights.stat().st_mtime_ns}"
        if weights.is_file()
        else str(folder)
    )
    return hashlib.sha1(stamp.encode()).hexdigest()[:12]


def report_lines(result: dict[str, Any]) -> list[str]:
    """The per-task table, the mean without any task that alone moves it, the count of tasks
    above chance, and which tasks of the original dev list are left out (where any are)."""
    columns = [c for c in LABELS if c in result["mean"]]
    lines = []
    if result.get("split") == "train":
        k, n = result["fold"]
        lines += [
            f"Train fold {k} of {n} (families never split across folds): "
            f"{len(result['tasks'])} tasks with options, at most {result['limit']} examples each"
            + (f"; {_tasks_have_none(len(result['skipped']))}" if result.get("skipped") else "."),
            "",
        ]
    lines += task_table(
        columns, LABELS, result["tasks"], result["mean"], lambda v: f"{100 * v:.1f}"
    )
    if result.get("split") == "train":
        lines += ["", *family_lines(result, columns)]
    intervals = interval_lines(result)
    if intervals:
        lines += ["", *intervals]
    extra = result.get("mean_without") or {}
    if extra:
        lines += [
            "",
            f"Mean without {', '.join(f'`{t}`' for t in extra['tasks'])} (each alone moves a "
            "mean by over 2 points): "
            + ", ".join(f"{LABELS[c]} {100 * v:.1f}" for c, v in extra["mean"].items())
            + ".",
        ]
    counts = result.get("above_chance") or {}
    if counts:
        lines += [
            "",
            f"Tasks above chance (of {len(result['tasks'])}): "
            + ", ".join(f"{LABELS[c]} {n}" for c, n in counts.items())
            + ".",
        ]
    skipped = result.get("skipped") or {}
    if skipped and result.get("split", "dev") == "dev":
        lines += ["", *(f"Left out {task}: {why}." for task, why in skipped.items())]
    notes = dev_list_lines(result.get("dev_lists") or [], result["tasks"])
    if notes:
        lines += ["", *notes]
    return lines


def family_lines(result: dict[str, Any], columns: list[str]) -> list[str]:
    """The mean over families (each family's tasks averaged first), so that a family of many
    tasks (MMLU's 57 subjects) weighs as one."""
    families: dict[str, list[dict[str, Any]]] = {}
    for row in result["tasks"].values():
        families.setdefault(row.get("family", ""), []).append(row)
    means = {
        c: float(np.mean([np.mean([r[c] for r in rows]) for rows in families.values()]))
        for c in columns
    }
    return [
        f"Mean over the {len(families)} families (each weighs the same): "
        + ", ".join(f"{LABELS[c]} {100 * v:.1f}" for c, v in means.items())
        + "."
    ]


def _tasks_have_none(count: int) -> str:
    if count == 1:
        return "1 task of the fold has none and is left out."
    return f"{count} tasks of the fold have none and are left out."


def write_report(result: dict[str, Any], folder: Path = RESULTS) -> None:
    write_results(folder, "zero_shot_choice", result, report_lines(result))
    columns = [c for c in LABELS if c in result["mean"]]
    bar_chart(
        folder / "zero_shot_choice.png",
        [LABELS[c] for c in columns],
        [100 * result["mean"][c] for c in columns],
        f"mean accuracy on {len(result['tasks'])} {result.get('split', 'dev')} zero-shot choice "
        "tasks (%)",
        xlim=100,
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scorer", default="capplug-default")
    parser.add_argument("--lm", default="smollm2-135m-instruct")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated: scorer, lm, cosine"
    )
    parser.add_argument(
        "--limit", type=int, default=200, help="examples per task (first in file order)"
    )
    parser.add_argument(
        "--tasks",
        nargs="*",
        help="a subset of the dev.zero_shot_choice tasks (bigbench/winowhy, or winowhy)",
    )
    parser.add_argument(
        "--split",
        choices=("dev", "train"),
        default="dev",
        help="train: run on the tasks with options of one family-grouped fold of the train "
        "tasks (--fold), for choices made before dev is looked at (needs --out)",
    )
    parser.add_argument("--fold", type=int, help="with --split train: which fold (from 0)")
    parser.add_argument(
        "--folds", type=int, default=5, help="with --split train: how many folds (default 5)"
    )
    parser.add_argument(
        "--out", type=Path, help="with --split train: the folder to write the report into"
    )
    parser.add_argument("--fresh", action="store_true", help="ignore cached results")
    parser.add_argument(
        "--results",
        type=Path,
        default=RESULTS,
        help="where to write the report (default: %(default)s)",
    )
    add_data_option(parser)
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods: {', '.join(sorted(unknown))}")
    if args.limit < 1:
        parser.error("--limit must be >= 1")
    if args.split == "dev" and (args.fold is not None or args.out is not None):
        parser.error("--fold and --out are for --split train")
    if args.split == "train" and (args.fold is None or args.out is None or args.tasks):
        parser.error("--split train needs --fold and --out (and takes no --tasks)")
    pool = open_data(args, parser)
    if args.split == "train":
        try:
            folds = pool.folds(args.folds)
        except ValueError as exc:
            parser.error(f"--folds: {exc}")
        if not 0 <= args.fold < len(folds):
            parser.error(f"--fold must be 0 to {len(folds) - 1}")
        args.tasks = folds[args.fold]
    else:
        try:
            allowed = dev_tasks(pool, BENCHMARK)
        except DataError as exc:
            parser.error(str(exc))
        args.tasks = resolve_tasks(parser, pool, args.tasks, allowed, "dev.zero_shot_choice")
    result = run(args, pool)
    write_report(result, args.results if args.split == "dev" else args.out)
    return result


if __name__ == "__main__":
    main()
