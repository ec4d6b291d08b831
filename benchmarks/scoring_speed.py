"""Scorer speed on CPU against sentence-transformers' CrossEncoder (docs/benchmarks.md, "Scorer speed").

1,024 (instruction, response) pairs: whole groups of one prompt and its options, drawn (seeded)
from the multiple-choice train tasks of the task pool (--data PATH; default $CAPPLUG_DATA, then
../shared/data beside the checkout), at most 4 examples of a task, so their token lengths follow
that data. All sides run the same weights on the same pairs with torch threads = cores. Each
round runs every variant once, in rotating order; medians over the rounds are reported, and speed
as a ratio to the CrossEncoder measured in the same run. Float32 scores must match
CrossEncoder's to 1e-4.

Variants: CrossEncoder; capplug at float32; capplug at the precision it chooses on this machine
(``Scorer.precision``). The chosen precision's ranking is compared with float32's: the same best
response in each group (by text), and Spearman over all pairs.

Also: the time capplug adds to one best-of-8 call, as a fraction of the time the local model
takes to generate the 8 candidates.

    python -m benchmarks.scoring_speed [--data PATH] [--model REF] [--rounds 3] [--pairs 1024]
        [--calls 4] [--results DIR]

Writes benchmarks/results/scoring_speed.{json,md} (or into --results DIR).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks._tasks import add_data_option, open_data
from capplug import Reranker, Scorer, resolve
from capplug._cache import write_json_atomic
from capplug._runtime import usable_cpus
from capplug.data import Pool, open_pool
from capplug.errors import DataError
from capplug.scoring.precision import native_bf16, processor_name

RESULTS = Path(__file__).parent / "results"
GROUPS_PER_TASK = 4
"""Examples (groups) drawn from one task at most, so that many tasks' lengths are mixed."""

Group = tuple[str, list[str]]


def choice_groups(pool: Pool, seed: int) -> Iterator[tuple[str, list[Group]]]:
    """Per multiple-choice train task of ``pool``, in a seeded order: ``(task, groups)``, up to
    :data:`GROUPS_PER_TASK` of its examples (a seeded draw) as ``(prompt, options)``."""
    names = pool.names("train")
    random.Random(seed).shuffle(names)
    for task in pool.tasks(names):
        if not task.is_multiple_choice:
            continue
        examples = [e for e in task.examples if len(e.options) > 1]
        drawn = random.Random(f"{seed}:{task.name}").sample(
            examples, min(GROUPS_PER_TASK, len(examples))
        )
        yield task.name, [(e.prompt, e.options) for e in drawn]


def pair_groups(
    count: int,
    seed: int,
    *,
    data: str | os.PathLike[str] | Pool | None = None,
    tokenizer: Any = None,
    max_length: int = 512,
) -> tuple[str, list[Group]]:
    """``(source, groups)``: seeded whole groups (prompt, options) of the multiple-choice train
    tasks of the task pool at ``data`` (see :func:`capplug.data.open_pool`), ``count`` pairs in
    all; only the last group may be cut. ``source`` says where they came from.

    With a tokenizer, only pairs that fit ``max_length``: pairs that need cutting are left out of
    the speed comparison, since capplug keeps the end of a long instruction and CrossEncoder cuts
    the longest side, so their scores differ by design.

    Raises:
        DataError: the pool has too few multiple-choice train tasks for one group.
    """
    pool = open_pool(data)
    chosen: list[tuple[str, Group]] = []  # (task, group)
    total = 0
    for name, drawn in choice_groups(pool, seed):
        if total >= count:
            break
        for prompt, options in drawn:
            if tokenizer is not None:
                lengths = tokenizer([prompt] * len(options), options)["input_ids"]
                options = [
                    o for o, ids in zip(options, lengths, strict=True) if len(ids) <= max_length
                ]
                if len(options) < 2:
                    continue
            chosen.append((name, (prompt, options)))
            total += len(options)
    if not chosen:
        raise DataError(
            f"the task pool at {pool.root} has no multiple-choice train task with options to "
            f"score (that fit {max_length} tokens)"
        )
    random.Random(seed).shuffle(chosen)
    groups: list[Group] = []
    tasks: set[str] = set()
    total = 0
    for name, (prompt, options) in chosen:
        if total >= count:
            break
        options = options[: count - total]
        groups.append((prompt, options))
        tasks.add(name)
        total += len(options)
    source = (
        f"{len(tasks)} multiple-choice train tasks of the task pool ({pool.root}), at most "
        f"{GROUPS_PER_TASK} examples each"
    )
    return source, groups


