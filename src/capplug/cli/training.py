"""``capplug train``, ``adapt`` and ``fit-selector``: training the scorer and its selection weights."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from capplug.chat import blank
from capplug.cli._common import UsageError, add_device_option
from capplug.models import DEFAULT_SCORER


def add_parser(sub: Any) -> None:
    """Add this module's commands to the ``capplug`` subparsers."""
    _add_train(sub)
    _add_adapt(sub)
    _add_fit_selector(sub)


def _add_train(sub: Any) -> None:
    train = sub.add_parser(
        "train",
        help="train a scorer from a backbone on weakly labelled data (continual pretraining)",
        description=(
            "Train a scorer on labelled pairs: a folder of Parquet shards from `capplug data build`, "
            "or a JSONL/CSV/Parquet file. A held-out slice (by example) drives early stopping. "
            "Run the same command again to resume an interrupted run."
        ),
    )
    train.add_argument(
        "--data", required=True, metavar="PATH", help="folder of shards, or a data file"
    )
    train.add_argument(
        "--backbone",
        default="minilm",
        metavar="REF",
        help="encoder to start from (default: minilm)",
    )
    train.add_argument(
        "--out", required=True, metavar="DIR", help="run folder: checkpoints, log, final model"
    )
    _training_options(train, epochs=1.0, lr=3e-5)
    train.set_defaults(run=_run_train)


def _add_adapt(sub: Any) -> None:
    adapt = sub.add_parser(
        "adapt",
        help="fine-tune a scorer on your own labelled data (the LLM is never touched)",
        description=(
            "Adapt a scorer to your task. Rows (JSONL, CSV or Parquet) hold 'instruction', "
            "'response' and either 'label' in [0, 1] or 'reference' (the correct answer; the label "
            "becomes Rouge-L against it). Every row is checked before training starts. With "
            "--from-feedback the rows are the judged selections of a feedback store. After "
            "training, a guard compares the adapted scorer's picks with the starting scorer's "
            "on the held-out examples and says whether to use it (guard.json in --out)."
        ),
    )
    adapt.add_argument(
        "--scorer",
        default=DEFAULT_SCORER,
        metavar="REF",
        help=f"scorer to start from (default: {DEFAULT_SCORER})",
    )
    source = adapt.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", metavar="FILE", help="your labelled rows")
    source.add_argument(
        "--from-feedback",
        action="store_true",
        help="train on the judged selections of the feedback store (--db)",
    )
    adapt.add_argument(
        "--db",
        metavar="FILE",
        help="with --from-feedback: the feedback store (default: $CAPPLUG_FEEDBACK_DB or "
        "feedback.sqlite3 in the capplug home)",
    )
    adapt.add_argument(
        "--out",
        metavar="DIR",
        help="run folder: checkpoints, log, final model (with --task-scorers: one run folder per "
        "task under it; default: runs/ in the task-scorer folder)",
    )
    tasks = adapt.add_argument_group("task scorers (with --from-feedback)")
    tasks.add_argument(
        "--task-scorers",
        nargs="?",
        const=True,
        default=None,
        metavar="DIR",
        help="adapt one task scorer per task of the feedback (a LoRA over --scorer), guard it on "
        "that task's held-out selections and store it in DIR (default: $CAPPLUG_TASK_SCORERS "
        "or task-scorers in the capplug home), where the proxy and Reranker(task_scorers=...) "
        "find it by instruction. Tasks are the system messages of the judged selections",
    )
    tasks.add_argument(
        "--instruction-like",
        metavar="TEXT",
        help="one task: every judged selection whose task is similar to TEXT (the store's "
        "threshold), stored under TEXT (for prompts without a system message)",
    )
    tasks.add_argument(
        "--min-selections",
        type=int,
        default=8,
        metavar="N",
        help="skip tasks with fewer judged selections (default: 8)",
    )
    _training_options(adapt, epochs=None, lr=None)
    adapt.add_argument(
        "--lora-rank",
        type=int,
        default=None,
        metavar="R",
        help="train a rank-R LoRA instead of every weight: the output is a task scorer (about "
        "1.3 MB), loadable as a scorer and storable (default: every weight; 8 with "
        "--task-scorers)",
    )
    adapt.set_defaults(run=_run_adapt)


