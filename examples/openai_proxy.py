"""Reranked answers for an app that uses the openai SDK: change the base URL, nothing else.

Starts capplug's local OpenAI-compatible server over the packaged SmolLM2-135M-Instruct and the
reranking proxy in front of it, both in this process on 127.0.0.1 (in production, run
``capplug proxy --upstream https://api.openai.com/v1`` instead), then talks to both with the
plain openai SDK. Runs offline.

    python examples/openai_proxy.py
"""

from __future__ import annotations

from openai import OpenAI

from capplug import Scorer
from capplug.llms import LocalChatModel
from capplug.serve import create_app, create_proxy_app, serve_in_thread

MODEL = "smollm2-135m-instruct"
MESSAGES = [
    {"role": "system", "content": "Answer in one sentence."},
    {"role": "user", "content": "Why do leaves change color in autumn?"},
]


def main() -> None:
    model = LocalChatModel.from_pretrained(MODEL)
    with (
        serve_in_thread(create_app(model, model_name=MODEL)) as upstream,
        serve_in_thread(create_proxy_app(f"{upstream}/v1", scorer=Scorer(), n=4)) as proxy,
    ):
        direct = OpenAI(base_url=f"{upstream}/v1", api_key="local")
        client = OpenAI(base_url=f"{proxy}/v1", api_key="local")  # the one-line change

        plain = direct.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=32)
        print(f"straight from the model:\n  {plain.choices[0].message.content}\n")

        reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=32)
        meta = reply.capplug  # the proxy's extra field: what it drew and how it scored it
        print(
            f"through the proxy (best of {meta['n_received']}, score "
            f"{meta['scores'][meta['chosen']]:.3f}):\n  {reply.choices[0].message.content}"
        )
        assert reply.usage is not None
        print(
            f"  usage summed over the {meta['upstream_calls']} upstream call(s): "
            f"{reply.usage.total_tokens} tokens\n"
        )

        # Asking for n choices returns the best n of the candidates, best first.
        ranked = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=32, n=2)
        print("the best 2 of 4, best first:")
        for choice, index in zip(ranked.choices, ranked.capplug["returned"], strict=True):
            score = ranked.capplug["scores"][index]
            print(f"  {score:.3f}  {choice.message.content}")

        # Streaming works too (the chosen answer streams once chosen), and per-request headers
        # change the number of candidates (X-Capplug-N) or switch reranking off
        # (X-Capplug-Disable: 1).
        print("\nstreamed, best of 2:\n  ", end="")
        stream = client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=32,
            stream=True,
            extra_headers={"X-Capplug-N": "2"},
        )
        for chunk in stream:
            if chunk.choices:
                print(chunk.choices[0].delta.content or "", end="", flush=True)
        print()


if __name__ == "__main__":
    main()
