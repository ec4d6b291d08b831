"""Reranking generated answers on the dev tasks (docs/benchmarks.md, "Rerank generation").

For each task the task pool marks dev for rerank_generation and instruction_to_adapter, examples
are split by the example_split rule and at most 100 test examples are used. Every test
instruction gets 17 candidates from SmolLM2-135M-Instruct (Cappy's recipe: 1 beam-search output
with 4 beams, then 4 each of plain sampling, temperature 0.9, top-k 40 and top-p 0.95; at most 64
new tokens), drawn with fixed seeds and cached so every selector sees the same candidates. Reported: mean Rouge-L F
of the candidate each selector picks, and the share of the gap between the best non-oracle
baseline (beam search, self-scoring by summed or mean log-probability) and the oracle that a
selector closes, each with a 95% interval from a paired bootstrap over the test examples (the
results JSON keeps every example's Rouge-L under every selector for this).

Tasks come from the task pool (--data PATH; default $CAPPLUG_DATA, then ../shared/data beside
the checkout). Where the pool's dev lists are shorter than the original BIG-bench lists, the
report says which tasks are left out.

Generating candidates is the slow part (4-12 s per instruction on a 2-core CPU); it is
cached per task under $CAPPLUG_HOME/bench-cache and resumes where it stopped, so the script can
be run, stopped and run again. `--generate-only` fills the cache without scoring.

    python -m benchmarks.rerank_generation [--data PATH] [--scorer REF] [--adapt-examples 32]
        [--limit 100] [--tasks ...] [--results DIR]

Writes benchmarks/results/rerank_generation.{json,md,png} (or into --results DIR).

Choices about the adapted scorer (`--adapt-rank-weight`, `--adapt-epochs`, `--adapt-lr`) are
made on train tasks, never on dev: `--split train --tasks T ... --out FILE` runs the same
protocol on generative train tasks and writes only FILE, leaving the committed dev results alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import _tasks
from benchmarks._report import bar_chart, resampled_means, task_table, write_results
from benchmarks._tasks import add_data_option, dev_list, dev_list_lines, open_data, resolve_tasks
from capplug._cache import cache_home, write_json_atomic
from capplug.data import Example, Pool
from capplug.data.labels import rouge_l
from capplug.errors import DataError
from capplug.selection import SIGNALS, rouge_agreement

RESULTS = Path(__file__).parent / "results"
BASELINES = ("beam", "lm-sum", "lm-mean", "mbr")
# what a user of an API without log-probabilities can compare against
NO_LOGPROB_BASELINES = ("beam", "mbr")
# how the benchmark adapts, chosen on train tasks (docs/benchmarks.md, "Rerank generation")
ADAPT_EPOCHS, ADAPT_LR, ADAPT_RANK_WEIGHT = 6.0, 5e-5, 1.0
GROUPS = ("rerank_generation", "instruction_to_adapter")  # the dev task groups this runs on
LABELS = {
    "beam": "beam search",
    "random": "random candidate",
    "mean": "mean of candidates",
    "lm-sum": "self-score (sum log-prob)",
    "lm-mean": "self-score (mean log-prob)",
    "mbr": "agreement (MBR, Rouge-L)",
    "scorer": "capplug scorer (zero-shot)",
    "fused": "capplug fused selection",
    "fused-no-logprobs": "fused, without log-probs",
    **{f"fused-no-{s}": f"fused, without {s}" for s in ("scorer", "agreement", "length", "echo")},
    "fused-no-logprob-mean": "fused, without logprob_mean",
    "adapted": "capplug scorer (adapted)",
    "oracle": "oracle",
}
# Each fused column: the signals it may use (the default selector's weights for that subset).

FUSED = {
    "fused": SIGNALS,
    "fused-no-logprobs": ("scorer", "agreement", "length", "echo"),
    **{
        f"fused-no-{name.replace('_', '-')}": tuple(s for s in SIGNALS if s != name)
        for name in ("scorer", "agreement", "length", "logprob_mean", "echo")
    },
}
# The selectors whose margin over the best baseline gets an interval, with their baselines.
MARGINS = {
    "scorer": BASELINES,
    "fused": BASELINES,
    "fused-no-logprobs": NO_LOGPROB_BASELINES,
    "adapted": BASELINES,
}


class ScoreCache:
    """The scorer's score of every cached candidate, per (scorer, task), written as it goes."""

    def __init__(self, task: str, seed: int, scorer_ref: str) -> None:
        name = task.replace("/", "__")
        tag = hashlib.sha1(_scorer_stamp(scorer_ref).encode()).hexdigest()[:12]
        self.path = cache_home() / "bench-cache" / f"rerank-scores-{tag}-{name}-seed{seed}.json"
        self.data: dict[str, list[float]] = (
            json.loads(self.path.read_text()) if self.path.is_file() else {}
        )
        self.dirty = False

    def scores(self, scorer: Any, example: Example, texts: list[str]) -> list[float]:
        key = str(example.index)
        if key not in self.data or len(self.data[key]) != len(texts):
            distinct = list(dict.fromkeys(texts))
            by_text = dict(zip(distinct, scorer().score(example.prompt, distinct), strict=True))
            self.data[key] = [float(by_text[t]) for t in texts]
            self.dirty = True
        return self.data[key]

    def save(self) -> None:
        if self.dirty:
            write_json_atomic(self.path, self.data)
            self.dirty = False


