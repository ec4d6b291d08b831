"""Instruction-to-adapter quality (docs/benchmarks.md, "Instruction-to-adapter quality").

On the Natural-Instructions tasks the task pool marks dev for instruction_to_adapter, with the
test examples of the example_split rule (at most 100 per task), greedy decoding and at most 64
new tokens, the mean Rouge-L F (max over references) of five ways to answer, side by side:

- the base model with the task's definition in the prompt (zero-shot);
- the base model + the adapter the hypernetwork makes from the definition, definition in the
  prompt;
- the same adapter without the definition in the prompt;
- one multi-task LoRA trained on all Natural-Instructions train tasks
  (`capplug adapters train-lora --multitask`), definition in the prompt, as it was trained;
- the generated adapter behind the judged fallback (:class:`capplug.adapters.AdapterJudge`):
  per task, the adapter and the base model (both with the definition) answer one probe, the
  task's first train example, and the selector with --scorer judges; the task's answers are
  then the adapter's where it won and the base model's where it lost (two short generations and
  one selection per task, no test example read);
- a per-task LoRA trained on that dev task's own train examples, definition in the prompt: the
  ceiling. `--train-missing` trains these (resumably) with the teachers' settings, through
  `train_task_lora(..., purpose="benchmark-ceiling")`, which reads none of the test examples.

Also the time to make one adapter from an instruction (`Hypernetwork.generate`, median over the
tasks after one warm-up call) against the time to train the per-task LoRA (the wall time its
training run recorded), as a ratio.

A row whose model is not there (no hypernetwork, no --multitask, a task without a per-task
LoRA) is reported missing, with the reason; no number is made up for it. Answers are cached per
(variant, task) under $CAPPLUG_HOME/bench-cache/instruction_to_adapter, keyed by a digest of the
weights that made them and of the task's definition and inputs, so the script can be stopped and
run again, and a retrained adapter (or changed task data) gets fresh answers.

Tasks come from the task pool (--data PATH; default $CAPPLUG_DATA, then ../shared/data beside
the checkout). Where the pool's dev list is shorter than the original BIG-bench list, the report
says which tasks are left out.

    python -m benchmarks.instruction_to_adapter [--data PATH] [--hypernet REF] [--multitask DIR]
        [--per-task DIR [--train-missing]] [--scorer REF] [--limit 100] [--tasks ...]

Writes benchmarks/results/instruction_to_adapter.{json,md,png} (or into --results DIR).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks._report import bar_chart, task_table, write_results
from benchmarks._tasks import (
    add_data_option,
    dev_list,
    dev_list_lines,
    dev_tasks,
    open_data,
    resolve_tasks,
)
from capplug._cache import cache_home, write_json_atomic
from capplug.data import Example, Pool, Task
from capplug.data.labels import rouge_l
from capplug.errors import DataError

RESULTS = Path(__file__).parent / "results"
NAME = "instruction_to_adapter"
MAX_NEW_TOKENS = 64
GAIN_TARGET = 3.0
"""Generated adapter + definition must beat base + definition by this many Rouge-L points."""
FALLBACK_FLOOR = -2.0
"""With the judged fallback, no task may fall below base + definition by more than this."""
SPEEDUP_TARGET = 1000.0
DEFAULT_HYPERNET = "capplug-hypernet-smollm2"
DEFAULT_BASE = "smollm2-135m-instruct"

VARIANTS = {
    "base": "base + definition (zero-shot)",
    "generated": "base + generated adapter + definition",
    "generated-no-def": "base + generated adapter, no definition",
    "judged": "generated adapter + definition, judged fallback",
    "multitask": "multi-task LoRA + definition",
    "per-task": "per-task LoRA + definition (ceiling)",
}
WITH_DEFINITION = {"base": True, "generated": True, "generated-no-def": False, "judged": True}
WITH_DEFINITION.update({"multitask": True, "per-task": True})
ADAPTER_NAME = {"generated": "generated", "generated-no-def": "generated"}
ADAPTER_NAME.update({"multitask": "multitask", "per-task": "pertask"})


def ceiling_config() -> Any:
    """The per-task LoRA settings: the teachers' defaults, so the ceiling is a teacher's run."""
    from capplug.training.teacher_lora import LoraTrainConfig

    return LoraTrainConfig()


def short(task: str) -> str:
    return task.split("/", 1)[-1]


def test_examples(task: Task, limit: int) -> list[Example]:
    """The example_split rule's test part with references, in file order, at most ``limit``."""
    return [e for e in task.examples if e.is_test and e.targets][:limit]


