"""Time capplug adds to one best-of-8 call through LangChain (docs/benchmarks.md, "Scorer speed").

``CappyBestOfN(ChatOpenAI, n=8)`` against capplug's OpenAI-compatible server on 127.0.0.1
serving the packaged SmolLM2-135M-Instruct, side by side with the plain
``ChatOpenAI.generate(n=8)`` call that a user would otherwise make. For every call it records:

- the time the inner candidate request took (LangChain callbacks on the candidate run);
- the time the scorer took on the candidates;
- the whole ``invoke`` time.

What capplug adds is the whole call minus the candidate request (scoring, de-duplication,
LangChain plumbing), reported as a share of the generation time, with scoring alone beside it.
Each prompt is run in both variants in alternating order; medians over prompts and rounds.

    python -m benchmarks.langchain_best_of_n [--rounds 2] [--n 8] [--max-tokens 48]

Writes benchmarks/results/langchain_best_of_n.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from capplug import Scorer
from capplug._cache import write_json_atomic

RESULTS = Path(__file__).parent / "results"
MODEL = "smollm2-135m-instruct"
PROMPTS = [
    "Name three primary colors.",
    "What is the largest planet in the solar system?",
    "Give a one-sentence definition of photosynthesis.",
    "Translate 'good morning' into Spanish.",
    "What is 15 multiplied by 4?",
    "Suggest a name for a pet goldfish.",
    "Why is the sky blue? Answer in one sentence.",
    "List two benefits of regular exercise.",
]


class TimedScorer:
    """A scorer wrapper that records how long each scoring call took."""

    def __init__(self, scorer: Scorer) -> None:
        self.scorer = scorer
        self.seconds: list[float] = []

    def score(self, instruction: Any, responses: list[str]) -> list[float]:
        started = time.perf_counter()
        scores = self.scorer.score(instruction, responses)
        self.seconds.append(time.perf_counter() - started)
        return scores


def candidate_timer() -> Any:
    from langchain_core.callbacks import BaseCallbackHandler

    class CandidateTimer(BaseCallbackHandler):
        """Wall time of the candidate runs (tagged by CappyBestOfN) inside a best-of-n call."""

        def __init__(self) -> None:
            self.started: dict[Any, float] = {}
            self.seconds: list[float] = []

        def on_chat_model_start(self, serialized, messages, *, run_id, tags=None, **kwargs):
            if tags and "capplug-candidate" in tags:
                self.started[run_id] = time.perf_counter()

        def on_llm_end(self, response, *, run_id, **kwargs):
            if run_id in self.started:
                self.seconds.append(time.perf_counter() - self.started.pop(run_id))

    return CandidateTimer()


def run(args: argparse.Namespace) -> dict[str, Any]:
    from langchain_core.messages import HumanMessage
    from langchain_openai import ChatOpenAI

    from capplug.llms import LocalChatModel
    from capplug.serve import create_app, serve_in_thread
    from langchain_capplug import CappyBestOfN

    scorer = TimedScorer(Scorer(args.scorer) if args.scorer else Scorer())
    model = LocalChatModel.from_pretrained(MODEL)
    rows: list[dict[str, float]] = []
    with serve_in_thread(create_app(model, model_name=MODEL)) as url:
        llm = ChatOpenAI(
            model=MODEL,
            base_url=f"{url}/v1",
            api_key="local",
            max_tokens=args.max_tokens,
            temperature=0.8,
            timeout=600,
        )
        best = CappyBestOfN(llm=llm, scorer=scorer, n=args.n)
        best.invoke("Warm up.")  # load weights and caches before timing
        for round_index in range(args.rounds):
            for i, prompt in enumerate(PROMPTS):
                timer = candidate_timer()
                plain_first = (i + round_index) % 2 == 0
                row: dict[str, float] = {}
                for variant in ("plain", "best") if plain_first else ("best", "plain"):
                    started = time.perf_counter()
                    if variant == "plain":
                        llm.generate([[HumanMessage(prompt)]], n=args.n)
                        row["plain"] = time.perf_counter() - started
                    else:
                        scorer.seconds.clear()
                        best.invoke(prompt, config={"callbacks": [timer]})
                        row["best"] = time.perf_counter() - started
                        row["generation"] = sum(timer.seconds)
                        row["scoring"] = sum(scorer.seconds)
                row["added"] = row["best"] - row["generation"]
                rows.append(row)
                print(
                    f"round {round_index + 1} prompt {i + 1}: plain {row['plain']:.2f}s, "
                    f"best-of-{args.n} {row['best']:.2f}s (generation {row['generation']:.2f}s, "
                    f"scoring {1000 * row['scoring']:.0f} ms)"
                )
    median = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    shares = {
        "scoring_share": statistics.median(r["scoring"] / r["generation"] for r in rows),
        "added_share": statistics.median(r["added"] / r["generation"] for r in rows),
        "best_over_plain": statistics.median(r["best"] / r["plain"] for r in rows),
    }
    return {
        "benchmark": "langchain_best_of_n",
        "n": args.n,
        "max_tokens": args.max_tokens,
        "calls": len(rows),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "median_seconds": median,
        **shares,
        "rows": rows,
    }


def write_report(result: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json_atomic(RESULTS / "langchain_best_of_n.json", result)
    m = result["median_seconds"]
    n = result["n"]
    lines = [
        f"CappyBestOfN(ChatOpenAI, n={n}) against capplug's local server (SmolLM2-135M-Instruct, "
        f"at most {result['max_tokens']} new tokens) on {result['machine']}; medians over "
        f"{result['calls']} calls.",
        "",
        "| | median time | share of generating the candidates |",
        "| --- | ---: | ---: |",
        f"| plain `ChatOpenAI.generate(n={n})` | {m['plain']:.2f} s | |",
        f"| `CappyBestOfN.invoke`, whole call | {m['best']:.2f} s | |",
        f"| of which: the candidate request | {m['generation']:.2f} s | 100% |",
        f"| of which: scoring | {1000 * m['scoring']:.0f} ms | {100 * result['scoring_share']:.1f}% |",
        f"| all capplug adds (scoring, de-duplication, plumbing) | {1000 * m['added']:.0f} ms "
        f"| {100 * result['added_share']:.1f}% |",
        "",
        f"Whole best-of-{n} call against the plain call, side by side: "
        f"{result['best_over_plain']:.2f}x (median of per-prompt ratios).",
    ]
    (RESULTS / "langchain_best_of_n.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--scorer", default=None, help="scorer reference (default: bundled)")
    write_report(run(parser.parse_args()))


if __name__ == "__main__":
    main()
