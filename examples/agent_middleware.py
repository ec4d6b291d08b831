"""An agent that keeps the best of n model responses at every step, offline.

`create_agent` runs a ChatOpenAI model pointed at capplug's local OpenAI-compatible server
(the packaged SmolLM2-135M-Instruct on 127.0.0.1); `CappyBestOfNMiddleware` samples n responses
per step and keeps the one capplug's scorer likes best. Steps where the model calls a tool are
left as the model made them (the tiny local model does not call tools; with a real endpoint and
tools, only the final answers are reranked).

    python examples/agent_middleware.py
"""

from __future__ import annotations

from langchain_best_of_n import MODEL, local_endpoint

from langchain_capplug import CappyBestOfNMiddleware


def main() -> None:
    from langchain.agents import create_agent
    from langchain_openai import ChatOpenAI

    questions = [
        "What is the boiling point of water at sea level, in Celsius?",
        "Give one word that rhymes with 'cat'.",
    ]
    with local_endpoint() as base_url:
        model = ChatOpenAI(model=MODEL, base_url=base_url, api_key="local", max_tokens=40)
        agent = create_agent(
            model,
            system_prompt="You are a concise assistant.",
            middleware=[CappyBestOfNMiddleware(n=4)],
        )
        for question in questions:
            state = agent.invoke({"messages": [{"role": "user", "content": question}]})
            answer = state["messages"][-1]
            meta = answer.response_metadata["capplug"]
            print(f"\n== agent step, best of {meta['n_requested']}")
            print(f"question: {question}")
            for i, (text, score) in enumerate(zip(meta["candidates"], meta["scores"], strict=True)):
                mark = "*" if i == meta["chosen"] else " "
                print(f" {mark} {score:6.3f}  {text.replace(chr(10), ' ')[:90]}")
            print(f"answer: {answer.text!r}")


if __name__ == "__main__":
    main()
