"""``capplug adapters train-lora | train-hypernet | generate | answer``: making adapters.

The store-admin commands (``capplug store ...``) are also registered here, under their first name.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from capplug.chat import blank
from capplug.cli._common import (
    UsageError,
    add_device_option,
    add_hypernet_option,
)
from capplug.data.pool import add_data_option
from capplug.models import DEFAULT_CHAT_MODEL, DEFAULT_SCORER

if TYPE_CHECKING:
    from capplug.data import Pool


def add_parser(sub: Any) -> None:
    adapters = sub.add_parser(
        "adapters",
        help="LoRA adapters for a local model: teachers, the hypernetwork, instruction to adapter",
        description=(
            "Train per-task teacher LoRAs and the hypernetwork that writes an adapter from an "
            "instruction; make an adapter from an instruction and answer with it. Needs "
            "capplug[adapters]."
        ),
    )
    adapters_sub = adapters.add_subparsers(title="adapter commands", metavar="ACTION")

    _add_train_lora(adapters_sub)
    _add_train_hypernet(adapters_sub)
    _add_generate(adapters_sub)
    _add_answer(adapters_sub)
    from capplug.cli.store import register as register_store_commands

    # list | show | lookup | create | import | check | pin | rm | gc | verify: also `capplug store`
    register_store_commands(adapters_sub)
    adapters.set_defaults(run=lambda _args: adapters.print_help() or 2)


def _add_train_lora(adapters_sub: Any) -> None:
    lora = adapters_sub.add_parser(
        "train-lora",
        help="train a teacher LoRA on a train task of the task data (resumable)",
        description=(
            "Train a peft LoRA on the train examples of one train task of the task data (--data) "
            "that has an instruction, the instruction and input in the prompt and the loss on "
            "the answer. With --task the adapter is written into --out; with --all every Natural "
            "Instructions train task gets --out/<task>/, finished ones are skipped; with "
            "--multitask one adapter in --out learns the train examples of all of them mixed (an "
            "equal share each; 16 steps per task by default). Run the same command again to "
            "resume."
        ),
    )
    lora.add_argument(
        "--task",
        metavar="NAME",
        help="a train task, e.g. natural_instructions_v1/subtask003_... (a name without its "
        "source is enough when only one task has it)",
    )
    lora.add_argument(
        "--all", action="store_true", help="every Natural Instructions train task, one each"
    )
    lora.add_argument(
        "--multitask",
        action="store_true",
        help="one adapter on all Natural Instructions train tasks mixed (the multi-task baseline)",
    )
    lora.add_argument("--out", required=True, metavar="DIR", help="adapter folder (--all: parent)")
    lora.add_argument(
        "--base",
        default=DEFAULT_CHAT_MODEL,
        metavar="REF",
        help=f"model to adapt (default: {DEFAULT_CHAT_MODEL})",
    )
    lora.add_argument("--r", type=int, help="LoRA rank (default: 8)")
    lora.add_argument("--alpha", type=int, help="LoRA alpha (default: 16)")
    lora.add_argument(
        "--target-modules",
        metavar="NAMES",
        help="comma-separated linear layers to adapt (default: q_proj,v_proj)",
    )
    lora.add_argument(
        "--steps",
        type=int,
        help="optimizer steps per adapter (default: 64; --multitask: 16 per task mixed)",
    )
    lora.add_argument("--batch-size", type=int, help="examples per step (default: 4)")
    lora.add_argument("--lr", type=float, help="peak learning rate (default: 5e-4)")
    lora.add_argument("--max-length", type=int, help="tokens per example (default: 256)")
    lora.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        help="bf16: bfloat16 autocast, faster on CPUs with AVX-512 BF16 and on GPUs (default: fp32)",
    )
    lora.add_argument("--seed", type=int, help="(default: 0)")
    lora.add_argument("--restart", action="store_true", help="ignore a checkpoint: start over")
    add_data_option(lora)
    add_device_option(lora)
    lora.set_defaults(run=_run_adapters_train_lora)


def _add_train_hypernet(adapters_sub: Any) -> None:
    hyper = adapters_sub.add_parser(
        "train-hypernet",
        help="train the instruction-to-adapter hypernetwork from teacher LoRAs (resumable)",
        description=(
            "Train a hypernetwork with TAGI's objective: the answer's loss under the generated "
            "adapter without the definition, + lambda-kl * KL from the teacher LoRA with the "
            "definition, + lambda-weights * the distance of the generated update B@A from the "
            "teacher's. The first --reconstruction-steps train on the weight distance alone. "
            "Without --teachers (or for a task that has none) the KL is taken from the base "
            "model reading the definition, and there is no weight term. It trains on train tasks "
            "of the task data (--data) that have an instruction. Run the same command again to "
            "resume."
        ),
    )
    hyper.add_argument(
        "--teachers",
        metavar="DIR",
        help="the folder `train-lora --all` wrote (default: train without teachers)",
    )
    hyper.add_argument(
        "--task",
        action="append",
        metavar="NAME",
        help="train on these tasks only (repeatable; default: the teachers' tasks, or without "
        "--teachers every train task that has an instruction)",
    )
    hyper.add_argument("--r", type=int, default=8, help="rank, without teachers (default: 8)")
    hyper.add_argument(
        "--alpha", type=int, default=16, help="alpha, without teachers (default: 16)"
    )
    hyper.add_argument(
        "--target-modules",
        default="q_proj,v_proj",
        metavar="NAMES",
        help="comma-separated adapted layers, without teachers (default: q_proj,v_proj)",
    )
    hyper.add_argument("--out", required=True, metavar="DIR", help="run folder and hypernetwork")
    hyper.add_argument(
        "--base",
        default=DEFAULT_CHAT_MODEL,
        metavar="REF",
        help=f"the model the teachers adapt (default: {DEFAULT_CHAT_MODEL})",
    )
    hyper.add_argument(
        "--encoder",
        default="minilm",
        metavar="REF",
        help="instruction encoder: a sentence encoder (default: minilm) or 'base'",
    )
    hyper.add_argument("--hidden-dim", type=int, default=256, help="trunk width (default: 256)")
    hyper.add_argument(
        "--init-from",
        metavar="REF",
        help="train a trained hypernetwork further (a folder, or "
        "capplug-hypernet-smollm2); its shape wins over --r, --encoder and the rest",
    )
    _add_hypernet_training_options(hyper.add_argument_group("training"))
    add_data_option(hyper)
    add_device_option(hyper)
    hyper.set_defaults(run=_run_adapters_train_hypernet)


def _add_hypernet_training_options(training: Any) -> None:
    """`train-hypernet`'s schedule, losses and precision."""
    training.add_argument("--steps", type=int, help="optimizer steps in all (default: 1000)")
    training.add_argument(
        "--reconstruction-steps",
        type=int,
        help="weight-distance-only warm start (default: 200 with --teachers, else 0)",
    )
    training.add_argument("--tasks-per-step", type=int, help="tasks per step (default: 4)")
    training.add_argument("--examples-per-task", type=int, help="examples per task (default: 2)")
    training.add_argument("--lr", type=float, help="peak learning rate (default: 3e-4)")
    training.add_argument("--lambda-kl", type=float, help="weight of the KL term (default: 1.0)")
    training.add_argument(
        "--lambda-weights", type=float, help="weight of the weight-distance term (default: 1.0)"
    )
    training.add_argument(
        "--student-definition-rate",
        type=float,
        help="share of rows whose student also reads the definition (default: 0)",
    )
    training.add_argument("--max-length", type=int, help="tokens per example (default: 256)")
    training.add_argument("--precision", choices=("fp32", "bf16"), help="(default: fp32)")
    training.add_argument("--eval-every", type=int, help="steps between evaluations (default: 100)")
    training.add_argument("--seed", type=int, help="(default: 0)")