def task_digest(task: Task) -> str:
    """What a task's answers depend on besides the model: its definition and its inputs (so
    answers cached for other task data are made again)."""
    digest = hashlib.sha256((task.definition or "").encode())
    for example in task.examples:
        digest.update(f"\n{example.index}\t{example.input}".encode())
    return digest.hexdigest()[:16]


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def tensors_digest(tensors: dict[str, Any]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].detach().to("cpu").contiguous().float().numpy().tobytes())
    return digest.hexdigest()[:16]


def finished_lora(folder: Path, task: str | None = None) -> dict[str, Any] | None:
    """The training summary of a finished LoRA in ``folder`` (for ``task`` if given), else None."""
    summary = folder / "training_summary.json"
    needed = [summary, folder / "adapter_config.json", folder / "adapter_model.safetensors"]
    if not all(p.is_file() for p in needed):
        return None
    data = json.loads(summary.read_text(encoding="utf-8"))
    if task is not None and data.get("task") != task:
        return None
    return data


class AnswerCache:
    """Answers of one (variant, task), by example index; written after every batch."""

    def __init__(
        self, variant: str, task: str, source: dict[str, Any], *, bench: str = NAME
    ) -> None:
        self.path = cache_home() / "bench-cache" / bench / variant / f"{short(task)}.json"
        self.source = source
        data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        if data.get("source") != source:
            if data:
                print(f"{variant} / {short(task)}: the model changed; answers made again")
            data = {"source": source, "answers": {}}
        self.answers: dict[str, str] = data["answers"]

    def missing(self, examples: Sequence[Example]) -> list[Example]:
        return [e for e in examples if str(e.index) not in self.answers]

    def put(self, examples: Sequence[Example], answers: Sequence[str]) -> None:
        for example, answer in zip(examples, answers, strict=True):
            self.answers[str(example.index)] = answer
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, {"source": self.source, "answers": self.answers})

    def get(self, example: Example) -> str:
        return self.answers[str(example.index)]


@dataclass
class Models:
    """What answers: the base model, loaded on first need, and the adapters it carries."""

    base_ref: str
    device: str | None
    chat: Any = None
    runtime: Any = None
    attached: dict[str, str] | None = None  # runtime adapter name -> digest of its weights

    def load_chat(self) -> Any:
        if self.chat is None:
            from capplug.llms import LocalChatModel

            self.chat = LocalChatModel.from_pretrained(
                self.base_ref, device=self.device, dtype="float32"
            )
        return self.chat

    def load_runtime(self) -> Any:
        if self.runtime is None:
            from capplug.adapters.runtime import AdapterRuntime
            from capplug.models.adapter_folder import model_identity

            chat = self.load_chat()
            identity = model_identity(self.base_ref, chat.model.config)
            self.runtime = AdapterRuntime(chat, identity=identity, max_loaded=4)
            self.attached = {}
        return self.runtime


def train_missing_ceilings(
    tasks: dict[str, Task], per_task: Path, models: Models, args: argparse.Namespace
) -> None:
    """Train (or resume) the per-task LoRA of every task that has none: dev train examples only.

    Each is given the task as loaded from the pool, so it trains on that data."""
    from capplug.training.teacher_lora import BENCHMARK_CEILING, task_folder_name, train_task_lora

    todo = [t for t in tasks if finished_lora(per_task / task_folder_name(t), t) is None]
    for position, name in enumerate(todo, start=1):
        print(f"per-task LoRA {position}/{len(todo)}: {short(name)}")
        train_task_lora(
            tasks[name],
            per_task / task_folder_name(name),
            chat=models.load_chat(),
            config=ceiling_config(),
            purpose=BENCHMARK_CEILING,
            progress=args.progress,
        )