def timed(fn: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


def speed(args: argparse.Namespace) -> dict[str, Any]:
    from scipy.stats import spearmanr
    from sentence_transformers import CrossEncoder

    folder = resolve(args.model)
    # On a GPU capplug batches as CrossEncoder does; on a CPU by its token budget.
    batching = {} if args.device == "cpu" else {"max_batch_size": args.batch_size}
    exact = Scorer.from_pretrained(folder, device=args.device, dtype="float32", **batching)
    chosen = Scorer.from_pretrained(folder, device=args.device, **batching)
    if exact.score_mapping != "sigmoid":
        raise SystemExit("this benchmark compares sigmoid-mapped checkpoints with CrossEncoder")
    cross_encoder = CrossEncoder(str(folder), device=args.device, max_length=exact.max_length)
    source, groups = pair_groups(
        args.pairs,
        args.seed,
        data=args.pool,
        tokenizer=cross_encoder.tokenizer,
        max_length=exact.max_length,
    )
    pairs = [(prompt, r) for prompt, responses in groups for r in responses]
    lengths = [
        len(ids)
        for ids in cross_encoder.tokenizer([a for a, _ in pairs], [b for _, b in pairs])[
            "input_ids"
        ]
    ]

    baseline = f"CrossEncoder (batch {args.batch_size})"
    reference = np.asarray(
        cross_encoder.predict(pairs, batch_size=args.batch_size, show_progress_bar=False)
    )
    float32 = np.asarray(exact.score_pairs(pairs))
    fast = np.asarray(chosen.score_pairs(pairs))
    max_diff = float(np.abs(float32 - reference).max())

    chosen_name = f"capplug Scorer ({chosen.precision.dtype}, chosen)"
    variants = {
        baseline: lambda: cross_encoder.predict(
            pairs, batch_size=args.batch_size, show_progress_bar=False
        ),
        "capplug Scorer (float32)": lambda: exact.score_pairs(pairs),
    }
    if chosen.dtype != torch.float32:
        variants[chosen_name] = lambda: chosen.score_pairs(pairs)
    alternatives = {}
    if args.alternatives:
        from benchmarks import _cpu_alternatives as alt

        for name, score in {
            "int8 dynamic quantisation (PyTorch)": alt.torch_int8(exact),
            "ONNX Runtime (float32)": alt.onnx_runtime(exact, int8=False),
            "ONNX Runtime (int8)": alt.onnx_runtime(exact, int8=True),
        }.items():
            variants[name] = lambda score=score: score(pairs)
            out = np.asarray(score(pairs))
            alternatives[name] = {
                "top1_agreement": top1_agreement(groups, float32, out),
                "spearman": float(spearmanr(float32, out)[0]),
            }
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for round_ in range(args.rounds):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            seconds, _ = timed(lambda n=name: synchronized(variants[n], args.device))
            times[name].append(seconds)
    base = statistics.median(times[baseline])
    rows = []
    for name in names:
        median = statistics.median(times[name])
        paired = statistics.median(b / t for b, t in zip(times[baseline], times[name], strict=True))
        rows.append(
            {
                "variant": name,
                "pairs_per_s": len(pairs) / median,
                "ratio": base / median,
                "paired_ratio": paired,
                "seconds": times[name],
            }
        )
    return {
        "source": source,
        "pairs": len(pairs),
        "groups": len(groups),
        "tokens": int(sum(lengths)),
        "length_percentiles": {str(p): float(np.percentile(lengths, p)) for p in (10, 50, 90, 99)},
        "max_abs_diff": max_diff,
        "precision": {
            "dtype": chosen.precision.dtype,
            "reason": chosen.precision.reason,
            "top1_agreement": top1_agreement(groups, float32, fast),
            "spearman": float(spearmanr(float32, fast)[0]),
            "max_abs_diff_to_float32": float(np.abs(fast - float32).max()),
        },
        "alternatives": alternatives,
        "rows": rows,
    }


def synchronized(fn: Any, device: str) -> Any:
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out


def top1_agreement(
    groups: list[tuple[str, list[str]]], reference: np.ndarray, other: np.ndarray
) -> dict[str, Any]:
    """Groups whose best response (by text, so equal candidates count as one) is the same."""
    same, flips, start = 0, [], 0
    for prompt, responses in groups:
        end = start + len(responses)
        a, b = reference[start:end], other[start:end]
        best_a, best_b = responses[int(np.argmax(a))], responses[int(np.argmax(b))]
        if best_a.strip() == best_b.strip():
            same += 1
        else:
            top = np.sort(a)
            flips.append({"prompt": prompt[:80], "float32_margin": float(top[-1] - top[-2])})
        start = end
    return {"same": same, "groups": len(groups), "share": same / len(groups), "flips": flips}


def best_of_8_overhead(args: argparse.Namespace) -> dict[str, Any]:
    from capplug.llms import LocalChatModel, SamplingRecipe, SamplingStrategy

    model = LocalChatModel.from_pretrained(args.lm)
    scorer = Scorer.from_pretrained(args.model, device="cpu")
    _, groups = pair_groups(64, args.seed + 1, data=args.pool)
    prompts = [prompt for prompt, _ in groups][: args.calls]
    recipe = SamplingRecipe(
        (SamplingStrategy(n=8, method="sample", temperature=0.9),), max_new_tokens=64
    )
    reranker = Reranker(scorer)
    generation, scoring, selecting = [], [], []
    for prompt in prompts:
        seconds, candidates = timed(
            lambda p=prompt: model.sample_candidates([p], recipe=recipe, progress=False)[0]
        )
        generation.append(seconds)
        texts = [c.text for c in candidates]
        seconds, _ = timed(lambda p=prompt, t=texts: scorer.select(p, t))
        scoring.append(seconds)
        # The default selection: scorer, agreement, the sampler's own log-probabilities, length.
        seconds, _ = timed(
            lambda p=prompt, c=candidates: reranker.select(
                p,
                [x.text for x in c],
                logprobs=[x.sum_logprob for x in c],
                token_counts=[x.n_tokens for x in c],
            )
        )
        selecting.append(seconds)
    return {
        "calls": len(prompts),
        "generation_seconds_median": statistics.median(generation),
        "scoring_seconds_median": statistics.median(scoring),
        "added_fraction_median": statistics.median(
            [s / g for s, g in zip(scoring, generation, strict=True)]
        ),
        "selection_seconds_median": statistics.median(selecting),
        "selection_fraction_median": statistics.median(
            [s / g for s, g in zip(selecting, generation, strict=True)]
        ),
        "agreement_ms_17": agreement_ms(model, prompts[0]),
    }


def agreement_ms(model: Any, prompt: str) -> float:
    """Median time of agreement over 17 candidates drawn by Cappy's recipe, in ms."""
    from capplug.selection import rouge_agreement

    texts = [c.text for c in model.sample_candidates([prompt], progress=False)[0]]
    times = [timed(lambda: rouge_agreement(texts))[0] for _ in range(50)]
    return 1000 * statistics.median(times)


def write_report(result: dict[str, Any], folder: Path = RESULTS) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    name = "scoring_speed" + result.get("suffix", "")
    write_json_atomic(folder / f"{name}.json", result)
    s = result["speed"]
    p = s["precision"]
    agreement = p["top1_agreement"]
    lines = [
        f"{s['pairs']} pairs in {s['groups']} groups from {s['source']} ({s['tokens']} tokens; "
        f"median {s['length_percentiles']['50']:.0f}, p90 {s['length_percentiles']['90']:.0f} "
        f"tokens per pair); {result['processor']}; {result['machine']}; scored on "
        f"{result.get('device', 'cpu')}; median of "
        f"{result['rounds']} rounds.",
        "",
        f"Chosen precision: {p['dtype']} ({p['reason']}).",
        "",
        "| variant | pairs/s | ratio to CrossEncoder |",
        "| --- | ---: | ---: |",
    ]
    for row in s["rows"]:
        lines.append(f"| {row['variant']} | {row['pairs_per_s']:.1f} | {row['ratio']:.2f}x |")
    lines += [
        "",
        f"Float32 scores equal to CrossEncoder's within {s['max_abs_diff']:.1e} (max absolute "
        f"difference). The chosen precision against float32: the same best response in "
        f"{agreement['same']} of {agreement['groups']} groups ({100 * agreement['share']:.1f}%), "
        f"Spearman {p['spearman']:.5f}, scores within {p['max_abs_diff_to_float32']:.1e}.",
    ]
    for variant, other in s.get("alternatives", {}).items():
        a = other["top1_agreement"]
        lines.append(
            f"- {variant}, against float32: the same best response in {a['same']} of "
            f"{a['groups']} groups, Spearman {other['spearman']:.4f}"
        )
    for flip in agreement["flips"]:
        lines.append(
            f"- differs on {flip['prompt']!r}, where float32's best two are "
            f"{flip['float32_margin']:.1e} apart"
        )
    if "best_of_8" in result:
        b = result["best_of_8"]
        lines += [
            "",
            f"Best-of-8 with the local SmolLM2-135M, the scorer at its chosen precision: generating 8 candidates takes "
            f"{b['generation_seconds_median']:.1f} s, scoring them {1000 * b['scoring_seconds_median']:.0f} ms: "
            f"capplug adds {100 * b['added_fraction_median']:.1f}% (median of {b['calls']} calls).",
        ]
        if "selection_seconds_median" in b:
            lines += [
                "",
                f"The default fused selection (scorer, agreement, the sampler's log-probabilities, "
                f"length) takes {1000 * b['selection_seconds_median']:.0f} ms: "
                f"{100 * b['selection_fraction_median']:.1f}% of generating; agreement over 17 "
                f"candidates takes {b['agreement_ms_17']:.1f} ms.",
            ]
    text = "\n".join(lines) + "\n"
    (folder / f"{name}.md").write_text(text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="capplug-default", help="scorer checkpoint (sigmoid-mapped)"
    )
    parser.add_argument(
        "--lm", default="smollm2-135m-instruct", help="local model for the best-of-8 timing"
    )
    parser.add_argument("--pairs", type=int, default=1024)
    parser.add_argument(
        "--alternatives",
        action="store_true",
        help="also time int8 quantisation and ONNX Runtime (CPU paths capplug does not take)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, or cuda to compare on a GPU")
    parser.add_argument(
        "--batch-size", type=int, default=32, help="CrossEncoder's batch (capplug's too on a GPU)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=4, help="best-of-8 calls to time (0 skips)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--results",
        type=Path,
        default=RESULTS,
        help="where to write the report (default: %(default)s)",
    )
    add_data_option(parser)
    args = parser.parse_args()
    if args.pairs < 2 or args.rounds < 1 or args.calls < 0:
        parser.error("--pairs must be >= 2, --rounds >= 1 and --calls >= 0")
    args.pool = open_data(args, parser)
    cores = usable_cpus()
    torch.set_num_threads(cores)
    result: dict[str, Any] = {
        "benchmark": "scoring_speed",
        "model": args.model,
        "rounds": args.rounds,
        "processor": f"{processor_name()} ({'native' if native_bf16() else 'no native'} bfloat16)",
        "machine": f"{platform.machine()} CPU, {cores} cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "device": args.device
        if args.device == "cpu"
        else f"{args.device}: {torch.cuda.get_device_name(args.device)}",
        "speed": speed(args),
    }
    if args.device != "cpu":
        result["suffix"] = f"_{args.device.split(':')[0]}_b{args.batch_size}"
    elif args.calls > 0:
        result["best_of_8"] = best_of_8_overhead(args)
    write_report(result, args.results)


if __name__ == "__main__":
    main()
