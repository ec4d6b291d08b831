"""The adapter service: instruction to answer on a store hit against a miss, and under load.

docs/benchmarks.md, "Adapter store and services": time from an instruction to an answer on a store
hit and on a miss; the service under 1, 8 and 32 concurrent clients on 127.0.0.1 with every
request answered.

The service is the one ``capplug serve adapters`` runs: the packaged SmolLM2-135M-Instruct in an
:class:`AdapterRuntime`, a store embedded by the packaged MiniLM, and a hypernetwork for
SmolLM2 as the generator (untrained: no trained one is bundled yet, and an untrained one costs
the same forward pass). It is served by uvicorn on 127.0.0.1 in this process's thread; the
clients are httpx2 over real TCP, asking ``/v1/chat/completions`` with an ``instruction`` and
``max_tokens`` small, so the measure is the service and not the length of the answer.

1. Hit against miss, one client: a miss is a new instruction (embed, no match, the
   hypernetwork writes the adapter, the store writes and indexes it, the runtime attaches it,
   then the answer); a hit is a paraphrase of a stored instruction whose adapter is attached
   (embed, match, answer), a cold hit the same for an adapter not attached (attach from its
   checked files, then answer), an exact repeat the same instruction again (a hash lookup, no
   embedding). Each kind is asked ``--repeats`` times; medians reported, with the service's own
   breakdown (``capplug.timings``).
2. Load: ``c`` clients each send their next request when the last is answered, until the
   level's count; the requests cycle over paraphrases of stored instructions (hits). p50/p99
   latency, requests per second, and the median time per part inside the service.

    OMP_NUM_THREADS=1 python -m benchmarks.adapter_service [--concurrency 1 8 32] [--requests 24 64 128]

Writes benchmarks/results/adapter_service.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
PROMPT = [{"role": "user", "content": "The weather was lovely, so we walked to the old harbour."}]
# (stored instruction, a paraphrase that should hit it)
TASKS = [
    (
        "In this task, you are given a sentence in English. Translate it into French.",
        "Translate the given English sentence into French.",
    ),
    (
        "Given a movie review, classify its sentiment as positive or negative.",
        "Classify the sentiment of this movie review as positive or negative.",
    ),
    (
        "Summarize the given paragraph in one short sentence.",
        "Summarize this paragraph in a single short sentence.",
    ),
    (
        "Extract every person's name mentioned in the text.",
        "List the names of every person mentioned in the text.",
    ),
]
# New instructions, one per miss.
MISSES = [
    "Count the number of vowels in the given word.",
    "Rewrite the sentence in the passive voice.",
    "Decide whether the two sentences mean the same thing; answer yes or no.",
    "Give the antonym of the given adjective.",
    "Convert the given temperature from Celsius to Fahrenheit.",
    "Identify the language the text is written in.",
    "Sort the given list of words alphabetically.",
    "Write a title for the given news article.",
]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _median_parts(replies: list[dict[str, Any]]) -> dict[str, float]:
    parts: dict[str, list[float]] = {}
    for reply in replies:
        for name, value in reply["capplug"]["timings"].items():
            parts.setdefault(name, []).append(value)
    return {name: round(statistics.median(v), 2) for name, v in parts.items()}


async def _ask(http: Any, instruction: str, max_tokens: int) -> tuple[float, dict[str, Any]]:
    body = {
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "messages": PROMPT,
        "instruction": instruction,
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    started = time.perf_counter()
    response = await http.post("/v1/chat/completions", json=body)
    elapsed = (time.perf_counter() - started) * 1000.0
    if response.status_code != 200:
        raise RuntimeError(f"request failed: {response.status_code} {response.text[:300]}")
    return elapsed, response.json()


async def _hit_vs_miss(url: str, repeats: int, max_tokens: int) -> dict[str, Any]:
    import httpx2

    kinds: dict[str, list[tuple[float, dict[str, Any]]]] = {
        "miss": [],
        "hit (adapter attached)": [],
        "hit (adapter not attached)": [],
        "exact repeat": [],
    }
    async with httpx2.AsyncClient(base_url=url, timeout=120) as http:
        await _ask(http, TASKS[0][0], max_tokens)  # warm-up: first encoder and model calls
        for i in range(repeats):
            new = MISSES[i % len(MISSES)] + ("" if i < len(MISSES) else f" (variant {i})")
            kinds["miss"].append(await _ask(http, new, max_tokens))
            kinds["exact repeat"].append(await _ask(http, new, max_tokens))
            # The miss's adapter is attached now; a paraphrase of a stored task may not be.
            _, paraphrase = TASKS[i % len(TASKS)]
            cold = await _ask(http, paraphrase, max_tokens)
            if cold[1]["capplug"]["loaded"]:
                kinds["hit (adapter not attached)"].append(cold)
            kinds["hit (adapter attached)"].append(await _ask(http, paraphrase, max_tokens))
    out = {}
    for kind, results in kinds.items():
        if not results:
            continue
        latencies = [r[0] for r in results]
        replies = [r[1] for r in results]
        hits = [r["capplug"]["hit"] for r in replies]
        out[kind] = {
            "requests": len(results),
            "median_ms": round(statistics.median(latencies), 1),
            "min_ms": round(min(latencies), 1),
            "hit_rate": sum(bool(h) for h in hits) / len(hits),
            "parts_median_ms": _median_parts(replies),
        }
    return out


async def _load(url: str, concurrency: int, requests: int, max_tokens: int) -> dict[str, Any]:
    import httpx2

    paraphrases = [p for _, p in TASKS]
    latencies: list[float] = []
    replies: list[dict[str, Any]] = []
    failures: list[str] = []
    counter = iter(range(requests))
    limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx2.AsyncClient(base_url=url, timeout=600, limits=limits) as http:

        async def client() -> None:
            for i in counter:
                try:
                    elapsed, reply = await _ask(http, paraphrases[i % len(paraphrases)], max_tokens)
                except Exception as exc:  # counted: every request must be answered
                    failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                latencies.append(elapsed)
                replies.append(reply)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return {
        "concurrency": concurrency,
        "requests": requests,
        "answered": len(latencies),
        "failures": failures[:5],
        "p50_ms": round(_pct(latencies, 0.5), 1),
        "p99_ms": round(_pct(latencies, 0.99), 1),
        "requests_per_s": round(len(latencies) / wall, 2),
        "hit_rate": sum(bool(r["capplug"]["hit"]) for r in replies) / max(1, len(replies)),
        "parts_median_ms": _median_parts(replies),
    }


def _markdown(result: dict[str, Any]) -> str:
    meta = result["setup"]
    lines = [
        "# Adapter service: instruction to answer, and load",
        "",
        f"`capplug serve adapters` in-process on 127.0.0.1 (uvicorn, one worker), packaged "
        f"SmolLM2-135M-Instruct on CPU, store embedded by the packaged MiniLM, an untrained "
        f"SmolLM2 hypernetwork as the generator; httpx2 clients over TCP asking "
        f"`/v1/chat/completions` with an `instruction`, greedy, `max_tokens={meta['max_tokens']}`. "
        f"`OMP_NUM_THREADS=1` on a shared {meta['cpus']}-core machine (load average "
        f"{meta['load_before']} before, {meta['load_after']} after; a background job runs at "
        f"nice 19).",
        "",
        "## Instruction to answer: hit against miss (one client)",
        "",
        "| request | n | median | fastest | find adapter | attach | generate |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for kind, row in result["hit_vs_miss"].items():
        parts = row["parts_median_ms"]
        attach = f"{parts['load']:.0f} ms" if "load" in parts else "-"
        lines.append(
            f"| {kind} | {row['requests']} | {row['median_ms']:.0f} ms | {row['min_ms']:.0f} ms "
            f"| {parts.get('adapter', 0):.0f} ms | {attach} | {parts.get('generate', 0):.0f} ms |"
        )
    lines += [
        "",
        "Find adapter: the store's `get_or_create` (hash lookup; MiniLM embedding and Chroma "
        "query unless an exact repeat; on a miss also the hypernetwork's forward pass and the "
        "store's checked write and index). Attach: `runtime.add` from the store's sha256-checked "
        "files. Generate: tokenising, generation and counting, under the one-generation lock. "
        "Parts are the service's own medians (`capplug.timings`); the rest of the latency is "
        "HTTP, JSON and the thread hand-offs.",
        "",
        "## Under load (hits, every request answered)",
        "",
        "| clients | requests | answered | p50 | p99 | req/s | waiting for the model (median) | find adapter | generate |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result["load"]:
        parts = row["parts_median_ms"]
        lines.append(
            f"| {row['concurrency']} | {row['requests']} | {row['answered']} | "
            f"{row['p50_ms']:.0f} ms | {row['p99_ms']:.0f} ms | {row['requests_per_s']:.2f} | "
            f"{parts.get('queue', 0):.0f} ms | {parts.get('adapter', 0):.0f} ms | "
            f"{parts.get('generate', 0):.0f} ms |"
        )
    lines += ["", result["summary"], ""]
    return "\n".join(lines)


def _summary(result: dict[str, Any]) -> str:
    hvm = result["hit_vs_miss"]
    miss, hit = hvm["miss"], hvm["hit (adapter attached)"]
    one = result["load"][0]
    busiest = result["load"][-1]
    gen = one["parts_median_ms"].get("generate", 0.0)
    return (
        f"A miss costs {miss['median_ms']:.0f} ms against {hit['median_ms']:.0f} ms for a hit "
        f"({miss['median_ms'] / hit['median_ms']:.1f}x): making the adapter "
        f"(`find adapter` {miss['parts_median_ms'].get('adapter', 0):.0f} ms) and attaching it "
        f"({miss['parts_median_ms'].get('load', 0):.0f} ms) come on top of the same generation. "
        f"Under load the model dominates: one generation runs at a time, so requests per second "
        f"stay near one client's ({one['requests_per_s']:.2f} at 1 client, "
        f"{busiest['requests_per_s']:.2f} at {busiest['concurrency']}) and latency grows with the "
        f"queue (p50 {busiest['p50_ms']:.0f} ms at {busiest['concurrency']} clients, "
        f"of which {busiest['parts_median_ms'].get('queue', 0):.0f} ms waiting for the model); "
        f"generation itself is {gen:.0f} ms of one client's {one['p50_ms']:.0f} ms p50, the store "
        f"lookup {one['parts_median_ms'].get('adapter', 0):.0f} ms."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, nargs="+", default=[24, 64, 128])
    parser.add_argument("--repeats", type=int, default=8, help="requests per hit/miss kind")
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if len(args.requests) != len(args.concurrency):
        parser.error("give one --requests count per --concurrency level")

    from capplug.adapters import AdapterRuntime, Hypernetwork
    from capplug.adapters.embedding import SentenceEncoderEmbeddingFunction
    from capplug.adapters.store import AdapterStore
    from capplug.serve import create_adapter_app, serve_in_thread

    load_before = round(os.getloadavg()[0], 2)
    hypernet = Hypernetwork.from_base("smollm2-135m-instruct", encoder="minilm")
    with tempfile.TemporaryDirectory(prefix="capplug-bench-service-") as tmp:
        store = AdapterStore(
            Path(tmp) / "store",
            base_model="smollm2-135m-instruct",
            embedding_function=SentenceEncoderEmbeddingFunction(),
            generator=hypernet.generate,
            threshold=0.75,
        )
        for instruction, _ in TASKS:
            state, config = hypernet.generate(instruction)
            store.put(state, config, instruction=instruction, source="generated")
        # Fewer slots than tasks + misses, so some hits find their adapter detached.
        runtime = AdapterRuntime.from_pretrained(
            "smollm2-135m-instruct", device="cpu", max_loaded=4
        )
        app = create_adapter_app(store, runtime, max_tokens_cap=64)
        with serve_in_thread(app) as url:
            hit_vs_miss = asyncio.run(_hit_vs_miss(url, args.repeats, args.max_tokens))
            for name in list(runtime.loaded):  # the load levels start from the stored tasks
                runtime.remove(name)
            load = []
            for concurrency, requests in zip(args.concurrency, args.requests, strict=True):
                row = asyncio.run(_load(url, concurrency, requests, args.max_tokens))
                print(json.dumps(row), file=sys.stderr)
                if row["answered"] != requests:
                    raise SystemExit(f"{requests - row['answered']} requests were not answered")
                load.append(row)
        store.close()
    result: dict[str, Any] = {
        "setup": {
            "max_tokens": args.max_tokens,
            "repeats": args.repeats,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_before": load_before,
            "load_after": round(os.getloadavg()[0], 2),
        },
        "hit_vs_miss": hit_vs_miss,
        "load": load,
    }
    result["summary"] = _summary(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "adapter_service.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "adapter_service.md").write_text(_markdown(result))
    print(_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
