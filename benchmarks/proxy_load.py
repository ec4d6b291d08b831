"""Latency the reranking proxy adds per request under 1, 8 and 32 concurrent clients on 127.0.0.1.

docs/benchmarks.md, "Adapter store and services": proxy latency added per request under 1, 8 and 32
concurrent clients, with every request answered. Three processes, as in a deployment:

- a fast fake upstream (raw asyncio HTTP, this script with ``--fake-upstream``) that answers
  every chat completion at once with ``n`` distinct, realistic candidate answers;
- the proxy, started as users start it: ``capplug proxy --upstream ... --n 8`` with the bundled
  scorer;
- the clients, here: ``c`` concurrent clients, each sending its next request as soon as its last
  one is answered, until the level's request count is reached.

For every request the proxy reports in ``Server-Timing`` how long it waited on the upstream
and on the scorer (waiting for the scorer's thread included) and how long it held the request
in all. Two figures for what the proxy adds beyond those two waits:

- as the client sees it: the client's latency minus the two waits (this includes the
  network and the load generator's own queueing: one Python process parsing the answers of
  every client, which arrive in bursts because waiting requests are scored in one batch);
- inside the proxy: its total minus the two waits (parsing, forwarding, choosing, answering,
  and waiting for its event loop).

The same load sent straight to the fake upstream (``n=8`` in one request) is measured side by
side as the reference. A level fails the run if any request is not answered with a 200.

    python -m benchmarks.proxy_load [--concurrency 1 8 32] [--requests 64 256 384] [--n 8]

Writes benchmarks/results/proxy_load.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "What is the largest planet in the solar system?",
    "Give a one-sentence definition of photosynthesis.",
    "Translate 'good morning' into Spanish.",
    "What is 15 multiplied by 4?",
    "Why is the sky blue? Answer in one sentence.",
    "List two benefits of regular exercise.",
]
ANSWERS = [
    "The capital of France is Paris, which is also its largest city.",
    "Paris.",
    "I think it is Lyon, a large city in the south-east of the country.",
    "Red, yellow and blue are the three primary colors in traditional color theory.",
    "Jupiter is the largest planet in the solar system, more than eleven times as wide as Earth.",
    "Photosynthesis is the process by which plants use sunlight, water and carbon dioxide to "
    "make glucose and oxygen.",
    "Buenos días.",
    "15 multiplied by 4 is 60.",
    "The sky looks blue because air molecules scatter short blue wavelengths of sunlight more "
    "than the longer red ones.",
    "Regular exercise strengthens the heart and improves mood and sleep.",
    "Saturn, because of its rings.",
    "I am not sure, but it might be 45.",
]


# ------------------------------------------------------------------------ the fake upstream


def completion_bytes(n: int, seed: int) -> bytes:
    texts = [ANSWERS[(seed + i) % len(ANSWERS)] for i in range(n)]
    words = sum(len(t.split()) for t in texts)
    return json.dumps(
        {
            "id": f"chatcmpl-fake{seed}",
            "object": "chat.completion",
            "created": 0,
            "model": "fake",
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
                for i, text in enumerate(texts)
            ],
            "usage": {"prompt_tokens": 20, "completion_tokens": words, "total_tokens": 20 + words},
        }
    ).encode()


async def serve_fake_upstream() -> None:
    """Answer every request at once; prints ``port N`` when listening."""
    counter = 0

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal counter
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = json.loads(await reader.readexactly(length)) if length else {}
                counter += 1
                answer = completion_bytes(body.get("n", 1), counter)
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    + f"content-length: {len(answer)}\r\n\r\n".encode()
                    + answer
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(connection, "127.0.0.1", 0, backlog=1024)
    print(f"port {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


# ------------------------------------------------------------------------------ processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def process(command: list[str], log: Path, **kwargs: Any) -> Iterator[subprocess.Popen[str]]:
    with log.open("w") as sink:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=sink, text=True, **kwargs)
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_healthy(url: str, proc: subprocess.Popen[str], log: Path, timeout: float = 180) -> None:
    import httpx2

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the proxy exited during startup:\n{log.read_text()[-2000:]}")
        with contextlib.suppress(httpx2.TransportError):
            if httpx2.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"the proxy did not start within {timeout} s:\n{log.read_text()[-2000:]}")


@contextlib.contextmanager
def proxy_and_fake_upstream(
    logs: Path, proxy_args: list[str], *, proxy_env: dict[str, str] | None = None
) -> Iterator[tuple[str, str]]:
    """The fake upstream and ``capplug proxy`` in front of it, each a process of its own, up
    and healthy; yields ``(proxy URL, upstream URL)``. ``proxy_args``: more proxy options."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    fake = [sys.executable, str(Path(__file__).resolve()), "--fake-upstream"]
    with process(fake, logs / "upstream.log", env=env) as upstream:
        assert upstream.stdout is not None
        upstream_url = f"http://127.0.0.1:{int(upstream.stdout.readline().split()[1])}"
        port = free_port()
        command = [sys.executable, "-m", "capplug.cli", "proxy", "--upstream"]
        command += [f"{upstream_url}/v1", "--port", str(port), *proxy_args]
        with process(command, logs / "proxy.log", env={**env, **(proxy_env or {})}) as proxy:
            proxy_url = f"http://127.0.0.1:{port}"
            wait_healthy(proxy_url, proxy, logs / "proxy.log")
            yield proxy_url, upstream_url