def _scorer_stamp(ref: str) -> str:
    """What identifies a scorer's weights: its folder and the size of its weight files."""
    from capplug import resolve

    try:
        folder = resolve(ref)
    except Exception:  # an unresolvable reference is identified by its name
        return ref
    files = sorted(p for p in folder.glob("*.safetensors"))
    return ":".join([str(folder), *(f"{p.name}:{p.stat().st_size}" for p in files)])


class _Lookup:
    """A scorer that answers from the scores already computed for the current example."""

    table: dict[str, float]

    def score(self, instruction: Any, responses: list[str]) -> list[float]:
        return [self.table[r] for r in responses]


def split(pool: Pool, task: str, limit: int) -> tuple[list[Example], list[Example]]:
    """A task's test examples by the example_split rule (at most ``limit``, in file order) and
    its train examples (all of them), each with references."""
    examples = [e for e in pool.load(task).examples if e.targets]
    test = [e for e in examples if e.is_test][:limit]
    train = [e for e in examples if not e.is_test]
    return test, train


def adaptation_examples(task: str, train: list[Example], n: int) -> list[Example]:
    """The ``n`` train examples a task's scorer is adapted on (a fixed draw per task)."""
    return random.Random(task).sample(train, min(n, len(train)))


class CandidateCache:
    """Candidates per (task, example), written after every batch so generation resumes."""

    def __init__(self, task: str, seed: int) -> None:
        name = task.replace("/", "__")
        self.path = cache_home() / "bench-cache" / f"rerank-{name}-seed{seed}.json"
        self.data: dict[str, list[dict[str, Any]]] = (
            json.loads(self.path.read_text()) if self.path.is_file() else {}
        )

    def missing(self, examples: list[Example]) -> list[Example]:
        return [e for e in examples if str(e.index) not in self.data]

    def fill(self, model: Any, examples: list[Example], *, seed: int, batch: int) -> None:
        todo = self.missing(examples)
        for start in range(0, len(todo), batch):
            chunk = todo[start : start + batch]
            sampled = model.sample_candidates(
                [e.prompt for e in chunk], seed=seed, batch_size=batch
            )
            for example, candidates in zip(chunk, sampled, strict=True):
                self.data[str(example.index)] = [
                    {
                        "text": c.text,
                        "strategy": c.strategy,
                        "sum_logprob": c.sum_logprob,
                        "mean_logprob": c.mean_logprob,
                    }
                    for c in candidates
                ]
            write_json_atomic(self.path, self.data)

    def get(self, example: Example) -> list[dict[str, Any]]:
        return self.data[str(example.index)]


def _tokens(candidate: dict[str, Any]) -> int:
    """Token count of a cached candidate from its sum and mean (caches before n_tokens)."""
    mean = candidate["mean_logprob"]
    return max(1, round(candidate["sum_logprob"] / mean)) if mean else 1