def _add_generate(adapters_sub: Any) -> None:
    generate = adapters_sub.add_parser(
        "generate",
        help="write a peft adapter for an instruction with the hypernetwork",
        description="Write the LoRA adapter the hypernetwork makes for --instruction into --out "
        "(a standard peft folder).",
    )
    generate.add_argument("--instruction", required=True, metavar="TEXT", help="the task")
    generate.add_argument("--out", required=True, metavar="DIR", help="adapter folder to write")
    add_hypernet_option(generate)
    generate.add_argument("--json", action="store_true", help="print the result as JSON")
    generate.set_defaults(run=_run_adapters_generate)


def _add_answer(adapters_sub: Any) -> None:
    answer = adapters_sub.add_parser(
        "answer",
        help="make an adapter for an instruction and answer one input with it",
        description="Make the adapter for --instruction, attach it to the base model, and "
        "answer --input (which the model reads without the instruction, unless "
        "--with-instruction).",
    )
    answer.add_argument("--instruction", required=True, metavar="TEXT", help="the task")
    answer.add_argument("--input", required=True, metavar="TEXT", help="one input of the task")
    answer.add_argument(
        "--with-instruction",
        action="store_true",
        help="also put the instruction in the prompt",
    )
    answer.add_argument(
        "--max-new-tokens", type=int, default=64, help="longest answer (default: 64)"
    )
    answer.add_argument(
        "--judge",
        action="store_true",
        help="the judged fallback: also answer with the bare base model (the instruction in its "
        "prompt) and print the answer the selector judges better; the decision and both scores "
        "go to stderr",
    )
    answer.add_argument(
        "--scorer",
        default=DEFAULT_SCORER,
        metavar="REF",
        help=f"with --judge: the scorer the selector judges with (default: {DEFAULT_SCORER})",
    )
    add_hypernet_option(answer)
    answer.set_defaults(run=_run_adapters_answer)