# ----------------------------------------------------------------------------------- load


async def run_level(url: str, concurrency: int, total: int, *, n: int | None) -> list[dict]:
    """``total`` requests from ``concurrency`` clients; one row per request."""
    import httpx2

    limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    rows: list[dict[str, Any]] = []
    issued = 0

    async def client(http: httpx2.AsyncClient) -> None:
        nonlocal issued
        while issued < total:
            i = issued
            issued += 1
            body: dict[str, Any] = {
                "model": "fake",
                "messages": [
                    {"role": "system", "content": "Answer briefly."},
                    {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]},
                ],
            }
            if n is not None:
                body["n"] = n
            started = time.perf_counter()
            try:
                response = await http.post(f"{url}/v1/chat/completions", json=body)
                response.json()
                status = response.status_code
                headers = response.headers
            except Exception as error:  # counted as unanswered; the level then fails
                status, headers = 0, {}
                print(f"request {i} failed: {type(error).__name__}: {error}", file=sys.stderr)
            seconds = time.perf_counter() - started
            rows.append({"status": status, "seconds": seconds, **server_timing(headers)})

    async with httpx2.AsyncClient(limits=limits, timeout=120) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return rows


def server_timing(headers: Any) -> dict[str, float]:
    """``upstream``, ``scoring`` and ``total`` from a ``Server-Timing`` header, in seconds."""
    timing = {"upstream": math.nan, "scoring": math.nan, "total": math.nan}
    for part in headers.get("server-timing", "").split(","):
        name, _, duration = part.strip().partition(";dur=")
        if name in timing and duration:
            timing[name] = float(duration) / 1000
    return timing


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary(values: list[float]) -> dict[str, float]:
    return {
        "p50": percentile(values, 0.5),
        "p99": percentile(values, 0.99),
        "mean": statistics.fmean(values),
    }


