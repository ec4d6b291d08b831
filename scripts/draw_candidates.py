"""Draw candidates and option log-likelihoods for a file of prompts, on any machine with torch.

The selector's training data (sampled candidates on the task pool's generative train tasks,
options of its multiple-choice train tasks) and the dev benchmarks' candidate caches take hours
to draw on a CPU and minutes on a GPU. This script does only that part, with capplug's own
``LocalChatModel`` (the same recipe and seeds as ``benchmarks/rerank_generation.py``), so it
runs where the task data is not: ``export`` writes the prompts here, ``draw`` runs there, and
the results come back as JSON lines.

    python scripts/draw_candidates.py export --out runs/prompts.jsonl [--data PATH]
    python scripts/draw_candidates.py draw runs/prompts.jsonl --out runs/drawn [--device cuda]
    python scripts/draw_candidates.py install runs/drawn                # into the bench caches
    python scripts/draw_candidates.py pick runs/prompts.jsonl --out runs/gen-fam.jsonl \
        --group train-gen --per-family 2 --leave-out-fold 1              # fewer prompts

``export`` reads the task pool (--data PATH; default $CAPPLUG_DATA, then ../shared/data beside
the checkout): every train task, and the dev tasks of the rerank and zero-shot choice
benchmarks, exactly as those benchmarks choose their examples.

``draw`` appends one line per prompt to ``<out>/<group>.jsonl`` after every batch and skips
prompts already there, so it resumes where it stopped.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
import time
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

if TYPE_CHECKING:
    from capplug.data import Pool

# Drawn per task for the selector's training data (kept small so many tasks fit).
GEN_PER_TASK = 5
MC_PER_TASK = 12
MAX_PROMPT_CHARS = 2000
DEV_TEST_LIMIT = 100  # rerank benchmark: test examples per task
DEV_ADAPT = 16  # rerank benchmark: adaptation examples per task
CHOICE_LIMIT = 200  # zero-shot choice benchmark: examples per task


def _draw(items: list[Any], n: int, key: str) -> list[Any]:
    if len(items) <= n:
        return items
    rng = random.Random(zlib.crc32(key.encode()))
    return [items[i] for i in sorted(rng.sample(range(len(items)), n))]


def export(out: Path, pool: Pool) -> None:
    """Every prompt the selector's data (train tasks of ``pool``) and the dev benchmarks (its dev
    tasks) need, as JSON lines."""
    sys.path.insert(0, str(ROOT))  # the benchmarks package
    from benchmarks._tasks import dev_tasks as dev_list
    from benchmarks.rerank_generation import adaptation_examples, dev_tasks, split
    from benchmarks.zero_shot_choice import examples_of

    rows: list[dict[str, Any]] = []
    for task in pool.tasks(split="train", progress=True):
        usable = [e for e in task.examples if e.targets and len(e.prompt) <= MAX_PROMPT_CHARS]
        if task.is_multiple_choice:
            for e in _draw(usable, MC_PER_TASK, task.name):
                rows.append(_row("train-mc", e, options=list(e.target_scores)))
        elif task.is_generative:
            for e in _draw(usable, GEN_PER_TASK, task.name):
                rows.append(_row("train-gen", e))
    for name in dev_tasks(pool):
        test, train = split(pool, name, DEV_TEST_LIMIT)
        for e in test + adaptation_examples(name, train, DEV_ADAPT):
            rows.append(_row("dev-rerank", e))
    for name in dev_list(pool, "zero_shot_choice"):
        for e in examples_of(pool, name, CHOICE_LIMIT):
            rows.append(_row("dev-choice", e, options=list(e.target_scores)))
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["group"]] = counts.get(row["group"], 0) + 1
    print(f"{len(rows)} prompts to {out}: {counts}")


def _row(group: str, example: Any, options: list[str] | None = None) -> dict[str, Any]:
    row = {"group": group, "task": example.task, "index": example.index, "prompt": example.prompt}
    if options is not None:
        row["options"] = options
    return row


def draw(prompts: Path, out: Path, *, device: str | None, batch: int, model_ref: str) -> None:
    import torch

    from capplug.llms import LocalChatModel

    todo: dict[str, list[dict[str, Any]]] = {}
    for line in prompts.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        todo.setdefault(row["group"], []).append(row)
    out.mkdir(parents=True, exist_ok=True)
    model = LocalChatModel.from_pretrained(model_ref, device=device, dtype=torch.float32)
    print(model, flush=True)
    # Options first (quick), then the benchmark's candidates: a run cut short brings them back.
    order = ("train-mc", "dev-choice", "dev-rerank")
    for group in sorted(todo, key=lambda g: order.index(g) if g in order else len(order)):
        path = out / f"{group}.jsonl.gz"
        done = {(r["task"], r["index"]) for r in read_drawn(path)}
        rows = [r for r in todo[group] if (r["task"], r["index"]) not in done]
        started = time.monotonic()
        print(f"{group}: {len(rows)} to draw ({len(done)} done)", flush=True)
        for start in range(0, len(rows), batch):
            chunk = rows[start : start + batch]
            if "options" in chunk[0]:
                results = _options(model, chunk)
            else:
                results = _candidates(model, chunk, batch)
            # One gzip member per batch: a run killed mid-write loses only that batch.
            with gzip.open(path, "at", encoding="utf-8") as handle:
                for row, result in zip(chunk, results, strict=True):
                    handle.write(json.dumps({"task": row["task"], "index": row["index"], **result}))
                    handle.write("\n")
            if (start // batch) % 5 == 0 or start + batch >= len(rows):
                print(
                    f"{group}: {start + len(chunk)}/{len(rows)} "
                    f"in {time.monotonic() - started:.0f} s",
                    flush=True,
                )


def read_drawn(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a drawn file (a batch cut off by a killed run is dropped)."""
    if not path.is_file():
        return []
    rows = []
    try:
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            for line in handle:
                if line.endswith("\n"):
                    rows.append(json.loads(line))
    except (EOFError, OSError, json.JSONDecodeError):
        pass
    return rows


