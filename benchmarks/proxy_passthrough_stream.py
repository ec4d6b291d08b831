"""Time to the first token of a stream through ``capplug serve proxy``, against the same stream
straight from the upstream, side by side (docs/benchmarks.md, "Streaming"): with reranking off
(``X-Capplug-Disable: 1``; target: within 10 ms of the upstream's own), and with reranking on
and one candidate (``X-Capplug-N: 1``, the ``n=1`` path that passes the upstream's tokens through
as they arrive and adds the ``capplug`` metadata in the last chunk; target: within 50 ms).

The upstream is ``capplug serve local`` (SmolLM2-135M-Instruct, which streams one greedy choice
token by token) and the proxy sits in front of it, each a process of its own on 127.0.0.1; this
script is the openai SDK client. Requests alternate between the two routes; medians over
``--runs`` each, after a warm-up.

    python -m benchmarks.proxy_passthrough_stream [--runs 10] [--max-tokens 32]

Writes benchmarks/results/proxy_passthrough_stream.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.local_streaming import _stream
from benchmarks.proxy_load import free_port, process, wait_healthy
from capplug._cache import write_json_atomic

RESULTS = Path(__file__).parent / "results"


def run(args: argparse.Namespace) -> dict[str, Any]:
    import openai

    logs = Path(tempfile.mkdtemp(prefix="capplug-passthrough-"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    local_port, proxy_port = free_port(), free_port()
    local = [sys.executable, "-m", "capplug.cli", "serve", "local", "--port", str(local_port)]
    with process(local, logs / "local.log", env=env) as upstream:
        local_url = f"http://127.0.0.1:{local_port}"
        wait_healthy(local_url, upstream, logs / "local.log")
        proxy = [sys.executable, "-m", "capplug.cli", "serve", "proxy", "--upstream"]
        proxy += [f"{local_url}/v1", "--port", str(proxy_port)]
        with process(proxy, logs / "proxy.log", env=env) as proxied:
            proxy_url = f"http://127.0.0.1:{proxy_port}"
            wait_healthy(proxy_url, proxied, logs / "proxy.log")
            clients = {
                "straight from the upstream": openai.OpenAI(
                    base_url=f"{local_url}/v1", api_key="none"
                ),
                "through the proxy, X-Capplug-Disable: 1": openai.OpenAI(
                    base_url=f"{proxy_url}/v1",
                    api_key="none",
                    default_headers={"X-Capplug-Disable": "1"},
                ),
                "through the proxy, reranking on, X-Capplug-N: 1": openai.OpenAI(
                    base_url=f"{proxy_url}/v1",
                    api_key="none",
                    default_headers={"X-Capplug-N": "1"},
                ),
            }
            for client in clients.values():
                _stream(client, 8, None)  # warm-up
            runs: dict[str, list[tuple[float, float, int]]] = {name: [] for name in clients}
            for _ in range(args.runs):
                for name, client in clients.items():
                    runs[name].append(_stream(client, args.max_tokens, None))
    rows = {
        name: {
            "first_token_s": statistics.median(r[0] for r in found),
            "whole_reply_s": statistics.median(r[1] for r in found),
            "content_chunks": statistics.median(r[2] for r in found),
        }
        for name, found in runs.items()
    }
    names = list(rows)

    def added_ms(name: str) -> float:
        """Median over runs of the paired first-token difference against the upstream."""
        pairs = zip(runs[names[0]], runs[name], strict=True)
        return 1000 * statistics.median(b[0] - a[0] for a, b in pairs)

    return {
        "benchmark": "proxy_passthrough_stream",
        "runs": args.runs,
        "max_tokens": args.max_tokens,
        "rows": rows,
        "first_token_added_ms_median": added_ms(names[1]),
        "target_ms": 10,
        "reranked_first_token_added_ms_median": added_ms(names[2]),
        "reranked_target_ms": 50,
    }


def write_report(result: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    write_json_atomic(RESULTS / "proxy_passthrough_stream.json", result)
    lines = [
        f"| stream ({result['max_tokens']} tokens, median of {result['runs']}) | first token "
        "| whole reply | content chunks |",
        "| --- | ---: | ---: | ---: |",
        *(
            f"| {name} | {1000 * r['first_token_s']:.1f} ms | {r['whole_reply_s']:.2f} s "
            f"| {r['content_chunks']:.0f} |"
            for name, r in result["rows"].items()
        ),
        "",
        f"The proxy adds {result['first_token_added_ms_median']:.1f} ms to the first token "
        f"with reranking off (median of the paired differences; target: at most "
        f"{result['target_ms']} ms), and {result['reranked_first_token_added_ms_median']:.1f} ms "
        f"with reranking on and one candidate (target: at most "
        f"{result['reranked_target_ms']} ms).",
    ]
    text = "\n".join(lines) + "\n"
    (RESULTS / "proxy_passthrough_stream.md").write_text(text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=32)
    write_report(run(parser.parse_args()))


if __name__ == "__main__":
    main()
