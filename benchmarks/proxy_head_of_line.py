"""How long a small request waits behind a huge one in the reranking proxy.

Target: a small request's wait behind a 5 MB and a 15 MB body at most 200 ms at p99, on this
machine with a second process loading it. Same three processes as ``proxy_load.py`` (a fast
fake upstream, ``capplug proxy --n 8`` with the bundled scorer, and this script as the client),
and a fourth that keeps one core busy (``--no-load`` leaves it out).

For each size the big request is first sent alone to learn how long it takes (T). Then, for
every phase of it, the big request is sent again and a small ordinary request follows it after
a delay: at ``--phases`` even fractions of T, and in its last half second (T - 0.4, T - 0.2 and
T - 0.1 s), each ``--repeats`` times, so the small one lands while the big one is being read,
forwarded, scored and answered. The small request's wait is its latency minus its median
latency alone; every big request must still be answered with a 200.

    python -m benchmarks.proxy_head_of_line [--sizes 5 15] [--phases 8] [--repeats 2]

Writes benchmarks/results/proxy_head_of_line.{json,md}: every probe, and per size the wait's
p50, p99 and max.
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


def big_alone(url: str, megabytes: float) -> float:
    """Seconds the big request takes with nothing else in flight (the median of two)."""
    import multiprocessing

    times = []
    for _ in range(2):
        started, results = multiprocessing.Event(), multiprocessing.Queue()
        sender = multiprocessing.Process(target=_send_big, args=(url, megabytes, started, results))
        sender.start()
        _, status, seconds, _ = results.get()
        sender.join()
        if status != 200:
            raise SystemExit(f"the {megabytes:g} MB request alone was answered {status}")
        times.append(seconds)
    return statistics.median(times)


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


def _burn(stop: Any) -> None:
    """The second process: one core kept busy until ``stop`` is set."""
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x = (x * 1103515245 + 12345) % 2147483648


def delays_for(big_seconds: float, phases: int) -> list[float]:
    """Delays that land a small request in every phase of a big one taking ``big_seconds``:
    ``phases`` even fractions of it, and three points in its last half second."""
    even = [big_seconds * k / phases for k in range(phases)]
    last = [big_seconds - tail for tail in (0.4, 0.2, 0.1) if big_seconds - tail > 0]
    return sorted({round(d, 3) for d in [*even, *last]})


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation, as numpy's default."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import multiprocessing

    import torch

    logs = Path(tempfile.mkdtemp(prefix="capplug-head-of-line-"))
    stop = multiprocessing.Event()
    load = None
    if args.load:
        load = multiprocessing.Process(target=_burn, args=(stop,), daemon=True)
        load.start()
    try:
        with proxy_and_fake_upstream(logs, ["--n", "8"]) as (url, _):
            return _measure(
                url, args, logs, loaded=load is not None, torch_version=torch.__version__
            )
    finally:
        stop.set()
        if load is not None:
            load.join(timeout=10)


def _measure(
    url: str, args: argparse.Namespace, logs: Path, *, loaded: bool, torch_version: str
) -> dict[str, Any]:
    asyncio.run(alone(url, 5))  # warm-up
    baseline = statistics.median(asyncio.run(alone(url, 15)))
    print(f"small request alone: {1000 * baseline:.0f} ms (median of 15)", flush=True)
    sizes = []
    for megabytes in args.sizes:
        big_seconds = big_alone(url, megabytes)
        delays = delays_for(big_seconds, args.phases)
        print(
            f"{megabytes:g} MB alone: {big_seconds:.2f} s; small sent after "
            + ", ".join(f"{d:.2f}" for d in delays)
            + f" s, {args.repeats} times each",
            flush=True,
        )
        rows = [
            asyncio.run(behind(url, megabytes, delay))
            for _ in range(args.repeats)
            for delay in delays
        ]
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
        waits = [r["wait"] for r in rows]
        sizes.append(
            {
                "bytes": size,
                "big_alone_seconds": big_seconds,
                "rows": rows,
                "p50": percentile(waits, 50),
                "p99": percentile(waits, 99),
                "max": max(waits),
            }
        )
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
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch_version}",
        "loaded": loaded,
        "small_alone_seconds": baseline,
        "sizes": sizes,
        "worst_wait_seconds": max(r["wait"] for s in sizes for r in s["rows"]),
        "worst_p99_seconds": max(s["p99"] for s in sizes),
        "target_seconds": 0.2,
    }


def write_report(result: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "proxy_head_of_line.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# A small request behind a huge one (reranking proxy)",
        "",
        f"{result['machine']}; `capplug proxy --n 8`, bundled scorer, fake upstream; "
        + ("a second process keeping one core busy." if result["loaded"] else "no other load."),
        f"Small request alone: {1000 * result['small_alone_seconds']:.0f} ms (median of 15).",
        "",
        "| big body | big alone | probes | small's wait p50 | p99 | max |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for size in result["sizes"]:
        lines.append(
            f"| {size['bytes'] / 1e6:.1f} MB | {size['big_alone_seconds']:.2f} s | "
            f"{len(size['rows'])} | {1000 * size['p50']:.0f} ms | {1000 * size['p99']:.0f} ms | "
            f"{1000 * size['max']:.0f} ms |"
        )
    lines += [
        "",
        "Every probe:",
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
    worst, p99 = 1000 * result["worst_wait_seconds"], 1000 * result["worst_p99_seconds"]
    lines += [
        "",
        f"Worst p99: {p99:.0f} ms, worst wait {worst:.0f} ms (target: p99 at most 200 ms).",
    ]
    (RESULTS / "proxy_head_of_line.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[5.0, 15.0], help="MB")
    parser.add_argument(
        "--phases", type=int, default=8, help="even fractions of the big request's time"
    )
    parser.add_argument("--repeats", type=int, default=2, help="probes per delay")
    parser.add_argument(
        "--no-load", dest="load", action="store_false", help="no second process loading a core"
    )
    result = run(parser.parse_args())
    write_report(result)
    for size in result["sizes"]:
        print(
            f"{size['bytes'] / 1e6:.1f} MB: small's wait p50 {1000 * size['p50']:.0f} ms, "
            f"p99 {1000 * size['p99']:.0f} ms, max {1000 * size['max']:.0f} ms"
        )
    print(f"worst p99 {1000 * result['worst_p99_seconds']:.0f} ms (target <= 200 ms)")


if __name__ == "__main__":
    main()