def _candidates(model: Any, chunk: list[dict[str, Any]], batch: int) -> list[dict[str, Any]]:
    sampled = model.sample_candidates(
        [r["prompt"] for r in chunk], seed=0, batch_size=batch, progress=False
    )
    return [
        {
            "candidates": [
                {
                    "text": c.text,
                    "strategy": c.strategy,
                    "sum_logprob": c.sum_logprob,
                    "mean_logprob": c.mean_logprob,
                    "n_tokens": c.n_tokens,
                }
                for c in candidates
            ]
        }
        for candidates in sampled
    ]


def _options(model: Any, chunk: list[dict[str, Any]]) -> list[dict[str, Any]]:
    prompts = [r["prompt"] for r in chunk for _ in r["options"]]
    options = [o for r in chunk for o in r["options"]]
    flat = model.log_likelihood(prompts, options, batch_size=64)
    out, start = [], 0
    for r in chunk:
        values = flat[start : start + len(r["options"])]
        start += len(r["options"])
        out.append({"options": [list(v) for v in values]})
    return out


def pick(
    prompts: Path, out: Path, pool: Pool, *, group: str, per_family: int, leave_out: int | None
) -> int:
    """A subset of ``group``'s prompts that a CPU can draw: ``per_family`` per task family
    (from different tasks where the family has several), none from train fold ``leave_out`` of
    ``pool.folds(5)`` (kept apart to measure on). Seeded, so the same pool gives the same
    subset. Returns how many were written."""
    rows = [json.loads(line) for line in prompts.read_text().splitlines() if line.strip()]
    left_out = set(pool.folds(5)[leave_out]) if leave_out is not None else set()
    by_family: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["group"] == group and row["task"] not in left_out:
            by_family.setdefault(pool.family(row["task"]), []).append(row)
    rng = random.Random(7)
    chosen: list[dict[str, Any]] = []
    for family in sorted(by_family):
        candidates = by_family[family]
        rng.shuffle(candidates)
        tasks_seen: list[str] = []
        picked: list[dict[str, Any]] = []
        for row in candidates:  # one per task first
            if row["task"] not in tasks_seen:
                tasks_seen.append(row["task"])
                picked.append(row)
            if len(picked) == per_family:
                break
        for row in candidates:  # then more examples of the same tasks
            if len(picked) == per_family:
                break
            if row not in picked:
                picked.append(row)
        chosen += picked
    rng.shuffle(chosen)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(row) + "\n" for row in chosen))
    return len(chosen)