def evaluate(args: argparse.Namespace, pool: Pool) -> dict[str, Any]:
    from capplug.adapters.examples import user_prompt
    from capplug.errors import CheckpointError, ModelNotFoundError
    from capplug.models.adapter_folder import AdapterFileError, canonical_model_name

    tasks = args.tasks or dev_tasks(pool, NAME)
    loaded = {name: pool.load(name) for name in tasks}
    digests = {name: task_digest(task) for name, task in loaded.items()}
    missing: dict[str, str] = {}

    hypernet = None
    try:
        from capplug.adapters.hypernetwork import Hypernetwork

        hypernet = Hypernetwork.from_pretrained(args.hypernet, device=args.device)
    except (ModelNotFoundError, CheckpointError) as exc:
        reason = f"no hypernetwork: {exc}"
        print(f"skipping the generated-adapter rows; {reason}")
        missing["generated"] = missing["generated-no-def"] = missing["judged"] = reason
    base_ref = args.base or (hypernet.config.base_ref if hypernet else DEFAULT_BASE)
    if hypernet is not None and canonical_model_name(base_ref) != hypernet.config.base_model:
        raise SystemExit(
            f"--base {base_ref} is not the model the hypernetwork writes adapters for "
            f"({hypernet.config.base_model}); leave --base out to use that one"
        )
    base_name = canonical_model_name(base_ref)
    models = Models(base_ref, args.device)

    multitask = Path(args.multitask).expanduser() if args.multitask else None
    if multitask is None:
        missing["multitask"] = (
            "no multi-task LoRA given: train one with `capplug adapters train-lora --multitask "
            "--out DIR` and pass --multitask DIR"
        )
    elif finished_lora(multitask) is None:
        missing["multitask"] = f"{multitask} holds no finished LoRA (training_summary.json)"
    per_task = Path(args.per_task).expanduser() if args.per_task else None
    if per_task is None:
        missing["per-task"] = (
            "no per-task LoRA folder given: pass --per-task DIR (--train-missing trains them)"
        )
    elif args.train_missing:
        train_missing_ceilings(loaded, per_task, models, args)

    def ceiling_folder(task: str) -> Path:
        from capplug.training.teacher_lora import task_folder_name

        assert per_task is not None
        return per_task / task_folder_name(task)

    def ceiling(task: str) -> dict[str, Any] | None:
        if per_task is None:
            return None
        return finished_lora(ceiling_folder(task), task)

    timing = measure_generation(hypernet, [loaded[t].definition or "" for t in tasks], tasks)
    generation_adapters: dict[str, Any] = {}
    hypernet_digest = tensors_digest(hypernet.state_dict()) if hypernet is not None else None

    def source(variant: str, task: str) -> dict[str, Any] | None:
        """What makes this variant's answers on this task, or None when it is missing."""
        adapter: str | None = None
        if variant in missing:
            return None
        if variant in ("generated", "generated-no-def", "judged"):
            adapter = f"hypernet:{hypernet_digest}"
        elif variant == "multitask":
            adapter = "lora:" + file_digest(multitask / "adapter_model.safetensors")
        elif variant == "per-task":
            if ceiling(task) is None:
                return None
            adapter = "lora:" + file_digest(ceiling_folder(task) / "adapter_model.safetensors")
        return {
            "task": digests[task],
            "base": base_name,
            "adapter": adapter,
            "definition": WITH_DEFINITION[variant],
            "max_new_tokens": MAX_NEW_TOKENS,
            "decoding": "greedy",
        }

    def attach(variant: str, task: str, digest: str) -> str | None:
        """Put the variant's adapter for ``task`` in the model (once); its runtime name."""
        runtime = models.load_runtime()
        name = ADAPTER_NAME.get(variant)
        key = digest if variant == "multitask" else f"{digest}:{task}"
        if name is None or models.attached.get(name) == key:
            return name
        if variant in ("generated", "generated-no-def"):
            if task not in generation_adapters:
                generation_adapters[task] = hypernet.generate(loaded[task].definition or "")
            runtime.add_weights(name, *generation_adapters[task])
        elif variant == "multitask":
            runtime.add(name, multitask)
        else:
            runtime.add(name, ceiling_folder(task))
        models.attached[name] = key
        return name

    @functools.cache
    def judge() -> Any:
        from capplug.adapters.fallback import AdapterJudge
        from capplug.selection import Reranker

        return AdapterJudge(models.runtime, Reranker(args.scorer), max_new_tokens=MAX_NEW_TOKENS)

    def judged(task: Task) -> dict[str, Any] | None:
        """The judged fallback's verdict on the task's generated adapter (cached), or None when
        the task has no train example to probe with."""
        probe = next((e for e in task.examples if not e.is_test and e.input.strip()), None)
        made_by = source("judged", task.name)
        if probe is None or made_by is None:
            return None
        made_by = {**made_by, "judge": args.scorer, "probe": probe.index}
        cache = AnswerCache("judged-check", task.name, made_by)
        if cache.missing([probe]):
            adapter = attach("generated", task.name, str(made_by["adapter"]))
            prompt = user_prompt(probe.input, task.definition)
            comparison = judge().compare(adapter, prompt, prompt)
            verdict = {
                "winner": comparison.winner,
                "scores": dict(comparison.scores),
                "seconds": comparison.seconds,
                "probe": probe.index,
            }
            cache.put([probe], [json.dumps(verdict)])
        return json.loads(cache.get(probe))

    per_task_rows: dict[str, dict[str, Any]] = {}
    checks: dict[str, dict[str, Any]] = {}
    for task_name in tasks:
        task = loaded[task_name]
        test = test_examples(task, args.limit)
        row: dict[str, Any] = {"examples": len(test)}
        for variant in VARIANTS:
            if variant == "judged":
                continue  # made from the base and generated rows, below
            made_by = source(variant, task_name)
            if made_by is None:
                row[variant] = None
                continue
            cache = AnswerCache(variant, task_name, made_by)
            todo = cache.missing(test)
            if todo:
                try:
                    adapter = attach(variant, task_name, str(made_by["adapter"]))
                except AdapterFileError as exc:  # another base model, a corrupt file...
                    missing.setdefault(variant, f"adapter refused: {exc}")
                    row[variant] = None
                    continue
                definition = task.definition if WITH_DEFINITION[variant] else None
                for start in range(0, len(todo), args.batch):
                    chunk = todo[start : start + args.batch]
                    answers = models.runtime.generate(
                        [user_prompt(e.input, definition) for e in chunk],
                        adapter=adapter,
                        max_new_tokens=MAX_NEW_TOKENS,
                        batch_size=args.batch,
                    )
                    cache.put(chunk, answers)
            scores = [rouge_l(cache.get(e), e.targets) for e in test]
            row[variant] = 100 * statistics.fmean(scores) if scores else None
        row["judged"] = None
        if row["generated"] is not None and row["base"] is not None:
            verdict = judged(task)
            if verdict is not None:
                checks[short(task_name)] = verdict
                row["judged"] = row["generated" if verdict["winner"] == "adapter" else "base"]
        row = {variant: row[variant] for variant in ["examples", *VARIANTS]}
        per_task_rows[short(task_name)] = row
        shown = {k: (None if v is None else round(v, 1)) for k, v in row.items()}
        print(short(task_name), shown)

    for variant in VARIANTS:
        absent = [t for t, row in per_task_rows.items() if row[variant] is None]
        if absent and variant not in missing:
            missing[variant] = f"no {VARIANTS[variant]} for {len(absent)} task(s): " + ", ".join(
                absent
            )
    mean = {
        v: (None if v in missing else statistics.fmean(row[v] for row in per_task_rows.values()))
        for v in VARIANTS
    }
    timing.update(training_times(tasks, ceiling))
    if checks:
        timing["check_median_seconds"] = statistics.median(c["seconds"] for c in checks.values())
    gen, train = timing.get("generation_median_seconds"), timing.get("training_median_seconds")
    timing["speedup"] = train / gen if gen and train is not None else None
    return {
        "benchmark": NAME,
        "data": str(pool.root),
        "dev_lists": [dev_list(pool, NAME)],
        "base_model": base_name,
        "hypernet": str(args.hypernet) if hypernet is not None else None,
        "multitask": str(multitask) if multitask is not None else None,
        "per_task": str(per_task) if per_task is not None else None,
        "limit": args.limit,
        "max_new_tokens": MAX_NEW_TOKENS,
        "decoding": "greedy",
        "metric": "Rouge-L F x 100, max over references",
        "tasks": per_task_rows,
        "mean": mean,
        "missing": missing,
        "timing": timing,
        "checks": checks,
        "judge": args.scorer,
        "targets": targets(mean, timing, missing, per_task_rows),
    }