def adapt_scorer(
    base: str,
    train: list[Example],
    cache: CandidateCache,
    task: str,
    rank_weight: float = 0.0,
    epochs: float = ADAPT_EPOCHS,
    learning_rate: float = ADAPT_LR,
    clip: bool = False,
) -> Any:
    """The default scorer adapted on the task's train examples (candidates labelled by Rouge-L;
    with ``clip``, also each candidate's first line and first sentence, as stage 4 trained)."""
    from capplug import Scorer
    from capplug.data.labels import label_candidates, label_clipped, reference_rows
    from capplug.data.rows import LabelledPair
    from capplug.training.scorer import TrainConfig, train_scorer

    rows = list(reference_rows(train, seed=0))
    for example in train:
        sampled = label_candidates(
            example, [(c["text"], c["strategy"]) for c in cache.get(example)]
        )
        rows += sampled + (label_clipped(sampled, example.targets) if clip else [])
    pairs = [
        LabelledPair(r.instruction, r.response, r.label, f"{r.task}#{r.example_id}") for r in rows
    ]
    scorer = Scorer.from_pretrained(base)
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(
            epochs=epochs,
            learning_rate=learning_rate,
            batch_size=16,
            eval_every=10**9,
            patience=None,
            rank_weight=rank_weight,
        )
        train_scorer(
            scorer, pairs, Path(out) / "run", config=config, progress=False, data_description=task
        )
    return scorer


def evaluate(args: argparse.Namespace, pool: Pool) -> dict[str, Any]:
    tasks = args.tasks or dev_tasks(pool)
    model = fused = None
    lookup = _Lookup()
    loaded: list[Any] = []

    def load_scorer() -> Any:
        """The scorer, loaded the first time a score is not in the cache."""
        if not loaded:
            from capplug import Scorer

            loaded.append(Scorer.from_pretrained(args.scorer))
        return loaded[0]

    per_task: dict[str, dict[str, float]] = {}
    for task in tasks:
        test, train = split(pool, task, args.limit)
        adapt_examples = adaptation_examples(task, train, args.adapt_examples)
        cache = CandidateCache(task, args.seed)
        if cache.missing(test + adapt_examples):
            if model is None:
                from capplug.llms import LocalChatModel

                model = LocalChatModel.from_pretrained(args.lm)
            cache.fill(model, test + adapt_examples, seed=args.seed, batch=args.batch)
        if args.generate_only:
            print(f"{task}: {len(test) + len(adapt_examples)} instructions cached")
            continue
        if fused is None:
            from capplug.selection import Reranker, load_combiner

            combiner = load_combiner(args.scorer)
            fused = {
                name: Reranker(lookup, combiner=combiner, signals=signals)
                for name, signals in FUSED.items()
            }
        score_cache = ScoreCache(task, args.seed, args.scorer)
        adapted = (
            adapt_scorer(
                args.scorer,
                adapt_examples,
                cache,
                task,
                rank_weight=args.adapt_rank_weight,
                epochs=args.adapt_epochs,
                learning_rate=args.adapt_lr,
                clip=args.adapt_clip,
            )
            if adapt_examples
            else None
        )
        rng = random.Random(args.seed)
        picks: dict[str, list[float]] = {name: [] for name in LABELS}
        for example in test:
            candidates = cache.get(example)
            texts = [c["text"] for c in candidates]
            rouge = [rouge_l(t, example.targets) for t in texts]
            beam = next(i for i, c in enumerate(candidates) if c["strategy"].startswith("beam"))
            picks["beam"].append(rouge[beam])
            picks["random"].append(rouge[rng.randrange(len(texts))])
            picks["mean"].append(float(np.mean(rouge)))
            picks["lm-sum"].append(rouge[int(np.argmax([c["sum_logprob"] for c in candidates]))])
            picks["lm-mean"].append(rouge[int(np.argmax([c["mean_logprob"] for c in candidates]))])
            scores = score_cache.scores(load_scorer, example, texts)
            lookup.table = dict(zip(texts, scores, strict=True))
            picks["scorer"].append(rouge[int(np.argmax(scores))])
            picks["mbr"].append(rouge[int(np.argmax(rouge_agreement(texts)))])
            sums = [c["sum_logprob"] for c in candidates]
            counts = [c.get("n_tokens") or _tokens(c) for c in candidates]
            for name, ranker in fused.items():
                pick = ranker.select(example.prompt, texts, logprobs=sums, token_counts=counts)
                picks[name].append(rouge[pick.index])
            if adapted is not None:
                picks["adapted"].append(rouge[int(np.argmax(adapted.score(example.prompt, texts)))])
            picks["oracle"].append(max(rouge))
        score_cache.save()
        row: dict[str, Any] = {name: 100 * float(np.mean(v)) for name, v in picks.items() if v}
        print(task, {k: round(v, 1) for k, v in row.items()})
        row["examples"] = len(test)
        # Each test example's Rouge-L under every selector, for paired intervals (interval_lines).
        row["per_example"] = {
            name: [round(100 * x, 3) for x in v] for name, v in picks.items() if v
        }
        per_task[task] = row
    if args.generate_only:
        return {}
    mean, best_baseline, closed = summarise(list(per_task.values()))
    dev = args.split == "dev"
    return {
        "benchmark": "rerank_generation",
        "data": str(pool.root),
        # each dev group's tasks in this run, in list order (for the per-group table)
        "groups": {
            group: [t for t in pool.names("dev", benchmark=group) if t in per_task]
            for group in (GROUPS if dev else ())
        },
        "dev_lists": [dev_list(pool, group) for group in GROUPS] if dev else [],
        "scorer": args.scorer,
        "lm": args.lm,
        "limit": args.limit,
        "adapt_examples": args.adapt_examples,
        "adapt_rank_weight": args.adapt_rank_weight,
        "adapt_epochs": args.adapt_epochs,
        "adapt_lr": args.adapt_lr,
        "adapt_clip": args.adapt_clip,
        "split": args.split,
        "seed": args.seed,
        "tasks": per_task,
        "mean": mean,
        "best_baseline": best_baseline,
        "gap_closed": closed,
    }


