"""``capplug train``, ``adapt`` and ``fit-selector``: training the scorer and its selection weights."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from capplug.cli._common import UsageError, add_device_option
from capplug.models import DEFAULT_SCORER


def add_parser(sub: Any) -> None:
    """Add this module's commands to the ``capplug`` subparsers."""
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
        "--out", required=True, metavar="DIR", help="run folder: checkpoints, log, final model"
    )
    _training_options(adapt, epochs=3.0, lr=2e-5)
    adapt.set_defaults(run=_run_adapt)

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
    selector.add_argument("--temperature", type=float, default=0.05, help="target sharpness")
    selector.add_argument("--l2", type=float, default=1e-2, help="weight decay of the fit")
    add_device_option(selector)
    selector.set_defaults(run=_run_fit_selector)


def _training_options(parser: argparse.ArgumentParser, *, epochs: float, lr: float) -> None:
    group = parser.add_argument_group("training")
    group.add_argument(
        "--epochs", type=float, default=epochs, help=f"passes over the data (default: {epochs})"
    )
    group.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    group.add_argument("--batch-size", type=int, default=32, help="pairs per step (default: 32)")
    group.add_argument(
        "--grad-accum", type=int, default=1, help="batches per optimizer step (default: 1)"
    )
    group.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default: {lr})")
    group.add_argument(
        "--max-length", type=int, default=256, help="tokens per pair in training (default: 256)"
    )
    group.add_argument(
        "--eval-every", type=int, default=200, help="steps between evaluations and checkpoints"
    )
    group.add_argument(
        "--patience", type=int, default=5, help="evaluations without improvement before stopping"
    )
    group.add_argument(
        "--heldout", type=float, default=0.05, help="share of examples held out (default: 0.05)"
    )
    group.add_argument(
        "--rank-weight",
        type=float,
        default=0.0,
        help="weight of a pairwise ranking loss within each example's responses, added to the"
        " pointwise loss (default: 0, pointwise only)",
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
    from capplug.training.scorer import TrainConfig

    for name in ("batch_size", "grad_accum", "max_length", "eval_every"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    if args.lr <= 0 or args.epochs <= 0:
        raise UsageError("--lr and --epochs must be positive")
    if args.rank_weight < 0:
        raise UsageError(f"--rank-weight must be >= 0; got {args.rank_weight}")
    if args.listwise_weight < 0:
        raise UsageError(f"--listwise-weight must be >= 0; got {args.listwise_weight}")
    return TrainConfig(
        learning_rate=args.lr,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        epochs=args.epochs,
        max_steps=args.max_steps,
        max_length=args.max_length,
        eval_every=args.eval_every,
        patience=args.patience,
        seed=args.seed,
        rank_weight=args.rank_weight,
        listwise_weight=args.listwise_weight,
    )


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
    from capplug.cli.feedback import open_store

    store = open_store(args.db)
    rows = list(store.rows())
    if not rows:
        raise UsageError(
            f"the feedback store {store.path} holds no judged selection yet; judge some "
            "(POST /v1/feedback, FeedbackStore.add or `capplug feedback add`) first"
        )
    return labelled_pairs(rows, where=f"judged selections in {store.path}")


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
    data = "judged selections of the feedback store" if args.from_feedback else args.data
    return _run_training(
        args,
        lambda: Scorer.from_pretrained(args.scorer, device=args.device),
        f"{data} (adapted from {args.scorer})",
        guarded=True,
    )


def _run_fit_selector(args: argparse.Namespace) -> int:
    from capplug.scoring import Scorer
    from capplug.selection import SIGNALS
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
    print(f"fitted {len(combiner.weights)} weight sets on {len(sets)} candidate sets")
    print(f"weights with every signal: {json.dumps({k: round(v, 3) for k, v in full.items()})}")
    print(
        f"mean quality of the pick on these sets: fused {pick_quality(sets, full):.3f}, "
        f"scorer alone {pick_quality(sets, {'scorer': 1.0}):.3f}"
    )
    print(f"wrote {write_combiner(combiner, into)}")
    return 0
