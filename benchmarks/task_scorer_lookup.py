"""Task-scorer lookup and switching with 1,000 task scorers stored (docs/benchmarks.md, "Task
scorers"; targets: lookup p50 <= 10 ms; switching adds <= 50 ms to a task's first request and
nothing after).

The store is the real one (:class:`capplug.adapters.TaskScorers` over the bundled scorer, its
Chroma index embedded by the packaged MiniLM), holding 1,000 task scorers indexed in bulk by
``AdapterStore.add_in_place``: each is the same real rank-8 task-scorer LoRA (1.3 MB, trained
here on a few judged selections), hard-linked under 1,000 instructions, with a guard verdict that
allows it. The instructions are synthetic: 40 task templates x 25 subjects.

Measured, each on texts the process has not looked up before:

- **lookup**: ``TaskScorers.store.lookup(task, k=3)`` for an exact repeat of a stored task (a
  chat's system message; answered by hash) and for an unseen rewording (embedded, then the
  HNSW query);
- **a request**: finding the task scorer and scoring 8 candidates with it, against scoring
  the same candidates with the bundled scorer alone: on the task's first request (the task
  scorer is read, checked and merged) and on its next ones (found in memory).

    python -m benchmarks.task_scorer_lookup [--stored 1000] [--tasks 20]

Writes benchmarks/results/task_scorer_lookup.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks._report import write_results
from benchmarks.adapter_store_lookup import bulk_index, embed_all, stats
from capplug import Scorer
from capplug.adapters.task_scorers import META_GUARD, TaskScorers
from capplug.data.rows import LabelledPair
from capplug.models.adapter_folder import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    read_adapter,
    write_peft_folder,
)
from capplug.scoring.guard import GuardReport
from capplug.scoring.precision import processor_name
from capplug.training.scorer import TrainConfig, train_scorer

RESULTS = Path(__file__).parent / "results"

TASKS = [
    ("Summarise the {s} in one sentence.", "Write a one-sentence summary of these {s}."),
    ("Translate the {s} into French.", "Render these {s} in French."),
    (
        "Classify the sentiment of the {s} as positive or negative.",
        "Is the tone of these {s} positive or negative?",
    ),
    ("Extract every person named in the {s}.", "List the people these {s} mention."),
    (
        "Answer the question about the {s} with yes or no.",
        "Reply yes or no to the question on these {s}.",
    ),
    ("Rewrite the {s} in plain English for a child.", "Explain these {s} simply, as to a child."),
    ("Give the {s} a short title.", "Suggest a brief headline for these {s}."),
    ("Correct the grammar of the {s}.", "Fix grammatical mistakes in these {s}."),
    ("List three keywords for the {s}.", "Name three key terms from these {s}."),
    ("Decide whether the {s} contain a complaint.", "Do these {s} include a complaint?"),
    ("Count the numbers mentioned in the {s}.", "How many numbers appear in these {s}?"),
    ("Write a polite reply to the {s}.", "Draft a courteous answer to these {s}."),
    ("Detect the language of the {s}.", "Which language are these {s} written in?"),
    ("Turn the {s} into a bulleted list.", "Reformat these {s} as bullet points."),
    ("Find the date mentioned in the {s}.", "Which date do these {s} refer to?"),
    (
        "Rate how formal the {s} are from 1 to 5.",
        "Score the formality of these {s} on a 1-5 scale.",
    ),
    (
        "Paraphrase the {s} without changing their meaning.",
        "Say these {s} differently, same meaning.",
    ),
    ("Identify the main topic of the {s}.", "What are these {s} mainly about?"),
    ("Convert the {s} into a formal email.", "Make these {s} into a formal e-mail."),
    ("Spot any factual errors in the {s}.", "Point out factual mistakes in these {s}."),
    (
        "Answer with the number and unit only, about the {s}.",
        "Give only number and unit for these {s}.",
    ),
    (
        "Tag each sentence of the {s} as fact or opinion.",
        "Label the sentences of these {s}: fact or opinion.",
    ),
    ("Write a question the {s} answer.", "Pose a question that these {s} answer."),
    ("Shorten the {s} to under twenty words.", "Cut these {s} down to fewer than 20 words."),
    ("Expand the {s} into a full paragraph.", "Develop these {s} into a complete paragraph."),
    (
        "Pick the best title for the {s} from the options.",
        "Choose the most fitting title for these {s}.",
    ),
    ("Explain the jargon in the {s}.", "Define the technical terms used in these {s}."),
    ("Decide if the {s} are sarcastic.", "Are these {s} meant sarcastically?"),
    ("Write the {s} in the passive voice.", "Put these {s} into passive voice."),
    ("Find the cause and the effect described in the {s}.", "What causes what in these {s}?"),
    ("Give the opposite meaning of the {s}.", "State the reverse of what these {s} say."),
    ("Mask personal data in the {s}.", "Redact private information from these {s}."),
    ("Make the {s} sound more enthusiastic.", "Rewrite these {s} with more enthusiasm."),
    ("Infer the author's intent in the {s}.", "What did the writer of these {s} want?"),
    (
        "Answer the multiple-choice question about the {s}.",
        "Choose the right option for the question on these {s}.",
    ),
    ("Sort the items in the {s} alphabetically.", "Order the items of these {s} from A to Z."),
    ("Check whether the {s} follow the style guide.", "Do these {s} comply with the style guide?"),
    ("Summarise the {s} as a haiku.", "Turn these {s} into a haiku summary."),
    ("Estimate the reading level of the {s}.", "What grade level are these {s} written at?"),
    ("Write a follow-up question to the {s}.", "Ask a question that follows on from these {s}."),
]
SUBJECTS = [
    "news articles", "product reviews", "tweets", "medical notes", "legal contracts",
    "recipes", "emails", "support tickets", "song lyrics", "sports reports", "research abstracts",
    "movie plots", "job adverts", "restaurant menus", "travel blogs", "meeting minutes",
    "school essays", "bank statements", "weather reports", "user manuals", "poems",
    "forum posts", "press releases", "chat logs", "book blurbs",
]  # fmt: skip
CANDIDATES = [
    "Five thousand metres.",
    "5000 m",
    "500 m",
    "To convert, multiply by 1000: 5 km is 5000 metres.",
    "It is 5 km, which is 5000 m.",
    "50 m",
    "5,000 m",
    "I am not sure.",
]


def tasks(count: int) -> list[tuple[str, str]]:
    pairs = [(t.format(s=s), p.format(s=s)) for t, p in TASKS for s in SUBJECTS]
    random.Random(0).shuffle(pairs)
    return pairs[:count]


def trained_lora(scorer: Scorer, folder: Path) -> Path:
    """A real rank-8 task scorer, trained on twelve judged selections (seconds)."""
    if (folder / ADAPTER_CONFIG).is_file():
        return folder
    pairs = [
        LabelledPair(
            f"Convert {k} kilometres to metres.", text, float(text == f"{k * 1000} m"), f"g{k}"
        )
        for k in range(2, 14)
        for text in (f"{k * 1000} m", f"{k} km is {k * 1000} metres.", f"{k * 100} m")
    ]
    config = TrainConfig(lora_rank=8, learning_rate=5e-4, epochs=2, batch_size=12, eval_every=100)
    train_scorer(scorer.with_weights({}), pairs, folder, config=config, progress=False)
    return folder


def fill(store: TaskScorers, texts: list[str], template: Path, vectors: Any) -> None:
    """``len(texts)`` task scorers: the template with a guard verdict that allows it, hard-linked
    under each text and indexed in bulk."""
    allowed = GuardReport(0.5, 0.9, 1.0, 8, True, "the adapted scorer picks better: use it")
    files = read_adapter(template)
    staged = store.store.root / ".template"
    header = {**files.metadata, META_GUARD: json.dumps(allowed.to_dict())}
    write_peft_folder(files.state_dict, files.config, staged, metadata=header)
    bulk_index(store.store, texts, vectors, staged, source="trained", link=True)


def timed(fn: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stored", type=int, default=1000)
    parser.add_argument("--tasks", type=int, default=20, help="tasks whose requests are timed")
    args = parser.parse_args()
    scorer = Scorer()
    work = Path(tempfile.mkdtemp(prefix="capplug-task-scorer-bench-"))
    template = trained_lora(scorer, work / "lora")
    store = TaskScorers(work / "store", scorer=scorer)
    pairs = tasks(args.stored)
    texts = [t for t, _ in pairs]
    fill(store, texts, template, embed_all(store.store.embedding_function, texts))
    assert store.store.collection.count() == args.stored

    rng = random.Random(2)
    probe = rng.sample(range(args.stored), 2 * args.tasks + 50)
    exact = [timed(lambda i=i: store.store.lookup(pairs[i][0], k=3))[1] for i in probe[:50]]
    reworded_hits = []
    reworded = []
    for i in probe[:50]:
        found, seconds = timed(lambda i=i: store.store.lookup(pairs[i][1], k=3))
        reworded.append(seconds)
        reworded_hits.append(bool(found) and found[0].record.instruction == pairs[i][0])

    chat = [
        {"role": "system", "content": ""},
        {"role": "user", "content": "Convert 5 km to metres."},
    ]
    scorer.score(chat[1]["content"], CANDIDATES)  # warm
    first, after, default = [], [], []
    for i in probe[50 : 50 + args.tasks]:
        chat[0]["content"] = pairs[i][0]

        def request() -> None:
            found = store.find(chat)
            assert found.scorer is not None, found.info
            found.scorer.score(chat, CANDIDATES)

        default.append(timed(lambda: scorer.score(chat, CANDIDATES))[1])
        first.append(timed(request)[1])
        after += [timed(request)[1] for _ in range(3)]
        default += [timed(lambda: scorer.score(chat, CANDIDATES))[1] for _ in range(3)]
    base = stats(default)["p50_ms"]
    report = {
        "stored": args.stored,
        "machine": {
            "processor": processor_name(),
            "threads": torch.get_num_threads(),
            "precision": str(scorer.precision.dtype),
        },
        "lookup_exact_repeat": stats(exact),
        "lookup_reworded": stats(reworded),
        "reworded_found_their_task": f"{sum(reworded_hits)}/{len(reworded_hits)}",
        "request_default_scorer": stats(default),
        "request_first_of_task": stats(first),
        "request_after": stats(after),
        "added_first_p50_ms": round(stats(first)["p50_ms"] - base, 3),
        "added_after_p50_ms": round(stats(after)["p50_ms"] - base, 3),
        "lora_bytes": (template / ADAPTER_WEIGHTS).stat().st_size,
    }
    lines = [
        f"## Task scorers: lookup and switching, {args.stored} stored",
        "",
        f"`python -m benchmarks.task_scorer_lookup` on {report['machine']['processor']}, "
        f"{report['machine']['threads']} threads, scorer at {report['machine']['precision']}. "
        f"Each task scorer: a rank-8 LoRA, {report['lora_bytes'] / 1e6:.2f} MB.",
        "",
        "| measured | p50 ms | p99 ms | target |",
        "| --- | ---: | ---: | --- |",
        f"| lookup, exact repeat of a stored task | {report['lookup_exact_repeat']['p50_ms']} | {report['lookup_exact_repeat']['p99_ms']} | p50 <= 10 |",
        f"| lookup, reworded task ({report['reworded_found_their_task']} found their own) | {report['lookup_reworded']['p50_ms']} | {report['lookup_reworded']['p99_ms']} | p50 <= 10 |",
        f"| request (score 8 candidates), bundled scorer | {base} | {report['request_default_scorer']['p99_ms']} | |",
        f"| request, a task's first (find, check, merge) | {report['request_first_of_task']['p50_ms']} | {report['request_first_of_task']['p99_ms']} | <= +50 |",
        f"| request, the task's next ones | {report['request_after']['p50_ms']} | {report['request_after']['p99_ms']} | +0 |",
        "",
        f"Added by the task scorer at p50: first request {report['added_first_p50_ms']} ms, "
        f"later requests {report['added_after_p50_ms']} ms.",
    ]
    write_results(RESULTS, "task_scorer_lookup", report, lines)


if __name__ == "__main__":
    main()