def _add_fit_selector(sub: Any) -> None:
    selector = sub.add_parser(
        "fit-selector",
        help="refit the selection weights (scorer, agreement, log-probs) on your candidate sets",
        description=(
            "Fit the weights that fuse the scorer, agreement among candidates and log-"
            "probabilities, from a JSONL of candidate sets whose quality you know, and store "
            "them in a scorer checkpoint's config.json (capplug_selection), where Reranker "
            "finds them. Each line: 'instruction', 'candidates' (a list), and 'quality' (one "
            "number per candidate) or 'reference' (Rouge-L to it is the quality); optionally "
            "'logprobs' (summed per candidate), 'token_counts' and 'group' (every group weighs "
            "the same)."
        ),
    )
    selector.add_argument("--data", required=True, metavar="FILE", help="candidate sets (JSONL)")
    selector.add_argument(
        "--scorer",
        default=DEFAULT_SCORER,
        metavar="REF",
        help=f"the scorer whose scores are a signal (default: {DEFAULT_SCORER})",
    )
    selector.add_argument(
        "--into",
        required=True,
        metavar="FOLDER",
        help="the scorer checkpoint folder to write the weights into (e.g. your adapted scorer)",
    )
    selector.add_argument(
        "--judged",
        action="store_true",
        help="the sets' log-probabilities are a local LM's log-likelihoods of candidates it did "
        "not draw (options, answers from other models, as Reranker(lm=...) computes them): fit "
        "the table for judged candidates and keep the checkpoint's main table (without it: fit "
        "the main table and keep the judged one)",
    )
    selector.add_argument("--temperature", type=float, default=0.05, help="target sharpness")
    selector.add_argument("--l2", type=float, default=1e-2, help="weight decay of the fit")
    add_device_option(selector)
    selector.set_defaults(run=_run_fit_selector)


def _training_options(
    parser: argparse.ArgumentParser, *, epochs: float | None, lr: float | None
) -> None:
    """The training options; ``None`` defaults are filled per recipe (see ``_train_config``)."""
    group = parser.add_argument_group("training")
    group.add_argument(
        "--epochs",
        type=float,
        default=epochs,
        help=f"passes over the data (default: {epochs or '3, or 8 for a task scorer'})",
    )
    group.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    group.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="pairs per step (default: 32; 16 for a task scorer)",
    )
    group.add_argument(
        "--grad-accum", type=int, default=1, help="batches per optimizer step (default: 1)"
    )
    group.add_argument(
        "--lr",
        type=float,
        default=lr,
        help=f"peak learning rate (default: {lr or '2e-5, or 5e-4 for a task scorer'})",
    )
    group.add_argument(
        "--max-length", type=int, default=256, help="tokens per pair in training (default: 256)"
    )
    group.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="steps between evaluations and checkpoints (default: 200; 10 for a task scorer)",
    )
    group.add_argument(
        "--patience",
        type=int,
        default=None,
        help="evaluations without improvement before stopping (default: 5; a task scorer "
        "trains all its epochs)",
    )
    group.add_argument(
        "--heldout",
        type=float,
        default=None,
        help="share of examples held out (default: 0.05; 0.25 of each task's selections for "
        "the guard of a task scorer)",
    )
    group.add_argument(
        "--rank-weight",
        type=float,
        default=None,
        help="weight of a pairwise ranking loss within each example's responses, added to the"
        " pointwise loss (default: 0, pointwise only; 1 for a task scorer)",
    )
    group.add_argument(
        "--listwise-weight",
        type=float,
        default=0.0,
        help="weight of a listwise loss: the softmax over each example's responses against"
        " its labels, the decision multiple choice makes (default: 0)",
    )
    group.add_argument("--seed", type=int, default=0)
    group.add_argument(
        "--json", action="store_true", help="print the result as one JSON object at the end"
    )
    add_device_option(group)


