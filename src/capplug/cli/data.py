"""``capplug data sources | build | clip | merge``: the task pool, and weakly labelled training
data from it."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from capplug.cli._common import UsageError
from capplug.data.pool import add_data_option


def add_parser(sub: Any) -> None:
    """Add this module's commands to the ``capplug`` subparsers."""
    data = sub.add_parser("data", help="look at the task pool; build weakly labelled training data")
    data_sub = data.add_subparsers(title="data commands", metavar="ACTION")
    _add_sources(data_sub)
    _add_build(data_sub)
    _add_clip(data_sub)
    _add_merge(data_sub)
    data.set_defaults(run=lambda _args: data.print_help() or 2)


def _add_sources(data_sub: Any) -> None:
    sources = data_sub.add_parser(
        "sources",
        help="the tasks and examples in the task pool, per source and split",
        description=(
            "Read every task file of the task pool and print, per source and split, the tasks "
            "and examples found, and each file passed over and why. The pool is --data, else "
            "$CAPPLUG_DATA, else ../shared/data beside a source checkout."
        ),
    )
    add_data_option(sources)
    sources.add_argument(
        "--quick",
        action="store_true",
        help="list the tasks without reading them (example counts from the manifest)",
    )
    sources.add_argument(
        "--tasks", action="store_true", help="also list every task with its split and family"
    )
    sources.add_argument("--json", action="store_true", help="print the summary as JSON")
    sources.set_defaults(run=_run_data_sources)


def _add_build(data_sub: Any) -> None:
    build = data_sub.add_parser(
        "build",
        help="label the pool's train tasks Cappy's way into Parquet shards (resumable)",
        description=(
            "Write one Parquet shard per train task of the task pool: each reference labelled 1.0, a "
            "reference of another example 0.0, multiple-choice options their normalised score, "
            "and, with --generator, sampled candidates labelled by Rouge-L. A rerun with the same "
            "settings skips finished shards."
        ),
    )
    build.add_argument(
        "--split", default="train", choices=["train"], help="only train tasks are trained on"
    )
    build.add_argument(
        "--out", required=True, metavar="DIR", help="build folder (shards and build.json)"
    )
    build.add_argument(
        "--max-per-task", type=int, default=32, metavar="N", help="examples per task (default: 32)"
    )
    build.add_argument(
        "--max-per-family",
        type=int,
        metavar="N",
        help="examples per family (a dataset's templates or subtasks together), shared evenly "
        "among its tasks (default: no cap beyond --max-per-task)",
    )
    build.add_argument(
        "--max-options",
        type=int,
        default=8,
        metavar="N",
        help="options kept per multiple-choice example",
    )
    _add_sampling_options(build.add_argument_group("sampled candidates"))
    build.add_argument(
        "--task",
        action="append",
        metavar="NAME",
        help="only these train tasks, e.g. bigbench/anachronisms (repeatable)",
    )
    build.add_argument(
        "--leave-out-fold",
        type=int,
        metavar="K",
        help="leave out fold K (from 0) of the pool's family-grouped train folds, to measure "
        "on tasks of families never trained on (`python -m benchmarks.zero_shot_choice --split "
        "train --fold K`)",
    )
    build.add_argument(
        "--folds", type=int, default=5, metavar="N", help="with --leave-out-fold (default: 5)"
    )
    add_data_option(build)
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--json", action="store_true", help="print the result as JSON")
    build.set_defaults(run=_run_data_build)


def _add_sampling_options(sampling: Any) -> None:
    """`data build`'s candidates sampled from a generator, labelled by Rouge-L."""
    sampling.add_argument(
        "--generator",
        metavar="REF",
        help="model to sample candidates from: a local model (e.g. smollm2-135m-instruct), or "
        "with --endpoint the name the endpoint serves",
    )
    sampling.add_argument(
        "--recipe",
        choices=("cappy", "fast"),
        default="cappy",
        help="local sampling recipe: cappy (17 candidates, 64 tokens) or fast (9, 48 tokens)",
    )
    sampling.add_argument(
        "--sample-per-task",
        type=int,
        metavar="N",
        help="only the first N drawn examples of each task get sampled candidates (default: all)",
    )
    sampling.add_argument(
        "--sample-skip",
        type=int,
        default=0,
        metavar="K",
        help="pass over the first K drawn examples before sampling (so a second build with "
        "K = the first one's --sample-per-task samples new examples of the same draw)",
    )
    sampling.add_argument(
        "--clip-candidates",
        action="store_true",
        help="also label each sampled candidate's first line and first sentence, so the scorer "
        "sees short right answers beside long ones that drift on",
    )
    sampling.add_argument(
        "--endpoint",
        metavar="URL",
        help="an OpenAI-compatible endpoint to sample from (e.g. http://127.0.0.1:8000/v1)",
    )
    sampling.add_argument(
        "--api-key", metavar="KEY", help="the endpoint's key (default: $OPENAI_API_KEY)"
    )


