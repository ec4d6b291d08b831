"""Best-of-n through LangChain, offline: ChatOpenAI against a local OpenAI-compatible server.

The packaged SmolLM2-135M-Instruct is served on 127.0.0.1 by capplug's own server, so the
LangChain side is exactly what it would be against OpenAI or vLLM: swap the `base_url` (and the
model name) for a real endpoint and nothing else changes.

    python examples/langchain_best_of_n.py ["your question"]
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Any

MODEL = "smollm2-135m-instruct"


@contextmanager
def local_endpoint():
    """Serve the packaged SmolLM2 on a free loopback port; yields the OpenAI base URL."""
    from capplug.llms import LocalChatModel
    from capplug.serve import create_app, serve_in_thread

    model = LocalChatModel.from_pretrained(MODEL)
    with serve_in_thread(create_app(model, model_name=MODEL)) as url:
        yield f"{url}/v1"


def best_of_n(question: str, base_url: str, *, n: int = 8, scorer: Any = None) -> None:
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_openai import ChatOpenAI

    from langchain_capplug import CappyBestOfN

    llm = ChatOpenAI(model=MODEL, base_url=base_url, api_key="local", max_tokens=48)
    best = CappyBestOfN(llm=llm, n=n, scorer=scorer)  # scorer=None: capplug's default scorer
    prompt = ChatPromptTemplate.from_messages(
        [("system", "You are a helpful assistant. Answer briefly."), ("human", "{question}")]
    )
    started = time.perf_counter()
    reply = (prompt | best).invoke({"question": question})
    took = time.perf_counter() - started
    meta = reply.response_metadata["capplug"]
    print(f"\n== LangChain: prompt | CappyBestOfN(ChatOpenAI, n={n})")
    print(f"question: {question}")
    print(
        f"{meta['n_received']} candidates received, {len(meta['candidates'])} distinct, "
        f"{meta['failures']} failed, {took:.1f}s"
    )
    order = sorted(range(len(meta["scores"])), key=lambda i: -meta["scores"][i])
    for i in order:
        mark = "*" if i == meta["chosen"] else " "
        print(
            f" {mark} {meta['scores'][i]:6.3f}  {meta['candidates'][i].replace(chr(10), ' ')[:90]}"
        )
    # The chain composes like any chat model: add a parser and you get the chosen text.
    print(f"chosen: {StrOutputParser().invoke(reply)!r}")


def main() -> None:
    question = sys.argv[1] if len(sys.argv) > 1 else "Name three primary colors."
    with local_endpoint() as base_url:
        best_of_n(question, base_url)


if __name__ == "__main__":
    main()