def _adapters_module(name: str) -> Any:
    import importlib

    try:
        return importlib.import_module(f"capplug.{name}")
    except ImportError as exc:
        if "peft" not in str(exc):
            raise
        raise UsageError(
            f"`capplug adapters` needs peft: pip install 'capplug[adapters]' ({exc})"
        ) from exc


def _check_instruction_arg(text: str, option: str = "--instruction") -> None:
    if blank(text):
        raise UsageError(f"{option} is empty; give the task's instruction text")


def _run_adapters_train_lora(args: argparse.Namespace) -> int:
    if sum((bool(args.task), bool(args.all), bool(args.multitask))) != 1:
        raise UsageError(
            "give either --task NAME (one task), --all (every train task, one adapter each) or "
            "--multitask (one adapter for all train tasks mixed)"
        )
    lora = _adapters_module("training.teacher_lora")
    pool = _pool(args)
    if args.task:
        lora.check_train_task(args.task, data=pool)  # before any model loads
    overrides = {
        "r": args.r,
        "alpha": args.alpha,
        "target_modules": tuple(t.strip() for t in args.target_modules.split(",") if t.strip())
        if args.target_modules
        else None,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "max_length": args.max_length,
        "precision": args.precision,
        "seed": args.seed,
    }
    if args.multitask:
        tasks = lora.train_task_names(pool)
        if not tasks:
            raise UsageError(
                f"{pool.root} holds no Natural Instructions train tasks for --multitask"
            )
        config = lora.multitask_config(len(tasks), **overrides)
        result = lora.train_multitask_lora(
            args.out,
            tasks=tasks,
            base=args.base,
            config=config,
            resume=not args.restart,
            device=args.device,
            data=pool,
        )
        state, before, after = _lora_summary(result)
        print(
            f"multi-task adapter: {result.steps} steps on {result.train_examples} examples "
            f"({state}); held-out loss {before} -> {after}"
        )
        print(result.out_dir)
        return 0
    config = lora.config_with(None, **overrides)
    if args.all:
        if args.restart:
            raise UsageError("--restart applies to --task only; delete a task's folder to redo it")
        results = lora.train_all(
            args.out, base=args.base, config=config, device=args.device, data=pool
        )
        trained = [r for r in results if not r.skipped]
        print(f"{len(results)} teachers at {args.out} ({len(trained)} trained now)")
        return 0
    result = lora.train_task_lora(
        args.task,
        args.out,
        base=args.base,
        config=config,
        resume=not args.restart,
        device=args.device,
        data=pool,
    )
    state, before, after = _lora_summary(result)
    print(f"{result.task}: {result.steps} steps ({state}); held-out loss {before} -> {after}")
    print(result.out_dir)
    return 0


def _pool(args: argparse.Namespace) -> Pool:
    """The task pool of ``--data`` (default: the default places), ``--strict`` when asked."""
    from capplug.data import open_pool

    return open_pool(args.data, strict=args.strict)


