"""Instruction -> adapter -> answer, with the adapter store in between.

The first instruction finds nothing similar in the store, so the hypernetwork writes a LoRA
adapter for it (one forward pass), and the store indexes it in Chroma. A second instruction
worded differently but meaning the same is close enough to reuse that adapter: a hit, no new
adapter. Both answers print with their adapter id and similarity.

With a selector (the default), the judged fallback checks the new adapter on its first input:
the adapter's answer against the bare base model's (the instruction in its prompt), judged by
the selector; the verdict is kept in the store, and the answer printed is the winner's. The hit
reads the stored verdict instead of judging again.

    python examples/adapter_store.py [--store DIR] [--hypernet REF] [--threshold 0.8] [--no-judge]

Offline: the hypernetwork, the instruction encoder and SmolLM2-135M-Instruct all come with
capplug or its packaged models. Without --store the store lives in a temporary folder.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

EXAMPLES = [
    (
        "Classify the sentiment of the movie review as positive or negative.",
        "The acting was wooden and the plot made no sense at all.",
    ),
    (
        "Decide whether this movie review is positive or negative.",
        "A warm, funny film with a wonderful cast. I loved every minute.",
    ),
]


def instruction_to_adapter(
    store_dir: Path | None = None,
    *,
    hypernet: str = "capplug-hypernet-smollm2",
    threshold: float = 0.8,
    examples: list[tuple[str, str]] = EXAMPLES,
    selector: object | None = None,
    judge: bool = True,
) -> None:
    from capplug.adapters import (
        AdapterJudge,
        AdapterRuntime,
        AdapterStore,
        Hypernetwork,
        user_prompt,
    )

    with tempfile.TemporaryDirectory(prefix="capplug-store-") as scratch:
        root = Path(store_dir) if store_dir is not None else Path(scratch)
        generator = Hypernetwork.from_pretrained(hypernet)
        runtime = AdapterRuntime.from_pretrained(generator.config.base_ref, max_loaded=4)
        judged = None
        if judge:
            if selector is None:
                from capplug import Reranker

                selector = Reranker()
            judged = AdapterJudge(runtime, selector, max_new_tokens=24)
        print(f"\n== instruction -> adapter (store: {root}, hit threshold {threshold})")
        with AdapterStore(
            root,
            base_model=generator.config.base_model,
            generator=generator.generate,
            threshold=threshold,
        ) as store:
            # Load both encoders now, so the timings below are the lookups' and not the loading.
            generator.encoder()
            store.embedding_function(["warm-up"])
            for instruction, text in examples:
                started = time.perf_counter()
                result = store.get_or_create(instruction)
                adapter_id = result.record.id
                if adapter_id not in runtime.loaded:
                    runtime.add(adapter_id, store.files(adapter_id).folder)
                ready = time.perf_counter() - started
                record, verdict = result.record, ""
                if judged is not None and record.check is None:
                    # Checked as it is asked below: the adapter reads the instruction too.
                    record, comparison = judged.check(
                        store, adapter_id, probe=text, with_instruction=True
                    )
                    scores = ", ".join(f"{k} {v:.2f}" for k, v in comparison.scores.items())
                    verdict = f"judged now: {comparison.winner} won ({scores})"
                elif record.check is not None:
                    verdict = f"stored verdict: {record.check.winner} won"
                side = None if record.falls_back else adapter_id
                answer = runtime.generate(
                    [user_prompt(text, instruction)], adapter=side, max_new_tokens=24
                )[0]
                similarity = "-" if result.similarity is None else f"{result.similarity:.3f}"
                what = "hit " if result.hit else "miss"
                print(f"instruction: {instruction}")
                print(f"  {what} adapter {adapter_id}  similarity {similarity}  ({ready:.2f}s)")
                if verdict:
                    print(f"  {verdict}: the {'base model' if side is None else 'adapter'} answers")
                print(f"  input:  {text}")
                print(f"  answer: {answer.strip()!r}")
            print(f"{len(store)} adapter(s) in the store")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, help="store folder (default: a temporary one)")
    parser.add_argument("--hypernet", default="capplug-hypernet-smollm2", help="hypernetwork")
    parser.add_argument("--threshold", type=float, default=0.8, help="similarity for a hit")
    parser.add_argument("--no-judge", dest="judge", action="store_false", help="no fallback")
    args = parser.parse_args()
    instruction_to_adapter(
        args.store, hypernet=args.hypernet, threshold=args.threshold, judge=args.judge
    )


if __name__ == "__main__":
    main()
