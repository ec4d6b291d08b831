"""Time to the first token through ``capplug serve local`` (docs/benchmarks.md, "Streaming";
target: <= 15% of the whole reply for n=1, 64 tokens).

The server runs SmolLM2-135M-Instruct in this process under uvicorn on 127.0.0.1; the openai
SDK streams a chat completion (n=1, ``max_tokens`` 64, greedy) and the time to the first content
chunk and to the end of the stream are taken. The baseline, in the same run, is the same request
with a ``stop`` sequence that never occurs: such a reply is generated whole before its first
chunk (a stop sequence is only known once the reply is complete), as every stream was before.

    python -m benchmarks.local_streaming [--runs 5] [--max-tokens 64]

Writes benchmarks/results/local_streaming.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
PROMPT = "Explain in a few sentences why the sky is blue."


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stream(client, max_tokens: int, stop: list[str] | None) -> tuple[float, float, int]:
    started = time.perf_counter()
    first = None
    pieces = 0
    stream = client.chat.completions.create(
        model="local",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        **({"stop": stop} if stop else {}),
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces += 1
            if first is None:
                first = time.perf_counter() - started
    return first or float("nan"), time.perf_counter() - started, pieces


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    import openai
    import uvicorn

    from capplug.llms import LocalChatModel
    from capplug.serve import create_app

    model = LocalChatModel.from_pretrained()
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(model, model_name="local"), port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
    _stream(client, 8, None)  # warm-up
    rows = {}
    for name, stop in (("live (n=1, no stop)", None), ("whole first (a stop given)", ["\x00"])):
        runs = [_stream(client, args.max_tokens, stop) for _ in range(args.runs)]
        first = statistics.median(r[0] for r in runs)
        total = statistics.median(r[1] for r in runs)
        rows[name] = {
            "first_token_s": round(first, 3),
            "whole_reply_s": round(total, 3),
            "first_share": round(first / total, 3),
            "content_chunks": statistics.median(r[2] for r in runs),
        }
    server.should_exit = True
    thread.join(timeout=10)
    result = {
        "rows": rows,
        "settings": vars(args),
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "local_streaming.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"| stream (SmolLM2-135M-Instruct, {args.max_tokens} tokens, median of {args.runs}) "
        "| first token | whole reply | first / whole | content chunks |",
        "| --- | ---: | ---: | ---: | ---: |",
        *(
            f"| {name} | {r['first_token_s']} s | {r['whole_reply_s']} s | "
            f"{100 * r['first_share']:.1f}% | {r['content_chunks']:.0f} |"
            for name, r in rows.items()
        ),
    ]
    (RESULTS / "local_streaming.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
