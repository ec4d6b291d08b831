"""What the judged fallback costs, and whether it stops adapters that wreck answers
(`AdapterJudge`; docs/benchmarks.md, "The judged fallback").

Needs no dataset: the quality of the fallback on real tasks is the `judged` row of
`benchmarks/instruction_to_adapter.py`. This measures, on the packaged SmolLM2-135M-Instruct
with the bundled hypernetwork and the default selector (`Reranker()`, --scorer):

1. **Cost.** For each of the instructions below, with one input each: the time of one answer
   with the generated adapter (greedy, at most --tokens new tokens, after a warm-up), against
   the time of the check (`AdapterJudge.compare`: the adapter's and the base model's answers in
   one batch, then one selection). The target: at most two short generations and one selection.
2. **Sabotage.** The same inputs against deliberately bad adapters (`save_random_lora`: large
   random LoRA weights on every layer, --seeds of them at each --scale): how often the judge
   picks the base model's answer (it should, nearly always), and how often it keeps the
   generated adapter over the base model (no right answer here: what the judge does with a
   reasonable adapter).

    python -m benchmarks.adapter_fallback [--tokens 64] [--scales 0.5 1.0] [--seeds 3] [--scorer REF]

Writes benchmarks/results/adapter_fallback.{json,md} (or into --results DIR).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._report import write_results

RESULTS = Path(__file__).parent / "results"
NAME = "adapter_fallback"
DEFAULT_HYPERNET = "capplug-hypernet-smollm2"

# Everyday tasks, written for this benchmark (no dataset is read).
CASES = [
    ("Answer the question with the name of a city.", "What is the capital of France?"),
    ("Translate the sentence into French.", "The cat is sleeping on the sofa."),
    ("Answer with yes or no.", "Is the sun a star?"),
    ("Classify the review as positive or negative.", "The plot made no sense and I left early."),
    (
        "Summarize the text in one sentence.",
        "The meeting moved to Friday because the room was booked.",
    ),
    ("Give the plural of the noun.", "mouse"),
    ("Answer the arithmetic question with a number.", "What is 7 plus 5?"),
    ("Name the color of the object.", "a ripe banana"),
]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from capplug.adapters import AdapterJudge, AdapterRuntime, Hypernetwork, with_definition
    from capplug.adapters.examples import user_prompt
    from capplug.models import resolve
    from capplug.selection import Reranker
    from capplug.testing import save_random_lora
    from capplug.training.loop import machine

    hypernet = Hypernetwork.from_pretrained(args.hypernet, device=args.device)
    runtime = AdapterRuntime.from_pretrained(
        hypernet.config.base_ref, device=args.device, max_loaded=2
    )
    judge = AdapterJudge(runtime, Reranker(args.scorer), max_new_tokens=args.tokens)

    def generated(instruction: str) -> str:
        runtime.add_weights("generated", *hypernet.generate(instruction))
        return "generated"

    # Warm-up: the encoder, the selector's scorer, the allocator.
    warm = generated(CASES[0][0])
    judge.compare(warm, CASES[0][1], user_prompt(CASES[0][1], CASES[0][0]))

    answer_seconds, check_seconds, kept = [], [], 0
    rows = []
    for instruction, text in CASES:
        name = generated(instruction)
        base_prompt = user_prompt(text, instruction)
        started = time.perf_counter()
        runtime.generate([text], adapter=name, max_new_tokens=args.tokens)
        answer_seconds.append(time.perf_counter() - started)
        comparison = judge.compare(name, text, base_prompt)
        check_seconds.append(comparison.seconds)
        kept += comparison.winner == "adapter"
        rows.append(
            {
                "instruction": instruction,
                "input": text,
                "winner": comparison.winner,
                "scores": dict(comparison.scores),
                "answers": dict(comparison.answers),
            }
        )

    sabotage: dict[str, dict[str, Any]] = {}
    base_dir = resolve(hypernet.config.base_ref)
    with tempfile.TemporaryDirectory(prefix="capplug-bad-lora-") as tmp:
        for scale in args.scales:
            caught = total = 0
            for seed in range(args.seeds):
                folder = save_random_lora(
                    Path(tmp) / f"{scale}-{seed}", base_dir, scale=scale, seed=seed
                )
                runtime.add("bad", folder)
                for instruction, text in CASES:
                    comparison = judge.compare("bad", text, with_definition(text, instruction))
                    caught += comparison.winner == "base"
                    total += 1
                runtime.remove("bad")
            sabotage[f"{scale:g}"] = {"caught": caught, "total": total}
            print(f"scale {scale:g}: base model picked over the bad adapter {caught}/{total}")

    import torch

    answer = statistics.median(answer_seconds)
    check = statistics.median(check_seconds)
    return {
        "benchmark": NAME,
        "base_model": hypernet.config.base_model,
        "hypernet": str(args.hypernet),
        "judge": judge.name,
        "tokens": args.tokens,
        "machine": machine(torch.device(runtime.chat.device)),
        "cases": len(CASES),
        "answer_median_seconds": answer,
        "check_median_seconds": check,
        "check_over_answer": check / answer,
        "generated_kept": kept,
        "rows": rows,
        "sabotage": sabotage,
    }


def report_lines(result: dict[str, Any]) -> list[str]:
    lines = [
        f"{result['base_model']} with the hypernetwork {result['hypernet']}, judged by the "
        f"fused selector over {result['judge']}; {result['cases']} instructions with one input "
        f"each, greedy, at most {result['tokens']} new tokens ({result['machine']['description']}).",
        "",
        "| what | median seconds |",
        "| --- | ---: |",
        f"| one answer with the generated adapter | {result['answer_median_seconds']:.2f} |",
        f"| the check: both answers in one batch + one selection | "
        f"{result['check_median_seconds']:.2f} ({result['check_over_answer']:.2f}x) |",
        "",
        "| deliberately bad adapter (random LoRA scale) | base model picked |",
        "| --- | ---: |",
    ]
    for scale, row in result["sabotage"].items():
        lines.append(f"| {scale} | {row['caught']}/{row['total']} |")
    lines += [
        "",
        f"The generated adapter kept over the base model on {result['generated_kept']} of "
        f"{result['cases']} instructions.",
    ]
    return lines


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hypernet", default=DEFAULT_HYPERNET, metavar="REF")
    parser.add_argument(
        "--scorer", default="capplug-default", metavar="REF", help="the selector's scorer"
    )
    parser.add_argument("--tokens", type=int, default=64, help="longest answer (default: 64)")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.5, 1.0])
    parser.add_argument("--seeds", type=int, default=3, help="bad adapters per scale")
    parser.add_argument("--device", help="cpu, cuda, ... (default: the GPU if there is one)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where to write the report")
    args = parser.parse_args(argv)
    if args.tokens < 1 or args.seeds < 1 or any(s <= 0 for s in args.scales):
        parser.error("--tokens, --seeds and every --scales value must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = measure(args)
    write_results(args.results, NAME, result, report_lines(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