def measure_generation(hypernet: Any, definitions: list[str], tasks: list[str]) -> dict[str, Any]:
    """Seconds to make one adapter from each task's definition, after one warm-up call."""
    if hypernet is None or not definitions:
        return {}
    import torch

    from capplug.training.loop import machine

    hypernet.generate(definitions[0])  # loads the encoder, warms the allocator
    seconds = {}
    for task, definition in zip(tasks, definitions, strict=True):
        started = time.perf_counter()
        hypernet.generate(definition)  # returns CPU tensors: any GPU work has finished
        seconds[short(task)] = time.perf_counter() - started
    return {
        "generation_seconds": seconds,
        "generation_median_seconds": statistics.median(seconds.values()),
        "generation_machine": machine(torch.device(hypernet.device)),
    }


def training_times(tasks: list[str], ceiling: Any) -> dict[str, Any]:
    """Wall seconds each per-task LoRA's training run recorded (tasks that have one)."""
    seconds, machines = {}, []
    for task in tasks:
        summary = ceiling(task)
        if summary is not None:
            seconds[short(task)] = float(summary["wall_seconds"])
            machines.append(summary.get("machine"))
    if not seconds:
        return {}
    return {
        "training_seconds": seconds,
        "training_median_seconds": statistics.median(seconds.values()),
        "training_machines": [m for i, m in enumerate(machines) if m not in machines[:i]],
    }


