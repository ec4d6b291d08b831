"""Feedback to a task scorer: record choices, judge them, adapt, and see the next picks change.

A made-up house style stands in for a user's task: unit conversions answered with the number
and unit only, asked under one system message. The bundled scorer has never seen that style.
A reranker that records its selections and looks for task scorers serves the task; twenty-four
of its selections are judged (the terse right answer preferred over a chatty right one and a
wrong one). One call adapts a task scorer on them (a LoRA over the bundled scorer), lets the
guard compare its picks with the bundled scorer's on the selections it held out, and stores it.
The same reranker, not restarted, then picks for eight conversions neither saw, and its
metadata says which scorer picked and what the guard measured.

    python examples/feedback_adaptation.py
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path

from capplug import Reranker, Scorer
from capplug.adapters import TaskScorers
from capplug.feedback import FeedbackStore
from capplug.training.task_scorers import adapt_task_scorers

HOUSE_STYLE = "Convert units. Answer with the number and unit only."


def conversions(count: int, seed: int) -> list[tuple[list[dict[str, str]], list[str], int]]:
    """(chat, [chatty, terse, wrong] answers, index of the one the house style wants)."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        km = rng.randint(2, 90)
        chat = [
            {"role": "system", "content": HOUSE_STYLE},
            {"role": "user", "content": f"Convert {km} kilometres to metres."},
        ]
        chatty = f"To convert {km} kilometres to metres, multiply by 1000: {km} km is {km * 1000} metres."
        out.append((chat, [chatty, f"{km * 1000} m", f"{km * 100} m"], 1))
    return out


def house_style_picks(reranker: Reranker, items: list) -> int:
    return sum(reranker.select(chat, answers).index == wanted for chat, answers, wanted in items)


def adapt_on_feedback(start: str = "capplug-default") -> None:
    print("\n== feedback to a task scorer (a made-up house style)")
    work = Path(tempfile.mkdtemp(prefix="capplug-feedback-demo-"))
    scorer = Scorer.from_pretrained(start)
    task_scorers = TaskScorers(work / "task-scorers", scorer=scorer)
    feedback = FeedbackStore(work / "feedback.sqlite3")
    reranker = Reranker(scorer, feedback=feedback, task_scorers=task_scorers)
    unseen = conversions(8, seed=1)
    print(
        f"8 conversions, house-style answer picked by the bundled scorer: {house_style_picks(reranker, unseen)}/8"
    )

    for chat, answers, wanted in conversions(24, seed=0):
        selection = reranker.select(chat, answers)  # recorded: selection.id
        feedback.add(selection.id, preferred=wanted)  # what the user judged
    started = time.perf_counter()
    # What `capplug adapt --from-feedback --task-scorers DIR` runs: one task scorer per task.
    (result,) = adapt_task_scorers(
        feedback.rows(), task_scorers, work / "runs", progress=False, log=lambda _line: None
    )
    print(
        f"{result.selections} judged selections, task scorer adapted and stored in "
        f"{time.perf_counter() - started:.1f}s"
    )
    print(f"guard: {result.guard.reason}")

    picked = house_style_picks(reranker, unseen)  # the same reranker: no restart
    meta = reranker.select(*unseen[0][:2]).metadata()["task_scorer"]
    who = f"task scorer {meta['id']}" if meta["used"] else "the bundled scorer"
    print(f"the same 8 conversions, house-style answer picked now: {picked}/8 (scored by {who})")


if __name__ == "__main__":
    adapt_on_feedback()
