"""``POST /v1/rerank`` against the scorer's own time for the same pairs (docs/benchmarks.md,
"Rerank API"; target: p50 <= 1.2x the scorer's own time, 100 documents).

``capplug proxy`` runs as its own process with the bundled scorer (in front of the fake upstream
of ``proxy_load.py``, which the rerank route never calls). This script times, one after the
other so they never share the cores: the bundled scorer scoring the query against 100 documents
in this process (``Scorer.score``), and the same query and documents sent to the proxy's
``/v1/rerank`` (HTTP, JSON, the scoring queue, sorting, the answer). Medians of ``--runs`` each,
after a warm-up.

    python -m benchmarks.proxy_rerank [--documents 100] [--runs 15]

Writes benchmarks/results/proxy_rerank.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from benchmarks.proxy_load import proxy_and_fake_upstream

RESULTS = Path(__file__).parent / "results"
QUERY = "Which city is the capital of Australia, and why was it chosen?"
WORDS = (
    "the city capital australia canberra sydney melbourne parliament chosen compromise "
    "between rivals planned designed federal territory history river lake population"
).split()


def documents(count: int) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(40)) + "." for _ in range(count)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    import httpx2
    import torch

    from capplug import Scorer

    docs = documents(args.documents)
    scorer = Scorer()
    scorer.score(QUERY, docs)  # warm-up
    own = []
    for _ in range(args.runs):
        started = time.perf_counter()
        scorer.score(QUERY, docs)
        own.append(time.perf_counter() - started)

    logs = Path(tempfile.mkdtemp(prefix="capplug-proxy-rerank-"))
    with proxy_and_fake_upstream(logs, []) as (url, _):
        body = {"model": "capplug", "query": QUERY, "documents": docs, "top_n": 10}
        served = []
        with httpx2.Client(timeout=120) as http:
            for attempt in range(args.runs + 1):
                started = time.perf_counter()
                response = http.post(f"{url}/v1/rerank", json=body)
                seconds = time.perf_counter() - started
                if response.status_code != 200:
                    raise SystemExit(f"/v1/rerank answered {response.status_code}: {response.text}")
                if attempt:  # the first is the warm-up
                    served.append(seconds)
    own_p50, served_p50 = statistics.median(own), statistics.median(served)
    return {
        "benchmark": "proxy_rerank",
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}",
        "documents": args.documents,
        "runs": args.runs,
        "scorer_p50_seconds": own_p50,
        "rerank_p50_seconds": served_p50,
        "ratio": served_p50 / own_p50,
        "target_ratio": 1.2,
    }


def write_report(result: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "proxy_rerank.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"| {result['documents']} documents, median of {result['runs']} | seconds |",
        "| --- | ---: |",
        f"| the scorer's own time (`Scorer.score`, in process) | {result['scorer_p50_seconds']:.3f} |",
        f"| `POST /v1/rerank` through the proxy | {result['rerank_p50_seconds']:.3f} |",
        f"| ratio (target <= {result['target_ratio']}) | {result['ratio']:.2f}x |",
        "",
        f"{result['machine']}.",
    ]
    (RESULTS / "proxy_rerank.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=100)
    parser.add_argument("--runs", type=int, default=15)
    write_report(run(parser.parse_args()))


if __name__ == "__main__":
    main()
