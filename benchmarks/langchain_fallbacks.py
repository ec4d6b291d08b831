"""How long ``CappyBestOfN(...).with_fallbacks([...])`` takes to hand over from an endpoint that
answers 503 to every call, with capplug's default retry policy stepping aside (what
``with_fallbacks`` does) against the same policy retrying first (``RunnableWithFallbacks`` built
by hand). Real sleeps; the chat models are in-process fakes, so the time is the policy's alone.

    python -m benchmarks.langchain_fallbacks [--runs 3]

Writes benchmarks/results/langchain_fallbacks.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import RunnableWithFallbacks

from capplug._cache import write_json_atomic
from capplug.llms.retry import DEFAULT_RETRY, UpstreamHTTPError
from langchain_capplug import CappyBestOfN

RESULTS = Path(__file__).parent / "results"


class Down(BaseChatModel):
    """An endpoint that answers every call with a 503."""

    calls: int = 0

    @property
    def _llm_type(self) -> str:
        return "down"

    def _generate(self, messages: list[BaseMessage], stop: Any = None, **kwargs: Any) -> ChatResult:
        self.calls += 1
        raise UpstreamHTTPError(503, "service unavailable")


class Backup(BaseChatModel):
    @property
    def _llm_type(self) -> str:
        return "backup"

    def _generate(self, messages: list[BaseMessage], stop: Any = None, **kwargs: Any) -> ChatResult:
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content="Paris."))])


class Constant:
    def score(self, instruction: Any, responses: list[str]) -> list[float]:
        return [0.5] * len(responses)


def run(args: argparse.Namespace) -> dict[str, Any]:
    rows = {}
    for name, build in {
        "with_fallbacks (capplug's retries step aside)": lambda best: best.with_fallbacks(
            [Backup()]
        ),
        "RunnableWithFallbacks by hand (retries first)": lambda best: RunnableWithFallbacks(
            runnable=best, fallbacks=[Backup()]
        ),
    }.items():
        seconds, calls = [], []
        for _ in range(args.runs):
            down = Down()
            best = CappyBestOfN(llm=down, scorer=Constant(), n=2, retry=DEFAULT_RETRY)
            chain = build(best)
            started = time.perf_counter()
            reply = chain.invoke("Capital of France?")
            seconds.append(time.perf_counter() - started)
            calls.append(down.calls)
            assert reply.content == "Paris."
        rows[name] = {"seconds": seconds, "median": statistics.median(seconds), "calls": calls}
    return {
        "benchmark": "langchain_fallbacks",
        "runs": args.runs,
        "policy": repr(DEFAULT_RETRY),
        "rows": rows,
    }


def write_report(result: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    write_json_atomic(RESULTS / "langchain_fallbacks.json", result)
    lines = [
        f"An endpoint that answers 503 to every call, n=2, capplug's default retry policy; median "
        f"of {result['runs']} runs.",
        "",
        "| wrapped as | time to the fallback's answer | calls to the failing endpoint |",
        "| --- | ---: | ---: |",
    ]
    for name, row in result["rows"].items():
        lines.append(f"| {name} | {row['median']:.3f} s | {row['calls'][0]} |")
    text = "\n".join(lines) + "\n"
    (RESULTS / "langchain_fallbacks.md").write_text(text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    write_report(run(parser.parse_args()))


if __name__ == "__main__":
    main()