def _lora_summary(result: Any) -> tuple[str, str, str]:
    """A trained LoRA's (state, held-out loss before, after), as the commands print them."""
    before = "n/a" if result.eval_loss_before is None else f"{result.eval_loss_before:.3f}"
    after = "n/a" if result.eval_loss_after is None else f"{result.eval_loss_after:.3f}"
    state = "already trained" if result.skipped else f"{result.wall_seconds / 60:.1f} min"
    return state, before, after


def _run_adapters_train_hypernet(args: argparse.Namespace) -> int:
    train = _adapters_module("training.hypernetwork")
    # find_teachers fails before any model loads
    teachers = train.find_teachers(args.teachers) if args.teachers else None
    if teachers is None and args.reconstruction_steps is None:
        args.reconstruction_steps = 0
    given = {
        "steps": args.steps,
        "reconstruction_steps": args.reconstruction_steps,
        "tasks_per_step": args.tasks_per_step,
        "examples_per_task": args.examples_per_task,
        "lr": args.lr,
        "lambda_kl": args.lambda_kl,
        "lambda_weights": args.lambda_weights,
        "student_definition_rate": args.student_definition_rate,
        "max_length": args.max_length,
        "precision": args.precision,
        "eval_every": args.eval_every,
        "seed": args.seed,
    }
    config = train.HypernetTrainConfig(**{k: v for k, v in given.items() if v is not None})
    result = train.train_hypernetwork(
        teachers,
        args.out,
        base=args.base,
        encoder=args.encoder,
        hidden_dim=args.hidden_dim,
        init_from=args.init_from,
        config=config,
        task_names=args.task,
        r=args.r,
        alpha=args.alpha,
        target_modules=[m.strip() for m in args.target_modules.split(",") if m.strip()],
        device=args.device,
        data=_pool(args),
    )
    best = result.best_eval or {}
    print(
        f"hypernetwork trained {result.steps} steps on {len(result.tasks)} tasks in "
        f"{result.wall_seconds / 60:.1f} min; best held-out L_pred "
        f"{best.get('eval_pred', float('nan')):.3f} (step {best.get('step', '-')})"
    )
    print(result.out_dir)
    return 0


def _run_adapters_generate(args: argparse.Namespace) -> int:
    import time

    _check_instruction_arg(args.instruction)
    hypernetwork = _adapters_module("adapters.hypernetwork")
    hypernet = hypernetwork.Hypernetwork.from_pretrained(args.hypernet, device=args.device)
    started = time.perf_counter()
    folder = hypernet.write_adapter(args.instruction, args.out)
    seconds = time.perf_counter() - started
    if args.json:
        import json

        print(
            json.dumps(
                {
                    "folder": str(folder),
                    "base_model": hypernet.config.base_model,
                    "seconds": round(seconds, 3),
                }
            )
        )
        return 0
    print(f"adapter for {hypernet.config.base_model} in {seconds:.2f} s")
    print(folder)
    return 0


def _run_adapters_answer(args: argparse.Namespace) -> int:
    _check_instruction_arg(args.instruction)
    _check_instruction_arg(args.input, "--input")
    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be >= 1")
    hypernetwork = _adapters_module("adapters.hypernetwork")
    runtime = _adapters_module("adapters.runtime")
    hypernet = hypernetwork.Hypernetwork.from_pretrained(args.hypernet, device=args.device)
    state_dict, config = hypernet.generate(args.instruction)
    model = runtime.AdapterRuntime.from_pretrained(
        hypernet.config.base_ref, device=args.device, max_loaded=1
    )
    model.add_weights("generated", state_dict, config)
    definition = args.instruction if args.with_instruction else None
    user_prompt = _adapters_module("adapters.examples").user_prompt
    prompt = user_prompt(args.input, definition)
    if not args.judge:
        print(model.generate([prompt], adapter="generated", max_new_tokens=args.max_new_tokens)[0])
        return 0
    from capplug.selection import Reranker

    fallback = _adapters_module("adapters.fallback")
    judge = fallback.AdapterJudge(model, Reranker(args.scorer), max_new_tokens=args.max_new_tokens)
    comparison = judge.compare("generated", prompt, user_prompt(args.input, args.instruction))
    scores = ", ".join(f"{side} {score:.3f}" for side, score in comparison.scores.items())
    print(
        f"judged by {comparison.judge}: the {comparison.winner} answer is better ({scores})",
        file=sys.stderr,
    )
    print(comparison.answer)
    return 0