def summarise(rows: list[dict[str, float]]) -> tuple[dict[str, float], float, dict[str, float]]:
    """Mean per selector over ``rows`` (tasks), the best baseline, and each scorer's gap closed."""
    columns = [c for c in LABELS if all(c in r for r in rows)]
    mean = {c: float(np.mean([r[c] for r in rows])) for c in columns}
    best_baseline = max(mean[b] for b in BASELINES if b in mean)  # older results lack mbr
    gap = mean["oracle"] - best_baseline
    closed = {c: (mean[c] - best_baseline) / gap for c in MARGINS if c in mean and gap > 0}
    return mean, best_baseline, closed


def percent(share: float) -> str:
    """A share as a whole percentage; a share that rounds to zero prints as 0%, never -0%."""
    return f"{round(100 * share)}%"


def paired_intervals(
    result: dict[str, Any], resamples: int = 2000, seed: int = 0
) -> dict[str, dict[str, tuple[float, float]]]:
    """95% paired-bootstrap intervals, per scorer, of its margin over the best baseline (points)
    and of its share of the gap to the oracle.

    Recomputes what ``summarise`` reports on every resample of ``resampled_means`` (the best
    baseline is picked again in each). Empty when a task's result lacks its per-example scores."""
    tasks = [result["tasks"][name] for name in sorted(result["tasks"])]  # same draws on reload
    if not tasks or any("per_example" not in t for t in tasks):
        return {}
    means = resampled_means([t["per_example"] for t in tasks], resamples, seed)
    out = {}
    for c, wanted in MARGINS.items():
        baselines = [b for b in wanted if b in means]
        if c not in means or not baselines:
            continue
        best = np.max([means[b] for b in baselines], axis=0)
        gap = means["oracle"] - best
        margin = means[c] - best
        share = np.divide(margin, gap, out=np.full_like(margin, np.nan), where=gap > 0)
        share = share[~np.isnan(share)]  # resamples with no gap to close have no share
        out[c] = {
            "margin": tuple(np.percentile(margin, [2.5, 97.5])),
            "gap_closed": tuple(np.percentile(share, [2.5, 97.5])) if share.size else (np.nan,) * 2,
        }
    return out