def targets(
    mean: dict[str, float | None],
    timing: dict[str, Any],
    missing: dict[str, str],
    rows: dict[str, dict[str, Any]],
) -> list[dict[str, Any]]:
    """The issues' targets, each met, not met, or not measurable (with the reason)."""
    base, gen, nodef = mean["base"], mean["generated"], mean["generated-no-def"]
    speedup = timing.get("speedup")
    worst = None
    if mean["judged"] is not None and base is not None:
        worst = min(row["judged"] - row["base"] for row in rows.values())

    def why(*variants: str) -> str | None:
        """The first of ``variants`` whose row is missing (its reason is in ``missing``)."""
        return next((v for v in variants if v in missing), None)

    return [
        {
            "target": f"generated adapter + definition >= base + definition + {GAIN_TARGET:g} Rouge-L",
            "value": None if gen is None or base is None else gen - base,
            "met": None if gen is None or base is None else gen >= base + GAIN_TARGET,
            "missing": why("generated", "base"),
        },
        {
            "target": "generated adapter without the definition >= base with it",
            "value": None if nodef is None or base is None else nodef - base,
            "met": None if nodef is None or base is None else nodef >= base,
            "missing": why("generated-no-def", "base"),
        },
        {
            "target": f"with the judged fallback, no task below base + definition by more than "
            f"{-FALLBACK_FLOOR:g} Rouge-L (the worst task)",
            "value": worst,
            "met": None if worst is None else worst >= FALLBACK_FLOOR,
            "missing": why("judged", "base"),
        },
        {
            "target": f"making an adapter >= {SPEEDUP_TARGET:g}x faster than training one",
            "value": speedup,
            "met": None if speedup is None else speedup >= SPEEDUP_TARGET,
            "missing": None if speedup is not None else why("generated", "per-task"),
        },
    ]


def _fmt(value: float | None) -> str:
    return "missing" if value is None else f"{value:.1f}"