def measure(proxy_url: str, upstream_url: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    levels = []
    # Warm-up: connections, the scorer's first batches, allocator caches.
    asyncio.run(run_level(proxy_url, 4, 32, n=None))
    asyncio.run(run_level(upstream_url, 4, 32, n=args.n))
    for concurrency, total in zip(args.concurrency, args.requests, strict=True):
        started = time.perf_counter()
        direct = asyncio.run(run_level(upstream_url, concurrency, total, n=args.n))
        direct_seconds = time.perf_counter() - started
        started = time.perf_counter()
        rows = asyncio.run(run_level(proxy_url, concurrency, total, n=None))
        proxy_seconds = time.perf_counter() - started
        answered = sum(r["status"] == 200 for r in rows)
        good = [r for r in rows if r["status"] == 200]
        added = [r["seconds"] - r["upstream"] - r["scoring"] for r in good]
        inside = [r["total"] - r["upstream"] - r["scoring"] for r in good]
        level = {
            "clients": concurrency,
            "requests": total,
            "answered": answered,
            "direct_answered": sum(r["status"] == 200 for r in direct),
            "requests_per_second": total / proxy_seconds,
            "direct_requests_per_second": total / direct_seconds,
            "latency": summary([r["seconds"] for r in rows]),
            "upstream": summary([r["upstream"] for r in good]),
            "scoring": summary([r["scoring"] for r in good]),
            "added": summary(added),
            "inside": summary(inside),
            "direct_latency": summary([r["seconds"] for r in direct]),
        }
        levels.append(level)
        print(
            f"{concurrency:>2} clients: {answered}/{total} answered, "
            f"{level['requests_per_second']:.1f} req/s; latency p50 "
            f"{1000 * level['latency']['p50']:.1f} ms; added p50 "
            f"{1000 * level['added']['p50']:.2f} ms, p99 {1000 * level['added']['p99']:.2f} ms "
            f"(inside the proxy p50 {1000 * level['inside']['p50']:.2f} ms, "
            f"p99 {1000 * level['inside']['p99']:.2f} ms); "
            f"scoring p50 {1000 * level['scoring']['p50']:.1f} ms",
            flush=True,
        )
    return levels


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    logs = Path(tempfile.mkdtemp(prefix="capplug-proxy-load-"))
    proxy_args = ["--n", str(args.n)] + (["--scorer", args.scorer] if args.scorer else [])
    threads = {"OMP_NUM_THREADS": str(args.scorer_threads)} if args.scorer_threads else None
    with proxy_and_fake_upstream(logs, proxy_args, proxy_env=threads) as (proxy_url, upstream_url):
        load_before = os.getloadavg()[0]
        levels = measure(proxy_url, upstream_url, args)
    unanswered = [lv for lv in levels if lv["answered"] != lv["requests"]]
    if unanswered:
        raise SystemExit(f"not every request was answered: {unanswered} (logs in {logs})")
    return {
        "benchmark": "proxy_load",
        "n": args.n,
        "scorer": args.scorer or "capplug-default (bundled)",
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"Python {platform.python_version()}",
        "scorer_threads": args.scorer_threads,
        "load_average_before": round(load_before, 2),
        "levels": levels,
    }


def ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f}" if seconds >= 0.1 else f"{1000 * seconds:.2f}"


def write_report(result: dict[str, Any]) -> None:
    from capplug._cache import write_json_atomic

    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json_atomic(RESULTS / "proxy_load.json", result)
    n = result["n"]
    threads = result["scorer_threads"]
    scoring = (
        f"torch threads: {threads} (OMP_NUM_THREADS)"
        if threads
        else "its default scoring threads: one per CPU, one torch thread each"
    )
    lines = [
        f"`capplug proxy --n {n}` (bundled scorer, {scoring}) in "
        "front of a fake upstream that answers at once; clients, proxy and upstream as three "
        f"processes on 127.0.0.1; {result['machine']} (shared with other work: load average "
        f"{result['load_average_before']} before the run). Times in ms, p50 / p99 per request.",
        "",
        "| clients | answered | req/s | latency | upstream | scoring (incl. queue) "
        "| **added, as the client sees it** | **added, inside the proxy** "
        "| upstream alone (n=8, direct) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for lv in result["levels"]:

        def pair(key: str, lv: dict[str, Any] = lv) -> str:
            return f"{ms(lv[key]['p50'])} / {ms(lv[key]['p99'])}"

        lines.append(
            f"| {lv['clients']} | {lv['answered']}/{lv['requests']} "
            f"| {lv['requests_per_second']:.1f} | {pair('latency')} | {pair('upstream')} "
            f"| {pair('scoring')} | **{pair('added')}** | **{pair('inside')}** "
            f"| {pair('direct_latency')} |"
        )
    lines += [
        "",
        "Added, as the client sees it = the client's latency minus the time the proxy waited on "
        "the upstream and on the scorer (both from the proxy's `Server-Timing` header); this "
        "includes the network and the load generator's own queueing. Added, inside the proxy = "
        "the proxy's own total minus the same two waits: parsing, forwarding, choosing, "
        "answering, and waiting for its event loop. Scoring includes waiting for the scorer, "
        "which serves one batch at a time: past one client, it is the queue for the scorer "
        "that grows.",
    ]
    tmp = RESULTS / ".proxy_load.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, RESULTS / "proxy_load.md")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, nargs="+", default=[64, 256, 384])
    parser.add_argument("--n", type=int, default=8, help="candidates per request (default: 8)")
    parser.add_argument("--scorer", default=None, help="scorer reference (default: bundled)")
    parser.add_argument(
        "--scorer-threads",
        type=int,
        default=None,
        help="torch threads in the proxy process (OMP_NUM_THREADS; default: torch's own choice)",
    )
    parser.add_argument("--fake-upstream", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fake_upstream:
        asyncio.run(serve_fake_upstream())
        return
    if len(args.concurrency) != len(args.requests):
        parser.error("give one --requests count per --concurrency level")
    write_report(run(args))


if __name__ == "__main__":
    main()