def _add_clip(data_sub: Any) -> None:
    clip = data_sub.add_parser(
        "clip",
        help="copy a build with its sampled candidates' first lines and sentences added",
        description=(
            "Copy a finished build (one made with --generator) into a new folder, adding each "
            "sampled candidate's first line and first sentence labelled by Rouge-L against the "
            "build's references: the rows `data build --clip-candidates` would have written, "
            "without sampling again. The source folder is only read; a rerun resumes."
        ),
    )
    clip.add_argument("src", metavar="BUILD", help="folder of a finished `capplug data build`")
    clip.add_argument("--out", required=True, metavar="DIR", help="new build folder")
    clip.add_argument("--json", action="store_true", help="print the result as JSON")
    clip.set_defaults(run=_run_data_clip)


def _add_merge(data_sub: Any) -> None:
    merge = data_sub.add_parser(
        "merge",
        help="merge finished builds into one, every row once",
        description=(
            "Merge finished builds (say, two generators' candidates, or a second build made with "
            "--sample-skip) into one folder. Rows they share (references, negatives, options) "
            "are kept once per example. The sources are only read; a rerun resumes."
        ),
    )
    merge.add_argument("src", nargs="+", metavar="BUILD", help="folders `capplug data build` wrote")
    merge.add_argument("--out", required=True, metavar="DIR", help="new build folder")
    merge.add_argument("--json", action="store_true", help="print the result as JSON")
    merge.set_defaults(run=_run_data_merge)


def _run_data_build(args: argparse.Namespace) -> int:
    from capplug.data.build import BuildConfig, build_dataset

    source = None
    if args.endpoint and not args.generator:
        raise UsageError("--endpoint needs --generator MODEL: the model name the endpoint serves")
    if args.clip_candidates and not args.generator:
        raise UsageError("--clip-candidates needs --generator: it clips sampled candidates")
    if args.generator and args.endpoint:
        from capplug.data.build import EndpointCandidateSource
        from capplug.llms.remote import OpenAICompatibleModel

        remote = OpenAICompatibleModel(args.generator, base_url=args.endpoint, api_key=args.api_key)
        source = EndpointCandidateSource(remote, seed=args.seed)
    elif args.generator:
        from capplug.data.build import LocalCandidateSource

        source = LocalCandidateSource.from_pretrained(
            args.generator, recipe=args.recipe, seed=args.seed
        )
    config = BuildConfig(
        split=args.split,
        max_per_task=args.max_per_task,
        max_per_family=args.max_per_family,
        max_options=args.max_options,
        seed=args.seed,
        sample_per_task=args.sample_per_task,
        sample_skip=args.sample_skip,
        clip_candidates=args.clip_candidates,
    )
    from capplug.data.pool import open_pool

    pool = open_pool(args.data, strict=args.strict)
    tasks = args.task
    if args.leave_out_fold is not None:
        try:
            folds = pool.folds(args.folds)
        except ValueError as exc:
            raise UsageError(f"--folds: {exc}") from None
        if not 0 <= args.leave_out_fold < len(folds):
            raise UsageError(f"--leave-out-fold must be 0 to {len(folds) - 1}")
        left_out = set(folds[args.leave_out_fold])
        chosen = [pool.resolve(t) for t in tasks] if tasks else pool.names("train")
        tasks = [t for t in chosen if t not in left_out]
    return _print_build(
        build_dataset(args.out, config=config, source=source, tasks=tasks, data=pool),
        args,
    )


def _run_data_sources(args: argparse.Namespace) -> int:
    import logging

    from capplug.data.pool import open_pool

    pool = open_pool(args.data, strict=args.strict)
    logging.getLogger("capplug.data.pool").setLevel(logging.ERROR)  # listed in the summary
    summary = pool.summary(read=not args.quick, progress=not args.json)
    if args.json:
        out = summary.to_dict()
        if args.tasks:
            out["tasks"] = [
                {"name": n, "split": pool.entry(n).split, "family": pool.family(n)}
                for n in pool.names(None)
            ]
        print(json.dumps(out, indent=2))
        return 0
    print(summary.format())
    if args.tasks:
        for name in pool.names(None):
            entry = pool.entry(name)
            print(f"{name}\t{entry.split}\t{entry.family}")
    return 0


def _run_data_clip(args: argparse.Namespace) -> int:
    from capplug.data.build import clip_build

    return _print_build(clip_build(args.src, args.out), args)


def _run_data_merge(args: argparse.Namespace) -> int:
    from capplug.data.build import merge_builds

    return _print_build(merge_builds(args.src, args.out), args)


def _print_build(result: Any, args: argparse.Namespace) -> int:
    if getattr(args, "json", False):
        print(json.dumps({**dataclasses.asdict(result), "out_dir": str(result.out_dir)}))
        return 0
    print(
        f"{result.rows} rows in {result.shards_written + result.shards_skipped} shards "
        f"({result.shards_written} written, {result.shards_skipped} already there) at {result.out_dir}"
    )
    return 0
