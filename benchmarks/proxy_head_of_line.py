"""How long a small request waits behind a huge one in the reranking proxy.

Issue target: a small request waits at most 200 ms behind a 15 MB one. Same three processes as
``proxy_load.py`` (a fast fake upstream, ``capplug proxy --n 8`` with the bundled scorer, and
this script as the client). For each size, one request whose user message is that many bytes is
sent, and a small ordinary request follows it after a delay (several delays, so that the small
one lands while the big one is being read, forwarded, and scored). The small request's wait is
its latency minus its median latency alone; the big request must still be answered with a 200.

    python -m benchmarks.proxy_head_of_line [--sizes 5 15] [--delays 0.05 0.25 0.5 1.0]

Writes benchmarks/results/proxy_head_of_line.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from benchmarks.proxy_load import proxy_and_fake_upstream, server_timing

RESULTS = Path(__file__).parent / "results"
SMALL = {
    "model": "fake",
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
}


def big_body(megabytes: float) -> bytes:
    filler = "The quick brown fox jumps over the lazy dog. " * (int(megabytes * 1e6) // 45)
    body = {"model": "fake", "messages": [{"role": "user", "content": filler + "Summarise."}]}
    return json.dumps(body).encode()


async def timed_post(http: Any, url: str, content: bytes) -> tuple[int, float, dict[str, float]]:
    """Status, seconds as the client saw them, and the proxy's Server-Timing (seconds)."""
    started = time.perf_counter()
    response = await http.post(
        f"{url}/v1/chat/completions",
        content=content,
        headers={"content-type": "application/json"},
    )
    return response.status_code, time.perf_counter() - started, server_timing(response.headers)


async def alone(url: str, times: int) -> list[float]:
    import httpx2

    small = json.dumps(SMALL).encode()
    async with httpx2.AsyncClient(timeout=300) as http:
        out = []
        for _ in range(times):
            status, seconds, _ = await timed_post(http, url, small)
            assert status == 200, status
            out.append(seconds)
        return out


def _send_big(url: str, megabytes: float, started: Any, results: Any) -> None:
    """In a process of its own, so that sending 15 MB does not hold up the small request's
    client: the wait measured is the proxy's."""
    import httpx2

    body = big_body(megabytes)

    async def send() -> tuple[int, float, dict[str, float]]:
        async with httpx2.AsyncClient(timeout=300) as http:
            started.set()
            return await timed_post(http, url, body)

    results.put((len(body), *asyncio.run(send())))


async def behind(url: str, megabytes: float, delay: float) -> dict[str, Any]:
    import multiprocessing

    import httpx2

    small = json.dumps(SMALL).encode()
    started, results = multiprocessing.Event(), multiprocessing.Queue()
    sender = multiprocessing.Process(target=_send_big, args=(url, megabytes, started, results))
    sender.start()
    await asyncio.to_thread(started.wait)
    async with httpx2.AsyncClient(timeout=300) as second:
        await asyncio.sleep(delay)
        small_status, small_seconds, timing = await timed_post(second, url, small)
    size, big_status, big_seconds, big_timing = await asyncio.to_thread(results.get)
    sender.join()
    return {
        "delay": delay,
        "bytes": size,
        "small_status": small_status,
        "small_seconds": small_seconds,
        "small_timing": timing,
        "big_status": big_status,
        "big_seconds": big_seconds,
        "big_timing": big_timing,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    logs = Path(tempfile.mkdtemp(prefix="capplug-head-of-line-"))
    with proxy_and_fake_upstream(logs, ["--n", "8"]) as (url, _):
        asyncio.run(alone(url, 5))  # warm-up
        baseline = statistics.median(asyncio.run(alone(url, 15)))
        print(f"small request alone: {1000 * baseline:.0f} ms (median of 15)", flush=True)
        sizes = []
        for megabytes in args.sizes:
            rows = [asyncio.run(behind(url, megabytes, delay)) for delay in args.delays]
            size = rows[0]["bytes"]
            for row in rows:
                row["wait"] = row["small_seconds"] - baseline
                print(
                    f"{size / 1e6:.1f} MB, small sent {1000 * row['delay']:.0f} ms "
                    f"later: small {row['small_status']} in "
                    f"{1000 * row['small_seconds']:.0f} ms (waited "
                    f"{1000 * row['wait']:.0f} ms); big {row['big_status']} in "
                    f"{row['big_seconds']:.2f} s; small's Server-Timing "
                    + ", ".join(f"{k} {1000 * v:.0f}" for k, v in row["small_timing"].items())
                    + " ms",
                    flush=True,
                )
            sizes.append({"bytes": size, "rows": rows})
    failed = [
        (s["bytes"], r)
        for s in sizes
        for r in s["rows"]
        if r["small_status"] != 200 or r["big_status"] != 200
    ]
    if failed:
        raise SystemExit(f"not every request was answered with a 200: {failed} (logs in {logs})")
    return {
        "benchmark": "proxy_head_of_line",
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}",
        "small_alone_seconds": baseline,
        "sizes": sizes,
        "worst_wait_seconds": max(r["wait"] for s in sizes for r in s["rows"]),
        "target_seconds": 0.2,
    }


def write_report(result: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "proxy_head_of_line.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# A small request behind a huge one (reranking proxy)",
        "",
        f"{result['machine']}; `capplug proxy --n 8`, bundled scorer, fake upstream.",
        f"Small request alone: {1000 * result['small_alone_seconds']:.0f} ms (median of 15).",
        "",
        "| big body | small sent after | small waited | big answered in |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for size in result["sizes"]:
        for row in size["rows"]:
            lines.append(
                f"| {size['bytes'] / 1e6:.1f} MB | {1000 * row['delay']:.0f} ms | "
                f"{1000 * row['wait']:.0f} ms | {row['big_seconds']:.2f} s |"
            )
    worst = 1000 * result["worst_wait_seconds"]
    lines += ["", f"Worst wait: {worst:.0f} ms (target: at most 200 ms)."]
    (RESULTS / "proxy_head_of_line.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[5.0, 15.0], help="MB")
    parser.add_argument("--delays", type=float, nargs="+", default=[0.05, 0.25, 0.5, 1.0])
    result = run(parser.parse_args())
    write_report(result)
    print(f"worst wait {1000 * result['worst_wait_seconds']:.0f} ms (target <= 200 ms)")


if __name__ == "__main__":
    main()
