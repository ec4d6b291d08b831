"""Zero-shot multiple choice on the BIG-bench dev tasks (docs/benchmarks.md, "Zero-shot choice").

For each task in dev.zero_shot_choice, the first 200 examples in file order: the instruction is
the task's own prompt, each option of target_scores is a candidate, the prediction is the
highest-scoring option, and a hit is an option with the highest target score. Methods:

- scorer: capplug's default scorer (or --scorer REF), no task data seen;
- lm-sum / lm-mean: SmolLM2-135M-Instruct log-likelihood of each option given the prompt,
  summed and length-normalised (mean per token);
- cosine: cosine similarity of MiniLM sentence embeddings of instruction and option;
- chance: the expected accuracy of a uniform pick.

Per-method results are cached under $CAPPLUG_HOME/bench-cache, so a rerun only computes what
is missing (--fresh recomputes). Writes benchmarks/results/zero_shot_choice.{json,md,png}.

    python -m benchmarks.zero_shot_choice [--scorer REF] [--methods scorer,lm,cosine] [--limit 200]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._report import bar_chart, task_table
from capplug._cache import cache_home, write_json_atomic
from capplug.data.bigbench import Example, load_task, task_names

RESULTS = Path(__file__).parent / "results"
METHODS = ("scorer", "lm", "cosine")
LABELS = {
    "scorer": "capplug scorer",
    "fused": "capplug fused (scorer + log-lik)",
    "lm-sum": "SmolLM2-135M log-lik (sum)",
    "lm-mean": "SmolLM2-135M log-lik (length-norm.)",
    "cosine": "MiniLM cosine",
    "chance": "chance",
}


def examples_of(task: str, limit: int) -> list[Example]:
    chosen = [e for e in load_task(task).examples if e.target_scores]
    return chosen[:limit]


def hits(examples: list[Example], option_scores: list[list[float]]) -> list[bool]:
    out = []
    for example, scores in zip(examples, option_scores, strict=True):
        options = list(example.target_scores)
        best = max(example.target_scores.values())
        pick = options[int(np.argmax(scores))]
        out.append(example.target_scores[pick] == best)
    return out


def chance(examples: list[Example]) -> float:
    rates = []
    for example in examples:
        values = list(example.target_scores.values())
        rates.append(sum(v == max(values) for v in values) / len(values))
    return float(np.mean(rates))


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


def run(args: argparse.Namespace) -> dict[str, Any]:
    tasks = args.tasks or task_names("dev", "zero_shot_choice")
    data = {task: examples_of(task, args.limit) for task in tasks}
    scorer_id = _scorer_id(args.scorer)
    cache = Cache(hashlib.sha1(f"{args.limit}".encode()).hexdigest()[:8], args.fresh)
    per_task: dict[str, dict[str, float]] = {}
    timings: dict[str, float] = {}

    loaded: dict[str, Any] = {}

    def cached(method: str, key: str, compute: Any) -> Any:
        """A method's result for one task from the cache, else computed (and timed) and cached."""
        value = cache.get(key)
        if value is None:
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
        row = {"examples": len(examples), "chance": chance(examples)}
        if "scorer" in args.methods:
            flat = cached(
                "scorer",
                f"scorer:{scorer_id}:{task}",
                lambda p=prompts, o=options: model("scorer", _load_scorer(args.scorer)).score_pairs(
                    list(zip(p, o, strict=True))
                ),
            )
            row["scorer"] = float(np.mean(hits(examples, regroup(flat, sizes))))
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
            )
            lm_flat = flat
            row["lm-sum"] = float(np.mean(hits(examples, regroup([f[0] for f in flat], sizes))))
            row["lm-mean"] = float(np.mean(hits(examples, regroup([f[1] for f in flat], sizes))))
        if "scorer" in args.methods and "lm" in args.methods:
            # The default selector, called as a user with log-likelihoods would call it.
            table = dict(zip(zip(prompts, options, strict=True), scores_flat, strict=True))
            ranker = _fused_ranker(args.scorer, table)
            picks = []
            for example, lm_scores in zip(examples, regroup(lm_flat, sizes), strict=True):
                keys = list(example.target_scores)
                sums = [v[0] for v in lm_scores]
                picks.append(
                    [
                        float(i == ranker.select(example.prompt, keys, logprobs=sums).index)
                        for i in range(len(keys))
                    ]
                )
            row["fused"] = float(np.mean(hits(examples, picks)))
        if "cosine" in args.methods:
            flat = cached(
                "cosine",
                f"cosine:{task}",
                lambda p=prompts, o=options: _cosine(model("cosine", _load_encoder), p, o),
            )
            row["cosine"] = float(np.mean(hits(examples, regroup(flat, sizes))))
        per_task[task] = row
        print(task, {k: round(v, 3) for k, v in row.items()})

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
        "benchmark": "zero_shot_choice",
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


def _fused_ranker(ref: str, table: dict[tuple[str, str], float]) -> Any:
    """capplug's default selector over already computed scorer scores (looked up, not rerun)."""
    from capplug.selection import Reranker, load_combiner

    class Lookup:
        def score(self, instruction: str, responses: list[str]) -> list[float]:
            return [table[(instruction, r)] for r in responses]

    return Reranker(Lookup(), combiner=load_combiner(ref))


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


def write_report(result: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json_atomic(RESULTS / "zero_shot_choice.json", result)
    columns = [c for c in LABELS if c in result["mean"]]
    lines = task_table(columns, LABELS, result["tasks"], result["mean"], lambda v: f"{100 * v:.1f}")
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
    (RESULTS / "zero_shot_choice.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    bar_chart(
        RESULTS / "zero_shot_choice.png",
        [LABELS[c] for c in columns],
        [100 * result["mean"][c] for c in columns],
        "mean accuracy on BIG-bench dev zero-shot choice tasks (%)",
        xlim=100,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scorer", default="capplug-default")
    parser.add_argument("--lm", default="smollm2-135m-instruct")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated: scorer, lm, cosine"
    )
    parser.add_argument(
        "--limit", type=int, default=200, help="examples per task (first in file order)"
    )
    parser.add_argument("--tasks", nargs="*", help="a subset of the dev.zero_shot_choice tasks")
    parser.add_argument("--fresh", action="store_true", help="ignore cached results")
    args = parser.parse_args()
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods: {', '.join(sorted(unknown))}")
    allowed = set(task_names("dev", "zero_shot_choice"))
    if args.tasks and not set(args.tasks) <= allowed:
        parser.error("--tasks must be dev.zero_shot_choice tasks")
    write_report(run(args))


if __name__ == "__main__":
    main()