def interval_lines(result: dict[str, Any]) -> list[str]:
    """The paired intervals as Markdown lines (none for results without per-example scores)."""
    intervals = paired_intervals(result)
    if not intervals:
        return []
    n = sum(t["examples"] for t in result["tasks"].values())
    lines = [
        f"95% intervals, from 2,000 paired bootstrap resamples of the {n} test examples within "
        "their tasks:",
        "",
    ]
    for c, interval in intervals.items():
        baselines = MARGINS[c]
        best = max((b for b in baselines if b in result["mean"]), key=result["mean"].get)
        margin = result["mean"][c] - result["mean"][best]
        gap = result["mean"]["oracle"] - result["mean"][best]
        (lo, hi), (slo, shi) = interval["margin"], interval["gap_closed"]
        which = "best baseline" if baselines == BASELINES else "best baseline without log-probs"
        closed = (
            f"gap closed {percent(margin / gap)}, interval {percent(slo)} to {percent(shi)}"
            if gap > 0
            else "no gap to close (the oracle is no better)"
        )
        lines.append(
            f"- {LABELS[c]}: {margin:+.1f} points against the {which} ({LABELS[best]}), "
            f"interval {lo:+.1f} to {hi:+.1f}; {closed}."
        )
    return lines


def group_lines(result: dict[str, Any]) -> list[str]:
    """Per dev group (rerank_generation, instruction_to_adapter): a Markdown table of its means
    (none for a run on one group, on train tasks, or a result that does not record its groups)."""
    groups = {
        f"{len(tasks)} `dev.{group}`": tasks
        for group, names in (result.get("groups") or {}).items()
        if (tasks := [t for t in names if t in result["tasks"]])
    }
    if len(groups) < 2:
        return []
    short = {
        "scorer": "zero-shot",
        "fused": "fused",
        "fused-no-logprobs": "fused, no log-probs",
        "adapted": "adapted",
    }
    scorers = [c for c in short if c in result["mean"]]
    names = [short[c] for c in scorers]
    lines = [
        f"| tasks | best baseline | {' | '.join(names)} | oracle | gap closed ({' / '.join(names)}) |",
        "| --- | " + " | ".join("---:" for _ in range(len(scorers) + 3)) + " |",
    ]
    for name, tasks in groups.items():
        mean, best, closed = summarise([result["tasks"][t] for t in tasks])
        shares = " / ".join(percent(closed[c]) for c in scorers if c in closed)
        lines.append(
            f"| {name} | {best:.1f} | "
            + " | ".join(f"{mean[c]:.1f}" for c in scorers)
            + f" | {mean['oracle']:.1f} | {shares} |"
        )
    return lines


def dev_tasks(pool: Pool) -> list[str]:
    """The pool's dev tasks of both groups, in list order."""
    return _tasks.dev_tasks(pool, *GROUPS)


def columns_of(result: dict[str, Any]) -> list[str]:
    """The selectors a result holds, in LABELS order (its JSON keeps keys sorted)."""
    return [c for c in LABELS if c in result["mean"]]


def report_lines(result: dict[str, Any]) -> list[str]:
    """The per-task table and each scorer's share of the gap, as Markdown lines."""
    columns = columns_of(result)
    # the JSON keeps task names sorted: dev tasks go back into list order
    listed = [t for names in (result.get("groups") or {}).values() for t in names]
    order = {task: i for i, task in enumerate(dict.fromkeys(listed))}
    tasks = {t: result["tasks"][t] for t in sorted(result["tasks"], key=lambda t: order.get(t, -1))}
    lines = task_table(columns, LABELS, tasks, result["mean"], lambda v: f"{v:.1f}")
    lines.append("")
    for name in sorted(result["gap_closed"], key=list(LABELS).index):
        share = result["gap_closed"][name]
        where = (
            f"closes {percent(share)} of the gap between the best baseline and the oracle."
            if share >= 0
            else f"is below the best baseline, by {percent(-share)} of its gap to the oracle."
        )
        lines.append(f"{LABELS[name]}: {where}")
    intervals = interval_lines(result)
    if intervals:
        lines += ["", *intervals]
    groups = group_lines(result)
    if groups:
        lines += ["", "By group of dev tasks (means over each group's tasks):", "", *groups]
    notes = dev_list_lines(result.get("dev_lists") or [], result["tasks"])
    if notes:
        lines += ["", *notes]
    return lines


