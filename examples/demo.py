"""capplug tour: score and rank candidate answers with the bundled scorer, offline.

Run it with `make demo` (which installs first) or `python examples/demo.py`.
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


def main() -> None:
    started = time.perf_counter()
    scorer = Scorer.from_pretrained("capplug-default")
    print(f"loaded {scorer} in {time.perf_counter() - started:.1f}s")
    for number, (instruction, responses) in enumerate(EXAMPLES, start=1):
        show(f"example {number}", instruction, responses, scorer)


if __name__ == "__main__":
    main()
