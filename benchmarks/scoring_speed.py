"""Scorer speed on CPU against sentence-transformers' CrossEncoder (docs/benchmarks.md, "Scorer speed").

1,024 (instruction, option) pairs drawn (seeded) from the BIG-bench dev zero-shot choice tasks, so
their token lengths follow that data; both sides run the same weights on the same pairs with
torch threads = cores. Each round runs every variant once, in rotating order; medians over the
rounds are reported, and speed as a ratio to the CrossEncoder measured in the same run. The
scores must match to 1e-4.

Also: the time capplug adds to one best-of-8 call, as a fraction of the time the local model
takes to generate the 8 candidates.

    python -m benchmarks.scoring_speed [--model REF] [--rounds 3] [--pairs 1024]

Writes benchmarks/results/scoring_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from capplug import Reranker, Scorer, resolve
from capplug._cache import write_json_atomic
from capplug.data.bigbench import load_task, task_names

RESULTS = Path(__file__).parent / "results"


def zero_shot_pairs(
    count: int, seed: int, *, tokenizer: Any = None, max_length: int = 512
) -> list[tuple[str, str]]:
    """Seeded (prompt, option) pairs; with a tokenizer, only pairs that fit ``max_length``.

    Pairs that need cutting are left out of the speed comparison: capplug keeps the end of a
    long instruction and CrossEncoder cuts the longest side, so their scores differ by design.
    """
    pool = []
    for task in task_names("dev", "zero_shot_choice"):
        examples = [e for e in load_task(task).examples if e.target_scores][:200]
        pool += [(e.prompt, option) for e in examples for option in e.target_scores]
    if tokenizer is not None:
        lengths = tokenizer([a for a, _ in pool], [b for _, b in pool])["input_ids"]
        pool = [pair for pair, ids in zip(pool, lengths, strict=True) if len(ids) <= max_length]
    rng = random.Random(seed)
    return rng.sample(pool, min(count, len(pool)))


def timed(fn: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


def speed(args: argparse.Namespace) -> dict[str, Any]:
    from sentence_transformers import CrossEncoder

    folder = resolve(args.model)
    scorer = Scorer.from_pretrained(folder, device="cpu")
    if scorer.score_mapping != "sigmoid":
        raise SystemExit("this benchmark compares sigmoid-mapped checkpoints with CrossEncoder")
    cross_encoder = CrossEncoder(str(folder), device="cpu", max_length=scorer.max_length)
    pairs = zero_shot_pairs(
        args.pairs, args.seed, tokenizer=cross_encoder.tokenizer, max_length=scorer.max_length
    )
    lengths = [
        len(ids)
        for ids in cross_encoder.tokenizer([a for a, _ in pairs], [b for _, b in pairs])[
            "input_ids"
        ]
    ]

    reference = np.asarray(cross_encoder.predict(pairs, batch_size=32, show_progress_bar=False))
    ours = np.asarray(scorer.score_pairs(pairs))
    max_diff = float(np.abs(ours - reference).max())

    variants = {
        "CrossEncoder (batch 32)": lambda: cross_encoder.predict(
            pairs, batch_size=32, show_progress_bar=False
        ),
        "capplug Scorer": lambda: scorer.score_pairs(pairs),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for round_ in range(args.rounds):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            seconds, _ = timed(variants[name])
            times[name].append(seconds)
    base = statistics.median(times["CrossEncoder (batch 32)"])
    rows = []
    for name in names:
        median = statistics.median(times[name])
        paired = statistics.median(
            b / t for b, t in zip(times["CrossEncoder (batch 32)"], times[name], strict=True)
        )
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
        "pairs": len(pairs),
        "tokens": int(sum(lengths)),
        "length_percentiles": {str(p): float(np.percentile(lengths, p)) for p in (10, 50, 90, 99)},
        "max_abs_diff": max_diff,
        "rows": rows,
    }


def best_of_8_overhead(args: argparse.Namespace) -> dict[str, Any]:
    from capplug.llms import LocalChatModel, SamplingRecipe, SamplingStrategy

    model = LocalChatModel.from_pretrained(args.lm)
    scorer = Scorer.from_pretrained(args.model, device="cpu")
    prompts = [p for p, _ in zero_shot_pairs(64, args.seed + 1)]
    prompts = list(dict.fromkeys(prompts))[: args.calls]
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


def write_report(result: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json_atomic(RESULTS / "scoring_speed.json", result)
    s = result["speed"]
    lines = [
        f"{s['pairs']} pairs from the dev zero-shot choice tasks ({s['tokens']} tokens; median "
        f"{s['length_percentiles']['50']:.0f}, p90 {s['length_percentiles']['90']:.0f} tokens per pair); "
        f"{result['machine']}; median of {result['rounds']} rounds.",
        "",
        "| variant | pairs/s | ratio to CrossEncoder |",
        "| --- | ---: | ---: |",
    ]
    for row in s["rows"]:
        lines.append(f"| {row['variant']} | {row['pairs_per_s']:.1f} | {row['ratio']:.2f}x |")
    lines += [
        "",
        f"Scores equal to CrossEncoder's within {s['max_abs_diff']:.1e} (max absolute difference).",
    ]
    if "best_of_8" in result:
        b = result["best_of_8"]
        lines += [
            "",
            f"Best-of-8 with the local SmolLM2-135M: generating 8 candidates takes "
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
    (RESULTS / "scoring_speed.md").write_text(text)
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
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=4, help="best-of-8 calls to time (0 skips)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cores = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
    torch.set_num_threads(cores)
    result: dict[str, Any] = {
        "benchmark": "scoring_speed",
        "model": args.model,
        "rounds": args.rounds,
        "machine": f"{platform.machine()} CPU, {cores} cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "speed": speed(args),
    }
    if args.calls > 0:
        result["best_of_8"] = best_of_8_overhead(args)
    write_report(result)


if __name__ == "__main__":
    main()