def _train_config(args: argparse.Namespace) -> Any:
    from dataclasses import replace

    from capplug.training.scorer import TrainConfig
    from capplug.training.task_scorers import TASK_SCORER_CONFIG

    lora_rank = getattr(args, "lora_rank", None)
    task = getattr(args, "task_scorers", None) is not None or bool(lora_rank)
    # Unset options take the recipe's defaults: full training, or the task-scorer recipe.
    recipe = TASK_SCORER_CONFIG if task else TrainConfig(learning_rate=2e-5, epochs=3.0)
    defaults = {
        "epochs": recipe.epochs,
        "lr": recipe.learning_rate,
        "rank_weight": recipe.rank_weight,
        "batch_size": recipe.batch_size,
        "eval_every": recipe.eval_every,
        "heldout": 0.25 if task else 0.05,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    patience = recipe.patience if args.patience is None else args.patience
    if lora_rank is not None and lora_rank < 1:
        raise UsageError(f"--lora-rank must be >= 1; got {lora_rank}")
    for name in ("batch_size", "grad_accum", "max_length", "eval_every"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    if args.lr <= 0 or args.epochs <= 0:
        raise UsageError("--lr and --epochs must be positive")
    if args.rank_weight < 0:
        raise UsageError(f"--rank-weight must be >= 0; got {args.rank_weight}")
    if args.listwise_weight < 0:
        raise UsageError(f"--listwise-weight must be >= 0; got {args.listwise_weight}")
    config = TrainConfig(
        learning_rate=args.lr,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        epochs=args.epochs,
        max_steps=args.max_steps,
        max_length=args.max_length,
        eval_every=args.eval_every,
        patience=patience,
        seed=args.seed,
        rank_weight=args.rank_weight,
        listwise_weight=args.listwise_weight,
    )
    if task:
        config = replace(config, lora_rank=lora_rank or TASK_SCORER_CONFIG.lora_rank)
    return config


def _run_training(
    args: argparse.Namespace,
    scorer_loader: Any,
    description: str,
    *,
    guarded: bool = False,
) -> int:
    from capplug.training.scorer import format_metrics, split_heldout, train_scorer

    config = _train_config(args)
    pairs = _labelled_pairs(args)  # every row is checked before a model loads
    train_pairs, heldout = split_heldout(pairs, fraction=args.heldout, seed=args.seed)
    scorer = scorer_loader()
    result = train_scorer(
        scorer,
        train_pairs,
        args.out,
        eval_pairs=heldout,
        config=config,
        data_description=description,
    )
    report = _guard(scorer_loader, result.out_dir, heldout) if guarded else None
    if getattr(args, "json", False):
        print(
            json.dumps(
                {
                    "out_dir": str(result.out_dir),
                    "steps": result.steps,
                    "wall_seconds": round(result.wall_seconds, 3),
                    "stopped_early": result.stopped_early,
                    "metrics": result.metrics,
                    "metrics_before": result.metrics_before,
                    "guard": None if report is None else report.to_dict(),
                }
            )
        )
        return 0
    print(
        f"trained {result.steps} steps in {result.wall_seconds / 60:.1f} min; "
        f"held-out: {format_metrics(result.metrics)}"
    )
    if result.metrics_before:
        print(f"held-out before training: {format_metrics(result.metrics_before)}")
    if report is not None:
        print(f"guard: {report.reason}")
    print(result.out_dir)
    return 0


def _labelled_pairs(args: argparse.Namespace) -> Any:
    """The rows to train on: ``--data``, or with ``--from-feedback`` the judged selections."""
    from capplug.data.rows import labelled_pairs, read_labelled_pairs

    if not getattr(args, "from_feedback", False):
        return read_labelled_pairs(args.data)
    store, rows = _judged_rows(args.db)
    return labelled_pairs(rows, where=f"judged selections in {store.path}")


def _judged_rows(db: str | None) -> tuple[Any, list[dict[str, Any]]]:
    """The feedback store at ``db`` and its judged selections as rows; none is a usage error."""
    from capplug.cli.feedback import open_store

    store = open_store(db)
    rows = list(store.rows())
    if not rows:
        raise UsageError(
            f"the feedback store {store.path} holds no judged selection yet; judge some "
            "(POST /v1/feedback, FeedbackStore.add or `capplug feedback add`) first"
        )
    return store, rows


def _guard(scorer_loader: Any, out_dir: Any, heldout: Any) -> Any:
    """Compare the adapted scorer with the starting one on the held-out examples; the verdict
    is also written to ``guard.json`` in the run folder."""
    from capplug.scoring import Scorer
    from capplug.scoring.guard import guard

    report = guard(scorer_loader(), Scorer.from_pretrained(out_dir), heldout)
    (out_dir / "guard.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report


def _run_train(args: argparse.Namespace) -> int:
    from capplug.scoring import Scorer

    return _run_training(
        args,
        lambda: Scorer.from_backbone(args.backbone, device=args.device, seed=args.seed),
        f"{args.data} (continual pretraining from {args.backbone})",
    )


def _run_adapt(args: argparse.Namespace) -> int:
    from capplug.scoring import Scorer

    if args.db is not None and not args.from_feedback:
        raise UsageError("--db goes with --from-feedback")
    if args.task_scorers is not None or args.instruction_like is not None:
        return _run_adapt_tasks(args)
    if args.out is None:
        raise UsageError("give --out DIR, the run folder (or --task-scorers to store task scorers)")
    data = "judged selections of the feedback store" if args.from_feedback else args.data
    return _run_training(
        args,
        lambda: Scorer.from_pretrained(args.scorer, device=args.device),
        f"{data} (adapted from {args.scorer})",
        guarded=True,
    )


def _run_adapt_tasks(args: argparse.Namespace) -> int:
    """``capplug adapt --from-feedback --task-scorers``: one guarded task scorer per task."""
    from capplug.adapters.task_scorers import TaskScorers
    from capplug.scoring import Scorer
    from capplug.training.task_scorers import adapt_task_scorers

    if args.task_scorers is None:
        raise UsageError("--instruction-like goes with --task-scorers (where to store it)")
    if not args.from_feedback:
        raise UsageError("--task-scorers goes with --from-feedback")
    if args.instruction_like is not None and blank(args.instruction_like):
        raise UsageError("--instruction-like needs the task's instruction text")
    if args.min_selections < 2:
        raise UsageError("--min-selections must be >= 2 (one to train on, one for the guard)")
    config = _train_config(args)
    feedback, rows = _judged_rows(args.db)
    scorer = Scorer.from_pretrained(args.scorer, device=args.device)
    store = TaskScorers(
        None if args.task_scorers in (None, True) else args.task_scorers, scorer=scorer
    )
    out = Path(args.out) if args.out else store.store.root / "runs"
    quiet = getattr(args, "json", False)
    results = adapt_task_scorers(
        rows,
        store,
        out,
        instruction_like=args.instruction_like,
        config=config,
        min_selections=args.min_selections,
        heldout=args.heldout,
        progress=not quiet,
        log=(lambda _line: None) if quiet else print,
    )
    if quiet:
        print(
            json.dumps(
                {"task_scorers": str(store.store.root), "tasks": [r.to_dict() for r in results]}
            )
        )
        return 0
    if not results:
        like = f" similar to {args.instruction_like!r}" if args.instruction_like else ""
        print(f"no judged selection{like} in {feedback.path}; nothing adapted")
        return 1
    used = sum(r.used for r in results)
    print(
        f"{len(results)} tasks: {used} task scorers in use, "
        f"{sum(r.record is not None and not r.used for r in results)} stored but not used "
        f"(the guard), {sum(r.skipped is not None for r in results)} skipped; in {store.store.root}"
    )
    return 0


def _run_fit_selector(args: argparse.Namespace) -> int:
    from capplug.scoring import Scorer
    from capplug.selection import SIGNALS, Combiner, load_combiner
    from capplug.selection.fit import candidate_sets, fit_combiner, pick_quality, write_combiner

    if args.temperature <= 0 or args.l2 < 0:
        raise UsageError("--temperature must be > 0 and --l2 >= 0")
    into = Path(args.into)
    if not (into / "config.json").is_file():
        raise UsageError(f"--into {into} is not a scorer checkpoint folder (no config.json)")
    rows = []
    with open(args.data, encoding="utf-8") as handle:
        for n, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise UsageError(f"{args.data}, line {n}: not JSON ({exc.msg})") from None
    scorer = Scorer.from_pretrained(args.scorer, device=args.device)
    sets = candidate_sets(rows, scorer)
    combiner = fit_combiner(
        sets, temperature=args.temperature, l2=args.l2, info={"fitted_on": str(args.data)}
    )
    present = [s for s in SIGNALS if all(s in c.values for c in sets)]
    full = combiner.weights_for(present)
    kept = load_combiner(into)  # the table this fit does not replace stays as it was
    if args.judged:
        info = {**kept.info, "judged": dict(combiner.info)}
        combiner = Combiner(kept.weights, info, combiner.weights)
    else:
        combiner = Combiner(combiner.weights, combiner.info, kept.judged)
    table = "judged" if args.judged else "main"
    fitted = len(combiner.judged if args.judged else combiner.weights)
    print(f"fitted {fitted} weight sets ({table} table) on {len(sets)} candidate sets")
    print(f"weights with every signal: {json.dumps({k: round(v, 3) for k, v in full.items()})}")
    print(
        f"mean quality of the pick on these sets: fused {pick_quality(sets, full):.3f}, "
        f"scorer alone {pick_quality(sets, {'scorer': 1.0}):.3f}"
    )
    print(f"wrote {write_combiner(combiner, into)}")
    return 0