def report_lines(result: dict[str, Any]) -> list[str]:
    lines = [
        f"Natural-Instructions dev tasks (dev.instruction_to_adapter), at most {result['limit']} "
        f"test examples each, greedy, at most {result['max_new_tokens']} new tokens; "
        f"mean Rouge-L F x 100; base model {result['base_model']}.",
        "",
    ]
    columns = list(VARIANTS)
    lines += task_table(columns, VARIANTS, result["tasks"], result["mean"], _fmt)
    lines += ["", "Targets (issues 6 and 26):", ""]
    for target in result["targets"]:
        if target["met"] is None:
            row = VARIANTS.get(target["missing"], "a row")
            state = f"not measured: {row} is missing (see below)"
        else:
            value = target["value"]
            shown = f"{value:,.0f}x" if "faster" in target["target"] else f"{value:+.1f} Rouge-L"
            state = f"{'met' if target['met'] else 'NOT met'} ({shown})"
        lines.append(f"- {target['target']}: {state}")
    timing = result["timing"]
    lines += ["", "Time to make an adapter vs. to train one:", ""]
    if "generation_median_seconds" in timing:
        lines.append(
            f"- make one from an instruction: median {1000 * timing['generation_median_seconds']:.1f} "
            f"ms over {len(timing['generation_seconds'])} tasks after a warm-up call "
            f"({timing['generation_machine']['description']})"
        )
    else:
        lines.append("- make one from an instruction: missing (no hypernetwork)")
    if "training_median_seconds" in timing:
        where = "; ".join(m["description"] for m in timing["training_machines"] if m)
        lines.append(
            f"- train a per-task LoRA: median {timing['training_median_seconds'] / 60:.1f} min wall "
            f"over {len(timing['training_seconds'])} tasks, as the training runs recorded ({where})"
        )
    else:
        lines.append("- train a per-task LoRA: missing (no per-task LoRAs)")
    if result.get("checks"):
        won = sum(c["winner"] == "adapter" for c in result["checks"].values())
        lines.append(
            f"- the judged fallback's check: median {timing['check_median_seconds']:.2f} s per "
            f"task (two answers of at most {result['max_new_tokens']} tokens and one selection, "
            f"judged by {result['judge']}); the adapter won on {won} of "
            f"{len(result['checks'])} tasks"
        )
    if result["missing"]:
        lines += ["", "Missing rows:", ""]
        lines += [f"- {VARIANTS[v]}: {why}" for v, why in result["missing"].items()]
    notes = dev_list_lines(result.get("dev_lists") or [], _full_names(result))
    if notes:
        lines += ["", *notes]
    return lines


def _full_names(result: dict[str, Any]) -> list[str]:
    """The pool's names of the tasks a result holds (its rows are keyed by short names)."""
    listed = [t for info in result.get("dev_lists") or [] for t in info["tasks"]]
    return [t for t in listed if short(t) in result["tasks"]]


def write_report(result: dict[str, Any], folder: Path) -> None:
    write_results(folder, NAME, result, report_lines(result))
    shown = [v for v in VARIANTS if result["mean"][v] is not None]
    bar_chart(
        folder / f"{NAME}.png",
        [VARIANTS[v] for v in shown],
        [result["mean"][v] for v in shown],
        f"mean Rouge-L F, {len(result['tasks'])} Natural-Instructions dev tasks",
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--hypernet",
        default=DEFAULT_HYPERNET,
        metavar="REF",
        help=f"hypernetwork folder (default: the bundled {DEFAULT_HYPERNET}; missing: rows skipped)",
    )
    parser.add_argument(
        "--multitask", metavar="DIR", help="the multi-task LoRA (train-lora --multitask)"
    )
    parser.add_argument(
        "--per-task", metavar="DIR", help="folder of per-task LoRAs, one sub-folder per dev task"
    )
    parser.add_argument(
        "--train-missing",
        action="store_true",
        help="train the per-task LoRAs --per-task lacks (resumable: run again to continue)",
    )
    parser.add_argument(
        "--scorer",
        default="capplug-default",
        metavar="REF",
        help="the scorer the judged fallback's selector judges with (default: capplug-default)",
    )
    parser.add_argument("--limit", type=int, default=100, help="test examples per task")
    parser.add_argument(
        "--tasks",
        nargs="*",
        help="a subset of dev.instruction_to_adapter (natural_instructions_v1/subtask043_..., or "
        "subtask043_...)",
    )
    parser.add_argument(
        "--base", metavar="REF", help="base model (default: the hypernetwork's, else SmolLM2)"
    )
    parser.add_argument("--batch", type=int, default=16, help="prompts per generation call")
    parser.add_argument("--device", help="cpu, cuda, ... (default: the GPU if there is one)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where to write the report")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    add_data_option(parser)
    args = parser.parse_args(argv)
    if args.train_missing and not args.per_task:
        parser.error("--train-missing needs --per-task DIR to train into")
    if args.limit < 1 or args.batch < 1:
        parser.error("--limit and --batch must be >= 1")
    args.pool = open_data(args, parser)
    try:
        allowed = dev_tasks(args.pool, NAME)
    except DataError as exc:
        parser.error(str(exc))
    args.tasks = resolve_tasks(parser, args.pool, args.tasks, allowed, "dev.instruction_to_adapter")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = evaluate(args, args.pool)
    write_report(result, args.results)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
