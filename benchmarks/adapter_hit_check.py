"""Does checking a store hit with the scorer help? (`ScorerHitCheck`, the store's `verify_hit`)

A store hit means an instruction is worded like one an adapter was made for, not that it is the
same task. This measures what using such hits costs in answer quality, and whether the scorer
check catches the harmful ones:

1. The hypernetwork makes an adapter for each Natural-Instructions (v1) *train* task's
   definition in the task pool; all of them go into a fresh store (indexed by the packaged
   MiniLM, as in production).
2. Each `dev.instruction_to_adapter` task's definition is looked up at a similarity threshold:
   the store's default 0.8, and 0.6 where hits are commoner (both fixed beforehand, not tuned).
3. Three ways to get that dev task's adapter:
   - fresh: always a new one from its own definition (what a miss gives);
   - unchecked: the best hit at the threshold (another task's adapter) if any, else fresh;
   - checked: the hits in order through `ScorerHitCheck(bar=0.5)`, probed with the input of the
     task's first *train* example (never a test one); the first kept, else fresh. This is what
     `AdapterStore.get_or_create` does with `verify_hit`.
4. Each way answers the task's test examples (example_split rule, at most --limit), greedy, at
   most 64 new tokens, definition in the prompt; mean Rouge-L F (max over references).

Per task: the best hit's task and similarity, the check's score and verdict, and the Rouge-L of
each way. Overall: mean Rouge-L per way and threshold, how many hits were refused, how many of
the refusals were right (the hit answered worse than a fresh adapter) and how many kept hits
were right, and what a check costs. Answers are cached per (adapter weights, task data) under
$CAPPLUG_HOME/bench-cache/adapter_hit_check.

Tasks come from the task pool (--data PATH; default $CAPPLUG_DATA, then ../shared/data beside
the checkout). Where the pool's dev list is shorter than the original BIG-bench list, the report
says which tasks are left out.

    python -m benchmarks.adapter_hit_check [--data PATH] [--hypernet REF] [--limit 30]
        [--bar 0.5] [--tasks ...]

Writes benchmarks/results/adapter_hit_check.{json,md} (or into --results DIR).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._report import write_results
from benchmarks._tasks import (
    add_data_option,
    dev_list,
    dev_list_lines,
    dev_tasks,
    open_data,
    resolve_tasks,
)
from benchmarks.instruction_to_adapter import (
    DEFAULT_HYPERNET,
    MAX_NEW_TOKENS,
    AnswerCache,
    short,
    task_digest,
    tensors_digest,
    test_examples,
)
from capplug.data import Pool, Task
from capplug.data.labels import rouge_l
from capplug.errors import DataError

RESULTS = Path(__file__).parent / "results"
NAME = "adapter_hit_check"
DEV = "instruction_to_adapter"  # the dev list whose tasks look up the store
STORED_SOURCE = "natural_instructions_v1"  # the train tasks whose adapters fill the store
THRESHOLDS = (0.8, 0.6)
WAYS = {
    "fresh": "always fresh (a miss)",
    "unchecked": "best hit, unchecked",
    "checked": "hits checked by the scorer",
}


class Answers:
    """Rouge-L of an adapter's answers on a task's test examples, cached by the weights."""

    def __init__(self, runtime: Any, loaded: dict[str, Task], args: argparse.Namespace) -> None:
        from capplug.adapters import user_prompt

        self.runtime, self.loaded, self.args = runtime, loaded, args
        self.user_prompt = user_prompt
        self.scores: dict[tuple[str, str], float] = {}

    def rouge(self, task_name: str, adapter: str, weights: tuple[dict[str, Any], Any]) -> float:
        digest = tensors_digest(weights[0])
        key = (digest, task_name)
        if key in self.scores:
            return self.scores[key]
        task = self.loaded[task_name]
        test = test_examples(task, self.args.limit)
        source = {
            "task": task_digest(task),
            "adapter": f"weights:{digest}",
            "definition": True,
            "decoding": "greedy",
        }
        cache = AnswerCache(digest, task_name, source, bench=NAME)
        todo = cache.missing(test)
        if todo:
            if adapter not in self.runtime:
                self.runtime.add_weights(adapter, *weights)
            for start in range(0, len(todo), self.args.batch):
                chunk = todo[start : start + self.args.batch]
                answers = self.runtime.generate(
                    [self.user_prompt(e.input, task.definition) for e in chunk],
                    adapter=adapter,
                    max_new_tokens=MAX_NEW_TOKENS,
                    batch_size=self.args.batch,
                )
                cache.put(chunk, answers)
        self.scores[key] = 100 * statistics.fmean(rouge_l(cache.get(e), e.targets) for e in test)
        return self.scores[key]


def stored_tasks(pool: Pool) -> list[str]:
    """The train tasks whose adapters fill the store: the pool's Natural-Instructions v1 ones.

    Raises:
        DataError: the pool has none.
    """
    names = pool.names("train", source=STORED_SOURCE)
    if not names:
        raise DataError(
            f"the task pool at {pool.root} has no {STORED_SOURCE} train tasks to fill the "
            f"store with"
        )
    return names


def evaluate(args: argparse.Namespace, pool: Pool) -> dict[str, Any]:
    from capplug import Scorer
    from capplug.adapters import AdapterRuntime, AdapterStore, Hypernetwork, ScorerHitCheck
    from capplug.models.adapter_folder import read_adapter

    dev = args.tasks or dev_tasks(pool, DEV)
    train = stored_tasks(pool)
    loaded = {name: pool.load(name) for name in [*dev, *train]}
    hypernet = Hypernetwork.from_pretrained(args.hypernet, device=args.device)
    runtime = AdapterRuntime.from_pretrained(
        hypernet.config.base_ref, device=args.device, max_loaded=4
    )
    scorer = Scorer.from_pretrained("capplug-default", device=args.device)
    answers = Answers(runtime, loaded, args)
    by_instruction: dict[str, str] = {}
    fresh = {name: hypernet.generate(loaded[name].definition or "") for name in dev}

    def probe_for(name: str) -> str:
        first_train = next(e for e in loaded[name].examples if not e.is_test)
        return first_train.input

    runs: dict[str, Any] = {}
    with (
        tempfile.TemporaryDirectory(prefix="capplug-hit-check-") as scratch,
        AdapterStore(Path(scratch), base_model=hypernet.config.base_model) as store,
    ):
        print(f"storing adapters for {len(train)} train tasks")
        for name in train:
            definition = loaded[name].definition or ""
            record = store.put(
                *hypernet.generate(definition), instruction=definition, source="generated"
            )
            by_instruction[record.instruction] = name
        for threshold in THRESHOLDS:
            rows: dict[str, dict[str, Any]] = {}
            check_seconds: list[float] = []
            for name in dev:
                definition = loaded[name].definition or ""
                check = ScorerHitCheck(
                    runtime, scorer, bar=args.bar, probe=probe_for(name), history=10
                )
                matches = store.lookup(definition, threshold=threshold, k=3)
                fresh_score = answers.rouge(name, f"fresh:{short(name)}", fresh[name])
                row: dict[str, Any] = {"fresh": fresh_score, "hits": []}
                chosen = None
                for match in matches:
                    kept = check(match.record, definition)
                    seen = check.history[-1]
                    check_seconds.append(seen.seconds)
                    files = read_adapter(store.files(match.record.id).folder)
                    weights = (files.state_dict, files.config)
                    hit_score = answers.rouge(name, match.record.id, weights)
                    row["hits"].append(
                        {
                            "task": short(by_instruction.get(match.record.instruction, "?")),
                            "similarity": round(match.similarity, 4),
                            "check_score": round(seen.score, 4),
                            "kept": kept,
                            "rouge": hit_score,
                            "right": (hit_score >= fresh_score) == kept,
                        }
                    )
                    if kept and chosen is None:
                        chosen = hit_score
                row["unchecked"] = row["hits"][0]["rouge"] if row["hits"] else fresh_score
                row["checked"] = fresh_score if chosen is None else chosen
                rows[short(name)] = row
                print(
                    f"threshold {threshold}: {short(name)} fresh {fresh_score:.1f} "
                    f"unchecked {row['unchecked']:.1f} checked {row['checked']:.1f} "
                    f"({len(row['hits'])} hit(s))"
                )
            hits = [h for r in rows.values() for h in r["hits"]]
            runs[str(threshold)] = {
                "tasks": rows,
                "mean": {w: statistics.fmean(r[w] for r in rows.values()) for w in WAYS},
                "hits": len(hits),
                "tasks_with_hits": sum(1 for r in rows.values() if r["hits"]),
                "refused": sum(1 for h in hits if not h["kept"]),
                "right_refusals": sum(1 for h in hits if not h["kept"] and h["right"]),
                "right_keeps": sum(1 for h in hits if h["kept"] and h["right"]),
                "check_median_seconds": (
                    statistics.median(check_seconds) if check_seconds else None
                ),
            }
    from capplug.training.loop import machine

    return {
        "benchmark": NAME,
        "data": str(pool.root),
        "dev_lists": [dev_list(pool, DEV)],
        "dev_tasks": dev,
        "hypernet": str(args.hypernet),
        "base_model": hypernet.config.base_model,
        "bar": args.bar,
        "limit": args.limit,
        "max_new_tokens": MAX_NEW_TOKENS,
        "metric": "Rouge-L F x 100, max over references",
        "store": f"{len(train)} adapters, one per Natural-Instructions train task of the pool",
        "thresholds": runs,
        "machine": machine(runtime.chat.device),
    }


def report_lines(result: dict[str, Any]) -> list[str]:
    lines = [
        f"Store of {result['store']} (hypernetwork {result['hypernet']}); each "
        f"dev.instruction_to_adapter task's definition looked up; answers on at most "
        f"{result['limit']} test examples per task, greedy, definition in the prompt; mean "
        f"Rouge-L F x 100. Check: ScorerHitCheck, bar {result['bar']}, probe = the task's first "
        f"train example.",
        "",
        "| threshold | tasks with a hit | hits | refused (right) | kept (right) | "
        + " | ".join(WAYS.values())
        + " | check p50 |",
        "| ---: | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in WAYS) + " | ---: |",
    ]
    for threshold, run in result["thresholds"].items():
        kept = run["hits"] - run["refused"]
        check = run["check_median_seconds"]
        lines.append(
            f"| {threshold} | {run['tasks_with_hits']} | {run['hits']} | "
            f"{run['refused']} ({run['right_refusals']}) | {kept} ({run['right_keeps']}) | "
            + " | ".join(f"{run['mean'][w]:.1f}" for w in WAYS)
            + f" | {'-' if check is None else f'{1000 * check:.0f} ms'} |"
        )
    lines += [
        "",
        "Hits, per threshold and dev task (the stored adapter's task, similarity, "
        "check score, kept?, its Rouge-L vs. fresh):",
        "",
    ]
    for threshold, run in result["thresholds"].items():
        for task, row in run["tasks"].items():
            for hit in row["hits"]:
                lines.append(
                    f"- {threshold} {task}: {hit['task']} ({hit['similarity']:.3f}), check "
                    f"{hit['check_score']:.3f} {'kept' if hit['kept'] else 'refused'}, Rouge-L "
                    f"{hit['rouge']:.1f} vs. fresh {row['fresh']:.1f}"
                )
    notes = dev_list_lines(result.get("dev_lists") or [], result.get("dev_tasks") or [])
    if notes:
        lines += ["", *notes]
    return lines


def write_report(result: dict[str, Any], folder: Path) -> None:
    write_results(folder, NAME, result, report_lines(result))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hypernet", default=DEFAULT_HYPERNET, metavar="REF")
    parser.add_argument("--limit", type=int, default=30, help="test examples per task")
    parser.add_argument("--bar", type=float, default=0.5, help="ScorerHitCheck's bar")
    parser.add_argument(
        "--tasks",
        nargs="*",
        help="a subset of dev.instruction_to_adapter (natural_instructions_v1/subtask043_..., or "
        "subtask043_...)",
    )
    parser.add_argument("--batch", type=int, default=16, help="prompts per generation call")
    parser.add_argument("--device", help="cpu, cuda, ... (default: the GPU if there is one)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where to write the report")
    add_data_option(parser)
    args = parser.parse_args(argv)
    if args.limit < 1:
        parser.error("--limit must be >= 1")
    if not 0.0 <= args.bar <= 1.0:
        parser.error("--bar must be in [0, 1]")
    args.pool = open_data(args, parser)
    try:
        allowed = dev_tasks(args.pool, DEV)
        stored_tasks(args.pool)
    except DataError as exc:
        parser.error(str(exc))
    args.tasks = resolve_tasks(parser, args.pool, args.tasks, allowed, "dev.instruction_to_adapter")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    result = evaluate(args, args.pool)
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    write_report(result, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