def write_report(result: dict[str, Any], folder: Path = RESULTS) -> None:
    write_results(folder, "rerank_generation", result, report_lines(result))
    columns = columns_of(result)
    bar_chart(
        folder / "rerank_generation.png",
        [LABELS[c] for c in columns],
        [result["mean"][c] for c in columns],
        f"mean Rouge-L of the chosen candidate, {len(result['tasks'])} dev generation tasks",
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scorer", default="capplug-default")
    parser.add_argument("--lm", default="smollm2-135m-instruct")
    parser.add_argument("--limit", type=int, default=100, help="test examples per task")
    parser.add_argument(
        "--adapt-examples",
        type=int,
        default=32,
        help="train examples per task for adaptation (0 skips)",
    )
    parser.add_argument(
        "--tasks",
        nargs="*",
        help="a subset of the dev generation tasks (bigbench/tense, or tense); required with "
        "--split train",
    )
    parser.add_argument(
        "--split",
        choices=("dev", "train"),
        default="dev",
        help="train: run the protocol on train tasks, for choices about adaptation (needs --out)",
    )
    parser.add_argument("--out", type=Path, help="with --split train: where to write the JSON")
    parser.add_argument(
        "--results",
        type=Path,
        default=RESULTS,
        help="with --split dev: where to write the report (default: %(default)s)",
    )
    parser.add_argument(
        "--adapt-rank-weight",
        type=float,
        default=ADAPT_RANK_WEIGHT,
        help="weight of the pairwise ranking loss when adapting (default %(default)s, chosen on train "
        "tasks; 0: pointwise only, as `capplug adapt` defaults)",
    )
    parser.add_argument(
        "--adapt-epochs",
        type=float,
        default=ADAPT_EPOCHS,
        help="passes over the task's examples when adapting (default %(default)s, chosen on train "
        "tasks; `capplug adapt` has its own default)",
    )
    parser.add_argument(
        "--adapt-lr",
        type=float,
        default=ADAPT_LR,
        help="peak learning rate when adapting (default %(default)s, chosen on train tasks; "
        "`capplug adapt` has its own default)",
    )
    parser.add_argument(
        "--adapt-clip",
        action="store_true",
        help="also adapt on each candidate's first line and first sentence, labelled by Rouge-L",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=8, help="instructions per generation call")
    parser.add_argument(
        "--generate-only", action="store_true", help="fill the candidate cache and stop"
    )
    add_data_option(parser)
    args = parser.parse_args(argv)
    if args.adapt_rank_weight < 0:
        parser.error("--adapt-rank-weight must be >= 0")
    if args.adapt_epochs <= 0 or args.adapt_lr <= 0:
        parser.error("--adapt-epochs and --adapt-lr must be positive")
    if args.limit < 1 or args.adapt_examples < 0:
        parser.error("--limit must be >= 1 and --adapt-examples >= 0")
    if args.split == "dev":
        if args.out is not None:
            parser.error("--out is for --split train; dev results go to --results")
    elif not args.tasks or (args.out is None and not args.generate_only):
        parser.error("--split train needs --tasks and --out")
    pool = open_data(args, parser)
    if args.split == "dev":
        try:
            allowed = dev_tasks(pool)
        except DataError as exc:
            parser.error(str(exc))
        what = "dev.rerank_generation or dev.instruction_to_adapter"
    else:
        allowed, what = pool.names("train"), "train"
    args.tasks = resolve_tasks(parser, pool, args.tasks, allowed, what)
    result = evaluate(args, pool)
    if not result:
        return result
    if args.split == "dev":
        write_report(result, args.results)
    else:
        write_json_atomic(args.out, result)
        print("\n".join(report_lines(result)))
    return result


if __name__ == "__main__":
    main()