def install(drawn: Path) -> None:
    """Put drawn dev candidates and option log-likelihoods where the benchmarks look first."""
    import hashlib

    from capplug._cache import cache_home, write_json_atomic

    rerank = read_drawn(drawn / "dev-rerank.jsonl.gz")
    if rerank:
        per_task: dict[str, dict[str, Any]] = {}
        for row in rerank:
            per_task.setdefault(row["task"], {})[str(row["index"])] = row["candidates"]
        for task, data in per_task.items():
            path = cache_home() / "bench-cache" / f"rerank-{task.replace('/', '__')}-seed0.json"
            old = json.loads(path.read_text()) if path.is_file() else {}
            write_json_atomic(path, {**data, **old})
            print(f"{path}: {len(data)} instructions")
    choice = read_drawn(drawn / "dev-choice.jsonl.gz")
    if choice:
        key = hashlib.sha1(f"{CHOICE_LIMIT}".encode()).hexdigest()[:8]
        path = cache_home() / "bench-cache" / f"zero_shot_choice-{key}.json"
        cache = json.loads(path.read_text()) if path.is_file() else {}
        rows: dict[str, list[Any]] = {}
        for row in choice:
            rows.setdefault(row["task"], []).append(row)
        for task, items in rows.items():
            items.sort(key=lambda r: r["index"])
            cache.setdefault(
                f"lm:smollm2-135m-instruct:{task}",
                [list(v[:2]) for r in items for v in r["options"]],
            )
        write_json_atomic(path, cache)
        print(f"{path}: {len(rows)} tasks")


def main() -> None:
    sys.path.insert(0, str(ROOT))  # the benchmarks package
    from benchmarks._tasks import add_data_option

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export", help="write the prompts (reads the task pool)")
    p.add_argument("--out", type=Path, required=True)
    add_data_option(p)
    p = sub.add_parser("draw", help="draw candidates and option log-likelihoods")
    p.add_argument("prompts", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default=None)
    p.add_argument("--batch", type=int, default=16, help="prompts per generation call")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p = sub.add_parser("install", help="copy drawn dev data into the benchmark caches")
    p.add_argument("drawn", type=Path)
    p = sub.add_parser("pick", help="a subset of exported prompts: a few per task family")
    p.add_argument("prompts", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--group", default="train-gen")
    p.add_argument("--per-family", type=int, default=2)
    p.add_argument("--leave-out-fold", type=int, default=None, metavar="K")
    add_data_option(p)
    args = parser.parse_args()
    if args.command == "export":
        from capplug.data import open_pool
        from capplug.errors import DataError

        try:
            pool = open_pool(args.data, strict=args.strict)
        except DataError as exc:
            parser.error(str(exc))
        try:
            export(args.out, pool)
        except DataError as exc:
            raise SystemExit(f"draw_candidates export: {exc}") from exc
    elif args.command == "draw":
        draw(args.prompts, args.out, device=args.device, batch=args.batch, model_ref=args.model)
    elif args.command == "pick":
        from capplug.data import open_pool

        count = pick(
            args.prompts,
            args.out,
            open_pool(args.data, strict=args.strict),
            group=args.group,
            per_family=args.per_family,
            leave_out=args.leave_out_fold,
        )
        print(f"{count} prompts written to {args.out}")
    else:
        install(args.drawn)


if __name__ == "__main__":
    main()
